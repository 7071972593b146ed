"""PNG plots of ``gqc-train`` metrics files (matplotlib, Agg canvas; no display needed).

A metrics file is JSONL, one JSON object per line (blank lines ignored):

* ``{"kind": "step", "step", "tokens", "loss", "draws", ...}``: one per optimizer step;
  ``tokens`` (cumulative, global) and ``draws`` (micro-batches in that step) are required,
  ``threshold`` (null/absent for fixed accumulation) and ``mean_grad_norm`` are plotted if
  present, and so is ``noise_scale``; ``lr``, ``samples``, ``wall_time`` are not used here.
* ``{"kind": "val", "step", "tokens", "val_loss"}``: a validation measurement.

Other ``kind`` values (or none) are ignored. Figures are 12 x 9 inches at dpi 100
(1200 x 900 pixels).
"""

import json
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PathLike = Union[str, os.PathLike]
STEP_KEYS = ("step", "tokens", "loss", "draws")
VAL_KEYS = ("step", "tokens", "val_loss")
FIGSIZE, DPI = (12, 9), 100


def read_metrics(metrics_path: PathLike) -> Tuple[List[dict], List[dict]]:
    """``(step_records, val_records)`` of a metrics file, in file order. Raises ``ValueError``
    naming the file (and line) if it is missing, a line is not a JSON object, a record lacks a
    required key or a value is not a number, or there is no step record."""
    path = Path(metrics_path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"metrics file {str(path)!r} cannot be read: {error}") from error
    steps, vals = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"metrics file {str(path)!r} line {number} is not JSON: {error}") \
                from error
        if not isinstance(record, dict):
            raise ValueError(f"metrics file {str(path)!r} line {number} is not a JSON object")
        kind = record.get("kind")
        if kind not in ("step", "val"):
            continue
        for key in STEP_KEYS if kind == "step" else VAL_KEYS:
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"metrics file {str(path)!r} line {number}: {kind} record needs "
                                 f"a number under {key!r}, got {value!r}")
        (steps if kind == "step" else vals).append(record)
    if not steps:
        raise ValueError(f"metrics file {str(path)!r} has no step records "
                         f"(lines with \"kind\": \"step\")")
    return steps, vals


def _column(records: Sequence[dict], key: str) -> List[float]:
    """Values under ``key``; missing, null or non-numeric values become NaN (a gap)."""
    out = []
    for record in records:
        value = record.get(key)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        out.append(float(value) if numeric else math.nan)
    return out


def _figure(rows: int) -> Tuple[Figure, list]:
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(rows, 1, i + 1) for i in range(rows)]


def _note(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, transform=axes.transAxes, ha="center", va="center",
              fontsize=12, color="0.4")


def _save(figure: Figure, out_png: PathLike) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI, format="png")
    return out


