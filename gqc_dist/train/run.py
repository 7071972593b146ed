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
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch

from gqc_dist.core import collectives
from gqc_dist.errors import GQCConfigError, TrainError
from gqc_dist.core.packet import world_rank_and_size
from gqc_dist.train.corpus import ByteBatches, evaluate_batches, load_corpus
from gqc_dist.train.backends import TrainEngine, build_engine, init_distributed
from gqc_dist.train.plots import plot_run
from gqc_dist.train.device import flops_per_token, peak_tflops
from gqc_dist.train.progress import Budget
from gqc_dist.train.throughput import Throughput
from gqc_dist.train.health import DivergenceWatch, TrainDiverged
from gqc_dist.train.run_dir import Checkpoints, claim, prepare, truncate_metrics
from gqc_dist.train.run_lock import RunLock
from gqc_dist.train.signals import STOP, RunStopped, signal_name
from gqc_dist.train.storage import Appender, RunFileError, write_atomic


COST_KEYS = ("cost_micro_step_s", "cost_reduction_s", "cost_optimizer_step_s")  # gqc_dist.core.costs, per step


def _strict(value):
    """``value`` with every non-finite float replaced by ``None``: strict JSON, no bare NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def _json(value, **kwargs) -> str:
    return json.dumps(_strict(value), allow_nan=False, **kwargs)


class _IntervalMean:
    """The mean window length since the progress display last showed it."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.total, self.count = 0, 0

    def add(self, draws: int) -> None:
        self.total += draws
        self.count += 1

    def mean(self) -> float:
        return self.total / max(1, self.count)


def _noise_text(noise_scale, unit: str = "") -> str:
    """The progress line's noise scale: not yet measured (no informative window so far) or not yet
    resolved (the noise estimate is not positive yet, clamped at 0) read differently from a value."""
    if noise_scale is None:
        return "not measured yet"
    return "not resolved yet (<= 0)" if noise_scale == 0 else f"{noise_scale:.2f}{unit}"


def _finished_summary(out_dir: Path, budget: Budget):
    """The summary of a run in ``out_dir`` that finished with the budget (as configured now)
    spent, or ``None``."""
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "finished":
        return None
    budget.steps_done, budget.micro_steps_done = summary["optimizer_steps"], summary["micro_steps"]
    spent = budget.exhausted()
    budget.steps_done = budget.micro_steps_done = 0
    return summary if spent else None


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


def _warn_if_mostly_forced(engine: TrainEngine, steps: int) -> None:
    """An adaptive controller whose windows mostly end at max_draws is not adapting: say so."""
    forced = engine.controller.statistics()["forced_steps"]
    if engine.spec.adaptive and steps and forced > steps / 2:
        print(f"gqc-train: warning: {forced} of {steps} optimizer steps ({100 * forced / steps:.0f}%) were "
              f"forced by max_draws ({engine.controller.max_draws}): the controller wanted larger batches; "
              "raise gqc.max_draws or relax its threshold", file=sys.stderr)


