"""The gqc-train loop: micro-batch -> backward -> GQC decision -> metrics, eval, checkpoints.

Outputs under ``out_dir`` (rank 0 writes shared files):

* ``metrics.jsonl``: one ``{"kind": "step", ...}`` line per optimizer step (``step``, ``tokens``,
  ``samples``, ``loss`` (mean over the window's micro-batches and ranks, nats/token),
  ``draws``, ``threshold`` (the controller's value), ``mean_grad_norm``, ``noise_scale`` and
  ``target_draws`` (micro-batches), ``lr`` (as applied), the measured costs in seconds
  (``cost_micro_step_s``, ``cost_reduction_s``, ``cost_optimizer_step_s``), ``wall_time`` seconds)
  and ``{"kind": "val", "step", "tokens", "val_loss", "wall_time"}`` lines at
  ``train.eval_interval`` and at the end (``"batches"``: the final one's evaluation batches).
* ``checkpoints/step_NNNNNN/rank{r}.pt`` at ``train.checkpoint_interval`` (each rank its own
  state; taken right after an optimizer step), and ``checkpoints/latest``.
* ``training.png``: loss against tokens, the window against what the rule asked for and the noise
  scale, the controller's value.

The run owns its directory (``run_lock``) from its first write to its end. Per micro-step the
loop takes one host sync and adds no collective: the micro-batch loss and the stop flag ride in
the controller's all-reduce (``controller.carry``), and so do the norms of the first half of a
probe micro-batch the controller asks for in two halves (``split_next``). A stop
signal (``signals``) ends the run at the micro-step every rank sees it, with a checkpoint; a
diverged run (``health``) ends without one, ``latest`` pointed back at its last good checkpoint
(the last one a window after it stepped from with a finite loss). Every JSON written is strict
(a non-finite number is ``null``).
"""

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from gqc_dist.core import collectives
from gqc_dist.core.packet import world_rank_and_size
from gqc_dist.errors import GQCConfigError, TrainError
from gqc_dist.train.backends import TrainEngine, build_engine, init_distributed
from gqc_dist.train.corpus import ByteBatches, evaluate_batches, load_corpus
from gqc_dist.train.device import flops_per_token, peak_tflops
from gqc_dist.train.health import DivergenceWatch
from gqc_dist.train.plots import plot_run
from gqc_dist.train.progress import Budget
from gqc_dist.train.reports import (COST_KEYS, IntervalMean, end_early, finished_summary, noise_text, to_json,
                                    warn_if_mostly_forced)
from gqc_dist.train.run_dir import Checkpoints, claim, prepare, truncate_metrics
from gqc_dist.train.run_lock import RunLock
from gqc_dist.train.signals import STOP
from gqc_dist.train.storage import Appender, write_atomic
from gqc_dist.train.throughput import Throughput


def evaluate(engine: TrainEngine, eval_set, rank: int, world: int) -> float:
    """Validation loss (nats/token) over the fixed eval batches; each rank takes its rows."""
    total = torch.zeros(1, dtype=torch.float64, device=engine.device)  # summed on the device: one host read
    with torch.no_grad():
        for x, y in eval_set:
            rows = x.shape[0] // world
            mine = [t[rank * rows:(rank + 1) * rows].to(engine.device, non_blocking=True) for t in (x, y)]
            total += engine.loss(*mine).detach().to(torch.float64)
    return collectives.mean_over_ranks(total / len(eval_set), engine.device)[0]


def _backward_in_parts(engine: TrainEngine, x, y, rank: int, world: int):
    """A noise probe at no extra data (the controller's ``split_next``): the micro-batch in two
    parts, the rows of even and of odd index in the global micro-batch (so the parts are the same
    sequences on any number of ranks), each loss weighted by its share of this rank's rows, and
    the first part's norm observed in between: the gradient is the micro-batch's mean as if taken
    whole. Needs at least 2 rows per rank. Returns the micro-batch loss (detached)."""
    rows = x.shape[0]
    first = (rank * rows) % 2  # this rank's first row of even global index
    fraction = (rows * world + 1) // 2 / (rows * world)  # the first part's share of the global batch
    loss = 0.0
    for start, last in ((first, False), (1 - first, True)):  # slices: no host sync
        share = len(range(start, rows, 2)) / rows
        part_loss = engine.loss(x[start::2], y[start::2])
        engine.backward(part_loss * share)
        if not last:
            engine.after_part(fraction)
        loss = loss + part_loss.detach() * share
    return loss