def rolling_mean(values: Sequence[float], width: int) -> List[float]:
    """Trailing mean over the last ``width`` values (fewer at the start)."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= width:
            total -= values[index - width]
        out.append(total / min(index + 1, width))
    return out


def plot_run(metrics_path: PathLike, out_png: PathLike, title: Optional[str] = None,
             value_name: Optional[str] = None) -> Path:
    """One run, 3 panels: (a) training loss (line) and validation loss (points) against
    tokens; (b) micro-batches per optimizer step as a rolling mean over 2% of the steps (each
    step's own window too, faintly) against what the controller aimed for (``target_draws``:
    ``kappa * B_simple`` for CBC) and the gradient noise scale (``noise_scale``), all in
    micro-batches, against step; (c) the controller's own value (``threshold`` in the records,
    named ``value_name``, e.g. ``critical_batch_fraction``) on its own axis, with
    ``mean_grad_norm`` on a second axis. Writes a 1200 x 900 PNG to ``out_png`` and returns its path."""
    steps, vals = read_metrics(metrics_path)
    figure, (loss_ax, draws_ax, value_ax) = _figure(3)
    figure.suptitle(title if title is not None else Path(metrics_path).name)

    loss_ax.plot(_column(steps, "tokens"), _column(steps, "loss"), lw=1, label="train loss")
    if vals:
        loss_ax.plot(_column(vals, "tokens"), _column(vals, "val_loss"), "o", ms=5,
                     label="val loss")
    loss_ax.set(xlabel="tokens", ylabel="loss (nats/token)", title="(a) loss")
    loss_ax.legend(loc="best")

    step = _column(steps, "step")
    draws = _column(steps, "draws")
    width = max(1, len(draws) // 50)
    draws_ax.plot(step, draws, lw=0.5, alpha=0.25, color="C0")
    draws_ax.plot(step, rolling_mean(draws, width), lw=1.5, color="C0",
                  label=f"micro-batches per step, mean of {width}")
    for key, label, color in (("target_draws", "what the rule asks for (CBC: kappa x B_simple)", "C1"),
                              ("noise_scale", "gradient noise scale B_simple", "C2")):
        values = _column(steps, key)
        if any(not math.isnan(v) for v in values):
            draws_ax.plot(step, values, lw=1, color=color, label=label)
    finite = [v for v in draws if not math.isnan(v)]
    draws_ax.set_ylim(0, 2 * max(finite) + 1 if finite else 1)  # an inf noise scale does not flatten the rest
    target = [v for v in _column(steps, "target_draws") if not math.isnan(v)]
    if finite and max(finite) == 1 and target and max(target) < 1:  # say why the controller never accumulated
        _note(draws_ax, f"windows of 1 throughout: the rule asked for at most {max(target):.2f} micro-batches\n"
                        "(CBC: kappa x B_simple stayed below 1)")
    draws_ax.legend(loc="best")
    draws_ax.set(xlabel="optimizer step", ylabel="micro-batches",
                 title="(b) window per step, and the noise scale")

    value = _column(steps, "threshold")
    norm = _column(steps, "mean_grad_norm")
    if all(math.isnan(v) for v in value):
        _note(value_ax, "fixed accumulation (no controller value)")
    else:
        value_ax.plot(step, value, lw=1.5, color="C3", label=value_name or "controller value")
        shown = [v for v in value if math.isfinite(v)]
        if shown and min(shown) >= 0:  # from 0: a constant value is not blown up to fill the axis
            value_ax.set_ylim(0, 1.25 * max(shown) or 1)
        value_ax.set_ylabel(value_name or "controller value")
        value_ax.legend(loc="upper left")
    if any(not math.isnan(v) for v in norm):
        norm_ax = value_ax.twinx()
        norm_ax.plot(step, norm, lw=0.8, alpha=0.6, color="C4", label="mean_grad_norm ||G_n||/n")
        norm_ax.set_ylabel("gradient norm")
        if all(v > 0 for v in norm if not math.isnan(v)):
            norm_ax.set_yscale("log")
        norm_ax.legend(loc="upper right")
    value_ax.set(xlabel="optimizer step", title="(c) the controller's value, and the gradient norm")
    return _save(figure, out_png)


def plot_compare(runs: Sequence[Tuple[str, PathLike]], out_png: PathLike) -> Path:
    """Overlay runs given as ``(label, metrics_path)``: training loss vs tokens, validation
    loss vs tokens, draws vs step. Writes a 1200 x 900 PNG and returns its path."""
    if not runs:
        raise ValueError("plot_compare needs at least one (label, metrics_path) run")
    loaded = []
    for run in runs:
        if not isinstance(run, (tuple, list)) or len(run) != 2:
            raise ValueError(f"plot_compare runs must be (label, metrics_path) pairs, got {run!r}")
        loaded.append((str(run[0]), *read_metrics(run[1])))
    figure, (loss_ax, val_ax, draws_ax) = _figure(3)
    for label, steps, vals in loaded:
        loss_ax.plot(_column(steps, "tokens"), _column(steps, "loss"), lw=1, label=label)
        if vals:
            val_ax.plot(_column(vals, "tokens"), _column(vals, "val_loss"), "o-", ms=4,
                        label=label)
        draws_ax.step(_column(steps, "step"), _column(steps, "draws"), where="post", lw=1,
                      label=label)
    if not val_ax.lines:
        _note(val_ax, "no validation records")
    for axes, x, y, title in ((loss_ax, "tokens", "loss (nats/token)", "training loss"),
                              (val_ax, "tokens", "val loss (nats/token)", "validation loss"),
                              (draws_ax, "optimizer step", "micro-batches", "draws per step")):
        axes.set(xlabel=x, ylabel=y, title=title)
        if axes.lines:
            axes.legend(loc="best")
    return _save(figure, out_png)