def train(config: Dict[str, Any], resume: bool = False, progress: bool = True,
          overwrite: bool = False) -> Dict[str, Any]:
    """Run gqc-train for a validated ``config``; returns the final summary (on every rank).

    ``resume``: continue the run in ``out_dir`` from its latest checkpoint (``config`` must be
    the run's own, see the CLI); ``overwrite``: replace a run already in ``out_dir``. Nothing in
    ``out_dir`` changes before the checks (and, resuming, the checkpoint load) succeed.
    """
    device = init_distributed(config["engine"], config["train"]["collective_timeout_s"], config["device"])
    rank, world = world_rank_and_size()
    data, train_cfg, model_cfg = config["data"], config["train"], config["model"]
    if data["micro_batch_size"] % world:
        raise GQCConfigError(f"data.micro_batch_size ({data['micro_batch_size']}) must be a multiple of "
                             f"the world size ({world})")
    out_dir = Path(config["out_dir"])
    prepare(out_dir, resume, overwrite, rank)
    seq_len, global_batch = model_cfg["seq_len"], data["micro_batch_size"]
    budget = Budget(train_cfg, global_batch * seq_len)
    finished = _finished_summary(out_dir, budget) if resume else None
    if finished is not None:  # nothing left to train: say so and change nothing
        if rank == 0:
            print(f"gqc-train: {out_dir} finished at optimizer step {finished['optimizer_steps']} (validation loss "
                  f"{finished['val_loss']:.4f}): nothing to resume, no file changed; raise its budget (--set "
                  "train.tokens=... or train.optimizer_steps=...) to train on", file=sys.stderr, flush=True)
        return finished
    torch.manual_seed(config["seed"])
    train_data, val_data = load_corpus(max_bytes=data["max_bytes"], path=data["path"])
    engine = build_engine(config, budget, device)
    batches = ByteBatches(train_data, seq_len, global_batch // world, seed=config["seed"], rank=rank,
                          world_size=world)
    # evaluation batches of at least 16 sequences (split over the ranks), whatever the micro-batch
    eval_batch = -(-max(global_batch, 16) // world) * world
    eval_set = evaluate_batches(val_data, seq_len, eval_batch, train_cfg["eval_batches"])
    checkpoints = Checkpoints(out_dir, rank, world, engine.device)
    metrics_path = out_dir / "metrics.jsonl"
    counters = {"step": 0, "micro_step": 0, "micro_steps_in_steps": 0, "wall": 0.0}
    last_good = None  # the newest checkpoint known good before this process (health.DivergenceWatch)
    if resume:
        extra = checkpoints.load_latest(engine)
        if extra is None:
            raise TrainError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}")
        counters = extra["counters"]
        last_good = extra.get("last_good_checkpoint")
        batches.load_state_dict(extra["batches"])
        budget.steps_done, budget.micro_steps_done = counters["step"], counters["micro_step"]
        # the peak rate is the config's (the one setting --resume may change): the optimizer's
        # param groups, which the window hook scales every step, came back from the checkpoint
        for group in engine.controller.param_groups:
            group["lr"] = config["optimizer"]["lr"]
    # the run's files change only now, after the checks and the checkpoint load, under the lock
    claim(out_dir, RunLock.held(out_dir), resume, overwrite, rank, checkpoints.loaded, engine.device)
    if rank == 0:
        write_atomic(out_dir / "config.json", json.dumps(config, indent=2) + "\n", "config")
        if resume:
            truncate_metrics(metrics_path, counters["step"])
            print(f"gqc-train: resuming {out_dir} from {checkpoints.root / checkpoints.loaded}: optimizer step "
                  f"{counters['step']}, micro-step {counters['micro_step']}, "
                  f"{counters['micro_step'] * global_batch * seq_len:,} tokens, optimizer.lr "
                  f"{config['optimizer']['lr']:g}", file=sys.stderr, flush=True)
        else:
            write_atomic(metrics_path, "", "metrics")

    metrics = Appender(metrics_path, "metrics") if rank == 0 else None
    bar = None
    if rank == 0 and progress and sys.stderr.isatty():  # a log file gets plain lines instead
        from tqdm import tqdm

        bar = tqdm(total=100, initial=round(100 * budget.fraction), desc="gqc-train", unit="%",
                   dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total}% [{elapsed}<{remaining}{postfix}]")
    start = time.time() - counters["wall"]
    # a checkpoint taken mid-window (a stop signal) carries the window's loss so far
    window_loss, window_draws = counters.pop("window_loss", 0.0), counters.pop("window_draws", 0)
    # the checkpoint resumed from is known good once the first window after it steps with a finite loss
    watch = DivergenceWatch(train_cfg["max_nonfinite_windows"], last_good, checkpoints.loaded)
    # [1, signal number] once a stop signal arrived; summed over the ranks: [ranks asked to stop,
    # sum of their signal numbers] (one signal alike on every rank: the sum over the count is it)
    stop_flag = torch.zeros(2, dtype=torch.float64, device=engine.device)
    flagged = False
    stopped = None  # (signal number or 0 for a mixture, checkpoint folder) once every rank agreed
    shown = _IntervalMean()  # windows since the progress line last showed them

    def tokens_seen():
        return counters["micro_step"] * global_batch * seq_len

    def write(record):
        if metrics is not None:
            metrics.write_line(_json(record))

    def save_checkpoint(between_steps=False):
        counters["wall"] = time.time() - start
        folder = checkpoints.save(counters["step"], engine,
                                  {"counters": dict(counters, window_loss=window_loss, window_draws=window_draws),
                                   "batches": batches.state_dict(), "last_good_checkpoint": watch.last_good},
                                  counters["micro_step"] if between_steps else None)
        watch.saved(folder.name)
        return folder

    pin = engine.device.type == "cuda"
    # the whole model's parameters: a DTensor's numel is global, ZeRO-3 keeps the full count in ds_numel
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    meter = Throughput(global_batch * seq_len, world, flops_per_token(num_params, model_cfg["layers"], model_cfg["dim"],
                                                                      seq_len),
                       peak_tflops(engine.device, train_cfg["peak_tflops"]), engine.device)
    while not budget.exhausted():
        x, y = (t.pin_memory().to(engine.device, non_blocking=True) if pin else t.to(engine.device)
                for t in batches.next())
        if engine.controller.split_next and x.shape[0] > 1:
            loss = _backward_in_parts(engine, x, y, rank, world)
        else:
            loss = engine.loss(x, y)
            engine.backward(loss)
        if STOP.signum and not flagged:  # a kernel, no sync; the flag then rides along
            stop_flag.copy_(torch.tensor([1.0, STOP.signum], dtype=torch.float64), non_blocking=True)
            flagged = True
        # this micro-batch's loss and the stop flag ride in the controller's all-reduce: the loop
        # adds no host sync and no collective of its own (and every rank sees every rank's flag)
        engine.controller.carry(torch.cat([loss.detach().reshape(1).to(torch.float64), stop_flag]))
        counters["micro_step"] += 1
        budget.micro_steps_done = counters["micro_step"]
        threshold = engine.threshold()  # what this micro-step's decision uses
        meter.before_decision()
        stepped = engine.step(loss)
        meter.after_decision(stepped)
        loss_sum, stopping, signal_sum = engine.controller.carried
        signals = signal_sum / stopping if stopping else 0  # the signal, if every rank asked got the same
        window_loss += loss_sum / world
        window_draws += 1
        if not stepped:
            if engine.controller.num_draws == 0:  # a dropped (non-finite) window
                watch.window(True, loss_sum / world, counters["step"], counters["micro_step"])
                window_loss, window_draws = 0.0, 0
                if watch.verdict():
                    break
            if signals:
                stopped = (signals, save_checkpoint(between_steps=True))
                break
            continue
        counters["step"] += 1
        budget.steps_done = counters["step"]
        counters["micro_steps_in_steps"] += window_draws
        stats = engine.controller.statistics()
        step = counters["step"]
        tokens = tokens_seen()
        record = {"kind": "step", "step": step, "tokens": tokens,
                  "samples": counters["micro_step"] * global_batch,
                  "loss": window_loss / window_draws, "draws": stats["last_num_draws"],
                  "threshold": threshold, "mean_grad_norm": stats["mean_grad_norm"],
                  "noise_scale": stats.get("gradient_noise_scale_micro_batches"),
                  "target_draws": stats.get("wanted_draws"),
                  "forced_steps": stats["forced_steps"], "prediction_error": stats.get("last_prediction_error"),
                  "lr": engine.lr(), "wall_time": time.time() - start,
                  **{key: stats[key] for key in COST_KEYS if key in stats},
                  **meter.window()}
        write(record)
        watch.window(False, record["loss"], step, counters["micro_step"])
        window_loss, window_draws = 0.0, 0
        if watch.verdict():
            break
        shown.add(record["draws"])
        if bar is not None:  # the postfix first: update() then shows the steps just taken
            if round(100 * budget.fraction) != bar.n:
                bar.set_postfix(loss=f"{record['loss']:.3f}", window=f"{shown.mean():.2f}",
                                noise=_noise_text(record["noise_scale"]),
                                tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
                shown.reset()
                bar.update(round(100 * budget.fraction) - bar.n)
        elif rank == 0 and progress and step % train_cfg["eval_interval"] == 0:  # a log file: one line
            print(f"gqc-train: step {step} | {100 * budget.fraction:.0f}% | loss {record['loss']:.3f} | mean window "
                  f"{shown.mean():.2f} micro-batches | noise scale {_noise_text(record['noise_scale'], ' micro-batches')}"
                  f" | {record['tokens_per_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
            shown.reset()
        if step % train_cfg["eval_interval"] == 0 and not budget.exhausted() and not signals:
            write({"kind": "val", "step": step, "tokens": tokens, "val_loss": evaluate(engine, eval_set, rank, world),
                   "wall_time": time.time() - start})
        saved = None
        if step % train_cfg["checkpoint_interval"] == 0 or signals:
            if watch.healthy:  # never a checkpoint of a run going non-finite over a good one
                saved = save_checkpoint()
            elif rank == 0:
                print(f"gqc-train: warning: no checkpoint at step {step}: the recent windows went non-finite; "
                      f"{checkpoints.latest_name(out_dir) or 'no checkpoint'} stays the latest", file=sys.stderr)
        if signals:
            stopped = (signals, saved)
            break
    if bar is not None:
        bar.close()
    if stopped is not None or watch.verdict():
        if metrics is not None:
            metrics.close()
        _end_early(config, out_dir, rank, counters, stopped, watch, checkpoints, tokens_seen(),
                   engine.controller.statistics()["dropped_windows"], start)
    # the final loss on more batches: float summation order alone moves an 8-batch loss by 0.3%
    final_set = evaluate_batches(val_data, seq_len, eval_batch, train_cfg["final_eval_batches"])
    val_loss = evaluate(engine, final_set, rank, world)
    write({"kind": "val", "step": counters["step"], "tokens": tokens_seen(), "val_loss": val_loss,
           "batches": len(final_set), "wall_time": time.time() - start})
    summary = {"val_loss": val_loss, "tokens": tokens_seen(),
               "optimizer_steps": counters["step"], "micro_steps": counters["micro_step"],
               "mean_micro_batches_per_step": counters["micro_steps_in_steps"] / max(1, counters["step"]),
               "wall_time": time.time() - start, "engine": config["engine"], "world_size": world,
               "device": str(engine.device), "precision": config["precision"], "out_dir": str(out_dir),
               "dropped_windows": engine.controller.statistics()["dropped_windows"], "status": "finished"}
    summary["tokens_per_s"] = summary["tokens"] / max(summary["wall_time"], 1e-9)
    summary["tokens_per_s_per_rank"] = summary["tokens_per_s"] / world
    if meter.peak_tflops:
        summary["mfu"] = summary["tokens_per_s_per_rank"] * meter.flops_per_token / (meter.peak_tflops * 1e12)
    if metrics is not None:
        _warn_if_mostly_forced(engine, counters["step"])
        metrics.close()
        if counters["step"]:
            plot_run(metrics_path, out_dir / "training.png",
                     title=f"gqc-train {config['engine']} {config['gqc']['algorithm']}",
                     value_name=engine.spec.logged_value)
        write_atomic(out_dir / "summary.json", _json(summary, indent=2) + "\n", "summary")
    return summary


def _end_early(config, out_dir, rank, counters, stopped, watch, checkpoints, tokens, dropped, start):
    """The run ends before its budget: a stop signal (after its checkpoint) or divergence (no
    checkpoint, ``summary.json`` with ``"status": "diverged"``). Raises :class:`RunStopped` or
    :class:`TrainDiverged` with the one line to print."""
    latest = checkpoints.latest_name(out_dir)
    where = f"optimizer step {counters['step']} (micro-step {counters['micro_step']}, {tokens:,} tokens)"
    if stopped is not None:
        signals, saved = stopped
        what = f"checkpoint {saved} written" if saved else f"{latest or 'no checkpoint'} is the latest checkpoint"
        name = signal_name(signals)  # 128 + the signal, as a shell reports it (SIGTERM's for a mixture)
        raise RunStopped(f"stopped by {name} at {where}: {what}; continue with --resume --out-dir {out_dir}",
                         128 + int(getattr(signal.Signals, name, signal.SIGTERM)))
    lr = config["optimizer"]["lr"]
    # the last checkpoint a window after it stepped from with a finite loss: not the latest, whose
    # parameters may be finite yet give a non-finite loss (it was taken just before the windows went bad)
    good = watch.last_good
    if good is None:
        named = (f"no checkpoint is known good (no window stepped with a finite loss after {checkpoints.root / latest})"
                 if latest else "no checkpoint was written before")
    else:
        named = f"the last good checkpoint is {checkpoints.root / good}"
        pointed = latest == good or rank != 0  # rank 0 points it
        if not pointed:  # --resume continues from the latest: make that the good one
            try:
                checkpoints.point_latest(good)
                pointed = True
            except RunFileError as error:
                named += f" (checkpoints/latest still names {latest}: {error.cause})"
    fix = f"--set optimizer.lr={lr / 10:g}"
    if good is not None and pointed:
        fix = (f"--resume --out-dir {out_dir} {fix} continues from that checkpoint with it (checkpoints/latest "
               "names it); a new --out-dir starts over")
    else:
        fix += " in a new --out-dir, which starts over"
    line = (f"training diverged: {watch.verdict()}; stopped at {where} without a checkpoint; {named}; likely fix: a "
            f"lower optimizer.lr (now {lr:g}): {fix}" + ("; or bf16 instead of fp16" if config["precision"] == "fp16"
                                                        else ""))
    if rank == 0:
        summary = {"status": "diverged", "reason": line, "val_loss": None, "tokens": tokens,
                   "optimizer_steps": counters["step"], "micro_steps": counters["micro_step"],
                   "dropped_windows": dropped, "last_good_checkpoint": good,
                   "wall_time": time.time() - start, "engine": config["engine"], "out_dir": str(out_dir)}
        write_atomic(out_dir / "summary.json", _json(summary, indent=2) + "\n", "summary")
    raise TrainDiverged(line)
