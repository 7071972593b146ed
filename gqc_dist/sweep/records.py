"""One run's compact result: the small JSON a sweep keeps per (arm, seed).

Fields: ``setting`` (the sweep's name), ``arm``, ``seed``, ``kind``, ``k``, ``lr_multiplier``,
``val_loss`` (final, nats/token or the script's own unit), ``optimizer_steps``, ``micro_steps``,
``tokens``, ``wall_time`` (s), ``windows`` (``{micro-batches: steps}``), ``mean_window``,
``noise_scale`` (``B_simple`` q10/q50/q90 in micro-batches, over the run and its second half),
``target`` (how CBC's windows followed ``kappa * B_simple``, gqc-train only), ``steps_bound``
(:func:`gqc_dist.sweep.table.adaptive_steps_bound`) and ``val_curve``.

A gqc-train run's record is read from its run directory (:func:`record_of_run`); a script of the
user's writes ``sweep_result.json`` into its ``{out}`` folder with :func:`write_result` or a
:class:`RunRecorder`, and the sweep completes the record from it (:func:`record_of_script`).
"""

import json
import math
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from gqc_dist.atomic_file import replace_atomically
from gqc_dist.sweep.table import adaptive_steps_bound

SCRIPT_RESULT = "sweep_result.json"  # what a user's script writes into its {out} folder


def quantiles(values: Iterable[Optional[float]], qs=(0.1, 0.5, 0.9)) -> Optional[List[float]]:
    """The ``qs`` quantiles (nearest rank) of the values that are not None; None if there are none."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return [values[min(len(values) - 1, int(q * len(values)))] for q in qs]


def window_fields(steps: Sequence[Tuple[int, Optional[float]]]) -> dict:
    """The record's window fields from ``(micro-batches, noise scale or None)`` per optimizer step."""
    half = steps[len(steps) // 2:]
    windows = {}
    for draws, _ in steps:
        windows[str(draws)] = windows.get(str(draws), 0) + 1
    bound = adaptive_steps_bound(steps)  # nan: no estimate
    return {"windows": windows,
            "mean_window": {"all": sum(d for d, _ in steps) / max(1, len(steps)),
                            "second_half": sum(d for d, _ in half) / max(1, len(half))},
            "noise_scale": {"all": quantiles(n for _, n in steps), "second_half": quantiles(n for _, n in half)},
            "steps_bound": None if bound != bound else round(bound, 4)}


def write_json(path: Path, record: dict) -> None:
    """One compact line of JSON, replaced atomically (a reader never sees half a record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda f: f.write((json.dumps(record, separators=(",", ":")) + "\n").encode()))


def record_of_run(out: Path) -> dict:
    """The result fields of one finished gqc-train run directory (``metrics.jsonl``, ``summary.json``)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if r["kind"] == "step"]
    vals = [r for r in records if r["kind"] == "val"]
    summary = json.loads((out / "summary.json").read_text())
    half = steps[len(steps) // 2:]
    target = [r.get("target_draws") for r in half]
    follow = None
    if target and all(t is not None for t in target):
        wanted = sum(max(1.0, min(16.0, t)) for t in target)  # what the clamped target asks for
        follow = sum(r["draws"] for r in half) / wanted
    fields = window_fields([(r["draws"], r.get("noise_scale")) for r in steps])
    fields["mean_window"]["all"] = summary["mean_micro_batches_per_step"]
    return {"val_loss": summary["val_loss"], "optimizer_steps": summary["optimizer_steps"],
            "micro_steps": summary["micro_steps"], "tokens": summary["tokens"],
            "wall_time": round(summary["wall_time"], 1), **{k: fields[k] for k in ("windows", "mean_window",
                                                                                  "noise_scale")},
            "target": {"second_half_mean": (sum(target) / len(target)) if follow is not None else None,
                       "follow_second_half": follow},
            "steps_bound": fields["steps_bound"],
            "val_curve": [[v["tokens"], v["step"], round(v["val_loss"], 5)] for v in vals]}


def write_result(out, val_loss: float, tokens: int, windows: Sequence[Tuple[int, Optional[float]]],
                 val_curve: Sequence[Sequence[float]] = (), wall_time: Optional[float] = None) -> Path:
    """Write a training script's result for the sweep that started it: ``out`` is the folder the
    sweep passed as ``{out}``; ``val_loss`` the final evaluation loss; ``tokens`` the tokens (or
    samples) consumed; ``windows`` one ``(micro-batches, noise scale in micro-batches or None)``
    per optimizer step (:class:`RunRecorder` collects them); ``val_curve`` optional
    ``[tokens, step, loss]`` points. Call it on one process only (rank 0). Returns the file."""
    if not isinstance(val_loss, (int, float)) or isinstance(val_loss, bool):
        raise TypeError(f"write_result: val_loss must be a number, got {val_loss!r}")
    steps = [(int(d), None if n is None or not math.isfinite(n) else float(n)) for d, n in windows]
    if not steps or any(d < 1 for d, _ in steps):
        raise ValueError("write_result: windows must list one (micro-batches >= 1, noise scale) per optimizer step")
    fields = window_fields(steps)
    record = {"val_loss": float(val_loss), "optimizer_steps": len(steps), "micro_steps": sum(d for d, _ in steps),
              "tokens": int(tokens), "wall_time": None if wall_time is None else round(wall_time, 1), **fields,
              "target": {"second_half_mean": None, "follow_second_half": None},
              "val_curve": [list(p) for p in val_curve]}
    path = Path(out) / SCRIPT_RESULT
    write_json(path, record)
    return path


class RunRecorder:
    """Collects a script's windows for :func:`write_result`: call :meth:`observe` with the GQC
    optimizer after every optimizer step (or :meth:`add` with the figures), then :meth:`write`."""

    def __init__(self):
        self.windows: List[Tuple[int, Optional[float]]] = []

    def add(self, micro_batches: int, noise_scale: Optional[float] = None) -> None:
        self.windows.append((int(micro_batches), noise_scale))

    def observe(self, optimizer) -> None:
        """The window ``optimizer`` (a gqc_dist wrapper, or a framework's object holding one as
        ``.gqc``/``.optimizer``) just stepped on, and the noise scale it measured."""
        wrapper = optimizer
        while not hasattr(wrapper, "last_num_draws"):
            held = getattr(wrapper, "gqc", None)  # a GQCTrainer / DeepSpeed engine: its wrapper
            held = held if held is not None else getattr(wrapper, "optimizer", None)
            if held is None:
                raise TypeError(f"RunRecorder.observe: {type(optimizer).__name__} is no GQC wrapper and holds "
                                "none as .gqc or .optimizer (after train() started)")
            wrapper = held
        draws = wrapper.last_num_draws
        if draws is None:
            raise ValueError("RunRecorder.observe: the optimizer has not stepped yet; call it after a step")
        noise = wrapper.statistics().get("gradient_noise_scale_micro_batches")
        self.add(draws, None if noise is None or not math.isfinite(noise) else noise)

    def write(self, out, val_loss: float, tokens: int, **kwargs) -> Path:
        return write_result(out, val_loss, tokens, self.windows, **kwargs)


def record_of_script(out: Path) -> Optional[dict]:
    """The result a script wrote into ``out`` (None if it wrote none)."""
    path = out / SCRIPT_RESULT
    return json.loads(path.read_text()) if path.exists() else None
