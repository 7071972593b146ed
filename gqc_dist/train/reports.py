"""What a gqc-train run says and writes besides its records: strict JSON, the progress line's
noise scale and mean window, the warning when an adaptive controller was mostly forced, the
summary of a finished run, and the one line a run ends with early (a stop signal, divergence)."""

import json
import math
import signal
import sys
import time
from pathlib import Path

from gqc_dist.train.health import TrainDiverged
from gqc_dist.train.progress import Budget
from gqc_dist.train.signals import RunStopped, signal_name
from gqc_dist.train.storage import RunFileError, write_atomic

COST_KEYS = ("cost_micro_step_s", "cost_reduction_s", "cost_optimizer_step_s")  # gqc_dist.core.costs, per step


def strict(value):
    """``value`` with every non-finite float replaced by ``None``: strict JSON, no bare NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(item) for item in value]
    return value


def to_json(value, **kwargs) -> str:
    return json.dumps(strict(value), allow_nan=False, **kwargs)


class IntervalMean:
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


def noise_text(noise_scale, unit: str = "") -> str:
    """The progress line's noise scale: not yet measured (no informative window so far) or not yet
    resolved (the noise estimate is not positive yet, clamped at 0) read differently from a value."""
    if noise_scale is None:
        return "not measured yet"
    return "not resolved yet (<= 0)" if noise_scale == 0 else f"{noise_scale:.2f}{unit}"


def finished_summary(out_dir: Path, budget: Budget):
    """The summary of a run in ``out_dir`` that finished with the budget (as configured now)
    spent, or ``None``."""
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "finished":
        return None
    return summary if budget.spent(summary["optimizer_steps"], summary["micro_steps"]) else None


def warn_if_mostly_forced(engine, steps: int) -> None:
    """An adaptive controller whose windows mostly end at max_draws is not adapting: say so."""
    forced = engine.controller.statistics()["forced_steps"]
    if engine.spec.adaptive and steps and forced > steps / 2:
        print(f"gqc-train: warning: {forced} of {steps} optimizer steps ({100 * forced / steps:.0f}%) were "
              f"forced by max_draws ({engine.controller.max_draws}): the controller wanted larger batches; "
              "raise gqc.max_draws or relax its threshold", file=sys.stderr)


def end_early(config, out_dir, rank, counters, stopped, watch, checkpoints, tokens, dropped, start):
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
        write_atomic(out_dir / "summary.json", to_json(summary, indent=2) + "\n", "summary")
    raise TrainDiverged(line)