def train(config: Dict[str, Any], resume: bool = False, progress: bool = True,
          overwrite: bool = False) -> Dict[str, Any]:
    """Run gqc-train for a validated ``config``; returns the final summary (on every rank).

    ``resume``: continue the run in ``out_dir`` from its latest checkpoint (``config`` must be
    the run's own, see the CLI); ``overwrite``: replace a run already in ``out_dir``. Nothing in
    ``out_dir`` changes before the checks (and, resuming, the checkpoint load) succeed.
    """
    run = TrainingRun(config, progress)
    finished = run.open(resume, overwrite)
    if finished is not None:
        return finished
    run.claim(resume, overwrite)
    run.loop()
    if run.stopped is not None or run.watch.verdict():
        run.end_early()
    return run.finish()


class TrainingRun:
    """One gqc-train run, step by step: :meth:`open` (checks, data, engine, a resume's
    checkpoint), :meth:`claim` (the directory's files), :meth:`loop` (micro-batches until the
    budget is spent, a stop signal or divergence), then :meth:`end_early` or :meth:`finish`."""

    def __init__(self, config: Dict[str, Any], progress: bool = True):
        self.config, self.progress = config, progress
        self.data, self.train_cfg, self.model_cfg = config["data"], config["train"], config["model"]
        self.out_dir = Path(config["out_dir"])
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.counters = {"step": 0, "micro_step": 0, "micro_steps_in_steps": 0, "wall": 0.0}
        self.stopped = None  # (signal number or 0 for a mixture, checkpoint folder) once every rank agreed

    # ------------------------------------------------------------------ open and claim
    def open(self, resume: bool, overwrite: bool) -> Optional[Dict[str, Any]]:
        """Start distributed, check the directory, build data and engine, load a resume's
        checkpoint; writes nothing. Returns the summary of a finished run there is nothing to
        resume of (and says so), else ``None``."""
        config, data, train_cfg = self.config, self.data, self.train_cfg
        device = init_distributed(config["engine"], train_cfg["collective_timeout_s"], config["device"])
        self.rank, self.world = rank, world = world_rank_and_size()
        if data["micro_batch_size"] % world:
            raise GQCConfigError(f"data.micro_batch_size ({data['micro_batch_size']}) must be a multiple of "
                                 f"the world size ({world})")
        out_dir = self.out_dir
        prepare(out_dir, resume, overwrite, rank)
        self.seq_len, self.global_batch = seq_len, global_batch = self.model_cfg["seq_len"], data["micro_batch_size"]
        self.budget = budget = Budget(train_cfg, global_batch * seq_len)
        finished = finished_summary(out_dir, budget) if resume else None
        if finished is not None:  # nothing left to train: say so and change nothing
            if rank == 0:
                print(f"gqc-train: {out_dir} finished at optimizer step {finished['optimizer_steps']} (validation "
                      f"loss {finished['val_loss']:.4f}): nothing to resume, no file changed; raise its budget (--set "
                      "train.tokens=... or train.optimizer_steps=...) to train on", file=sys.stderr, flush=True)
            return finished
        torch.manual_seed(config["seed"])
        train_data, self.val_data = load_corpus(max_bytes=data["max_bytes"], path=data["path"])
        self.engine = engine = build_engine(config, budget, device)
        self.batches = ByteBatches(train_data, seq_len, global_batch // world, seed=config["seed"], rank=rank,
                                   world_size=world)
        # evaluation batches of at least 16 sequences (split over the ranks), whatever the micro-batch
        self.eval_batch = -(-max(global_batch, 16) // world) * world
        self.eval_set = evaluate_batches(self.val_data, seq_len, self.eval_batch, train_cfg["eval_batches"])
        self.checkpoints = Checkpoints(out_dir, rank, world, engine.device)
        self.last_good = None  # the newest checkpoint known good before this process (health.DivergenceWatch)
        if resume:
            self._load_latest()
        return None

    def _load_latest(self) -> None:
        extra = self.checkpoints.load_latest(self.engine)
        if extra is None:
            raise TrainError(f"--resume: no checkpoint under {self.out_dir / 'checkpoints'}")
        self.counters = counters = extra["counters"]
        self.last_good = extra.get("last_good_checkpoint")
        self.batches.load_state_dict(extra["batches"])
        self.budget.steps_done, self.budget.micro_steps_done = counters["step"], counters["micro_step"]
        # the peak rate is the config's (the one setting --resume may change): the optimizer's
        # param groups, which the window hook scales every step, came back from the checkpoint
        for group in self.engine.controller.param_groups:
            group["lr"] = self.config["optimizer"]["lr"]

    def claim(self, resume: bool, overwrite: bool) -> None:
        """Take the directory: the run's files change only now, after the checks and the
        checkpoint load, under the lock; then the loop's state."""
        out_dir, counters, rank = self.out_dir, self.counters, self.rank
        claim(out_dir, RunLock.held(out_dir), resume, overwrite, rank, self.checkpoints.loaded, self.engine.device)
        if rank == 0:
            write_atomic(out_dir / "config.json", json.dumps(self.config, indent=2) + "\n", "config")
            if resume:
                truncate_metrics(self.metrics_path, counters["step"])
                print(f"gqc-train: resuming {out_dir} from {self.checkpoints.root / self.checkpoints.loaded}: "
                      f"optimizer step {counters['step']}, micro-step {counters['micro_step']}, "
                      f"{self.tokens_seen():,} tokens, optimizer.lr {self.config['optimizer']['lr']:g}",
                      file=sys.stderr, flush=True)
            else:
                write_atomic(self.metrics_path, "", "metrics")
        self.metrics = Appender(self.metrics_path, "metrics") if rank == 0 else None
        self.bar = None
        if rank == 0 and self.progress and sys.stderr.isatty():  # a log file gets plain lines instead
            from tqdm import tqdm

            self.bar = tqdm(total=100, initial=round(100 * self.budget.fraction), desc="gqc-train", unit="%",
                            dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total}% [{elapsed}<{remaining}{postfix}]")
        self.start = time.time() - counters["wall"]
        # a checkpoint taken mid-window (a stop signal) carries the window's loss so far
        self.window_loss, self.window_draws = counters.pop("window_loss", 0.0), counters.pop("window_draws", 0)
        # the checkpoint resumed from is known good once the first window after it steps with a finite loss
        self.watch = DivergenceWatch(self.train_cfg["max_nonfinite_windows"], self.last_good, self.checkpoints.loaded)
        # [1, signal number] once a stop signal arrived; summed over the ranks: [ranks asked to stop,
        # sum of their signal numbers] (one signal alike on every rank: the sum over the count is it)
        self.stop_flag = torch.zeros(2, dtype=torch.float64, device=self.engine.device)
        self.flagged = False
        self.shown = IntervalMean()  # windows since the progress line last showed them
        self.pin = self.engine.device.type == "cuda"  # micro-batches go to the GPU from pinned memory
        engine, model_cfg = self.engine, self.model_cfg
        # the whole model's parameters: a DTensor's numel is global, ZeRO-3 keeps the full count in ds_numel
        num_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        self.meter = Throughput(self.global_batch * self.seq_len, self.world,
                                flops_per_token(num_params, model_cfg["layers"], model_cfg["dim"], self.seq_len),
                                peak_tflops(engine.device, self.train_cfg["peak_tflops"]), engine.device)

    # ------------------------------------------------------------------ helpers
    def tokens_seen(self) -> int:
        return self.counters["micro_step"] * self.global_batch * self.seq_len

    def write(self, record) -> None:
        if self.metrics is not None:
            self.metrics.write_line(to_json(record))

    def save_checkpoint(self, between_steps: bool = False):
        counters = self.counters
        counters["wall"] = time.time() - self.start
        folder = self.checkpoints.save(
            counters["step"], self.engine,
            {"counters": dict(counters, window_loss=self.window_loss, window_draws=self.window_draws),
             "batches": self.batches.state_dict(), "last_good_checkpoint": self.watch.last_good},
            counters["micro_step"] if between_steps else None)
        self.watch.saved(folder.name)
        return folder

    # ------------------------------------------------------------------ the loop
    def loop(self) -> None:
        """Micro-batches until the budget is spent, every rank saw a stop signal, or divergence."""
        while not self.budget.exhausted():
            stepped, signals, loss_sum = self.micro_batch()
            if not stepped:
                if self.after_no_step(signals, loss_sum):
                    break
                continue
            if self.after_step(signals):
                break
        if self.bar is not None:
            self.bar.close()

    def micro_batch(self):
        """Draw, backward (in two parts where the controller asks), decide. Returns whether the
        optimizer stepped, the stop signal every rank agreed on (0: none) and the micro-batch's
        loss summed over the ranks."""
        engine, counters = self.engine, self.counters
        x, y = (t.pin_memory().to(engine.device, non_blocking=True) if self.pin else t.to(engine.device)
                for t in self.batches.next())
        if engine.controller.split_next and x.shape[0] > 1:
            loss = _backward_in_parts(engine, x, y, self.rank, self.world)
        else:
            loss = engine.loss(x, y)
            engine.backward(loss)
        if STOP.signum and not self.flagged:  # a kernel, no sync; the flag then rides along
            self.stop_flag.copy_(torch.tensor([1.0, STOP.signum], dtype=torch.float64), non_blocking=True)
            self.flagged = True
        # this micro-batch's loss and the stop flag ride in the controller's all-reduce: the loop
        # adds no host sync and no collective of its own (and every rank sees every rank's flag)
        engine.controller.carry(torch.cat([loss.detach().reshape(1).to(torch.float64), self.stop_flag]))
        counters["micro_step"] += 1
        self.budget.micro_steps_done = counters["micro_step"]
        self.threshold = engine.threshold()  # what this micro-step's decision uses
        self.meter.before_decision()
        stepped = engine.step(loss)
        self.meter.after_decision(stepped)
        loss_sum, stopping, signal_sum = engine.controller.carried
        self.window_loss += loss_sum / self.world
        self.window_draws += 1
        return stepped, signal_sum / stopping if stopping else 0, loss_sum  # the signal, if every rank asked got the same

    def after_no_step(self, signals, loss_sum) -> bool:
        """A micro-batch that did not step: a dropped (non-finite) window, or a stop signal
        mid-window (a checkpoint between steps). True to stop."""
        if self.engine.controller.num_draws == 0:  # a dropped (non-finite) window
            self.watch.window(True, loss_sum / self.world, self.counters["step"], self.counters["micro_step"])
            self.window_loss, self.window_draws = 0.0, 0
            if self.watch.verdict():
                return True
        if signals:
            self.stopped = (signals, self.save_checkpoint(between_steps=True))
            return True
        return False

    def after_step(self, signals) -> bool:
        """An optimizer step: its record, the divergence watch, progress, evaluation and
        checkpoint at their intervals. True to stop."""
        counters, budget, train_cfg = self.counters, self.budget, self.train_cfg
        counters["step"] += 1
        budget.steps_done = counters["step"]
        counters["micro_steps_in_steps"] += self.window_draws
        stats = self.engine.controller.statistics()
        step = counters["step"]
        tokens = self.tokens_seen()
        record = {"kind": "step", "step": step, "tokens": tokens,
                  "samples": counters["micro_step"] * self.global_batch,
                  "loss": self.window_loss / self.window_draws, "draws": stats["last_num_draws"],
                  "threshold": self.threshold, "mean_grad_norm": stats["mean_grad_norm"],
                  "noise_scale": stats.get("gradient_noise_scale_micro_batches"),
                  "target_draws": stats.get("wanted_draws"),
                  "forced_steps": stats["forced_steps"], "prediction_error": stats.get("last_prediction_error"),
                  "lr": self.engine.lr(), "wall_time": time.time() - self.start,
                  **{key: stats[key] for key in COST_KEYS if key in stats},
                  **self.meter.window()}
        self.write(record)
        self.watch.window(False, record["loss"], step, counters["micro_step"])
        self.window_loss, self.window_draws = 0.0, 0
        if self.watch.verdict():
            return True
        self.show(record)
        if step % train_cfg["eval_interval"] == 0 and not budget.exhausted() and not signals:
            self.write({"kind": "val", "step": step, "tokens": tokens,
                        "val_loss": evaluate(self.engine, self.eval_set, self.rank, self.world),
                        "wall_time": time.time() - self.start})
        saved = None
        if step % train_cfg["checkpoint_interval"] == 0 or signals:
            if self.watch.healthy:  # never a checkpoint of a run going non-finite over a good one
                saved = self.save_checkpoint()
            elif self.rank == 0:
                print(f"gqc-train: warning: no checkpoint at step {step}: the recent windows went non-finite; "
                      f"{self.checkpoints.latest_name(self.out_dir) or 'no checkpoint'} stays the latest",
                      file=sys.stderr)
        if signals:
            self.stopped = (signals, saved)
            return True
        return False

    def show(self, record) -> None:
        """The progress bar's postfix, or on a log file one line per evaluation interval."""
        shown, budget, bar = self.shown, self.budget, self.bar
        shown.add(record["draws"])
        if bar is not None:  # the postfix first: update() then shows the steps just taken
            if round(100 * budget.fraction) != bar.n:
                bar.set_postfix(loss=f"{record['loss']:.3f}", window=f"{shown.mean():.2f}",
                                noise=noise_text(record["noise_scale"]),
                                tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
                shown.reset()
                bar.update(round(100 * budget.fraction) - bar.n)
        elif self.rank == 0 and self.progress and record["step"] % self.train_cfg["eval_interval"] == 0:
            print(f"gqc-train: step {record['step']} | {100 * budget.fraction:.0f}% | loss {record['loss']:.3f} | "
                  f"mean window {shown.mean():.2f} micro-batches | noise scale "
                  f"{noise_text(record['noise_scale'], ' micro-batches')} | {record['tokens_per_s']:,.0f} tokens/s",
                  file=sys.stderr, flush=True)
            shown.reset()

    # ------------------------------------------------------------------ the end
    def end_early(self) -> None:
        """Stopped by a signal or diverged: raises the one line to print."""
        if self.metrics is not None:
            self.metrics.close()
        end_early(self.config, self.out_dir, self.rank, self.counters, self.stopped, self.watch, self.checkpoints,
                  self.tokens_seen(), self.engine.controller.statistics()["dropped_windows"], self.start)

    def finish(self) -> Dict[str, Any]:
        """The final evaluation, the summary, the plot; returns the summary."""
        config, counters, engine, world = self.config, self.counters, self.engine, self.world
        # the final loss on more batches: float summation order alone moves an 8-batch loss by 0.3%
        final_set = evaluate_batches(self.val_data, self.seq_len, self.eval_batch, self.train_cfg["final_eval_batches"])
        val_loss = evaluate(engine, final_set, self.rank, world)
        self.write({"kind": "val", "step": counters["step"], "tokens": self.tokens_seen(), "val_loss": val_loss,
                    "batches": len(final_set), "wall_time": time.time() - self.start})
        summary = {"val_loss": val_loss, "tokens": self.tokens_seen(),
                   "optimizer_steps": counters["step"], "micro_steps": counters["micro_step"],
                   "mean_micro_batches_per_step": counters["micro_steps_in_steps"] / max(1, counters["step"]),
                   "wall_time": time.time() - self.start, "engine": config["engine"], "world_size": world,
                   "device": str(engine.device), "precision": config["precision"], "out_dir": str(self.out_dir),
                   "dropped_windows": engine.controller.statistics()["dropped_windows"], "status": "finished"}
        summary["tokens_per_s"] = summary["tokens"] / max(summary["wall_time"], 1e-9)
        summary["tokens_per_s_per_rank"] = summary["tokens_per_s"] / world
        meter = self.meter
        if meter.peak_tflops:
            summary["mfu"] = summary["tokens_per_s_per_rank"] * meter.flops_per_token / (meter.peak_tflops * 1e12)
        if self.metrics is not None:
            warn_if_mostly_forced(engine, counters["step"])
            self.metrics.close()
            if counters["step"]:
                plot_run(self.metrics_path, self.out_dir / "training.png",
                         title=f"gqc-train {config['engine']} {config['gqc']['algorithm']}",
                         value_name=engine.spec.logged_value)
            write_atomic(self.out_dir / "summary.json", to_json(summary, indent=2) + "\n", "summary")
        return summary
