"""Sample efficiency: each controller against fixed accumulation at the same token budget.

    python benchmarks/efficiency.py                      # both settings, every run (~1 h on 2 cores)
    python benchmarks/efficiency.py --settings main --runs fixed1 cbc
    python benchmarks/efficiency.py --report-only        # table and PNG from runs already made

Every run is a real ``gqc-train`` (one CPU process) on the same data order and the same
evaluation batches, with the learning-rate schedule keyed on tokens so that it spans the whole
budget for every run (``train.tokens``). Runs land in ``benchmarks/out/<setting>/<run>``; a run
whose ``summary.json`` exists is not repeated. It prints one table per setting (final val loss,
optimizer steps, micro-batches, and for each controller the optimizer steps fixed accumulation
needs for the same loss, interpolated in log-steps along the fixed runs, with the ratio) and
saves ``benchmarks/efficiency.png`` (val loss against tokens and against optimizer steps).

Settings: ``main`` is gqc-train's default job; ``second`` changes the corpus (the installed
torch package's Python sources instead of the standard library's), the width (192) and the
micro-batch (8 sequences) and shortens the budget, so a default tuned to the first cannot pass
unseen. ``third`` (64-token sequences, width 64, 4 layers, 32-sequence micro-batches) was added
after the default was chosen, as a setting it was not tuned on.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def _torch_sources() -> str:
    """A second corpus present on any machine with torch: its package's ``.py`` files, copied
    (sorted, relative paths kept) into ``benchmarks/out/corpus-torch`` once."""
    import shutil

    import torch

    root, dest = Path(torch.__file__).parent, OUT / "corpus-torch"
    if not dest.exists():
        for path in sorted(root.rglob("*.py")):
            target = dest / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return str(dest)


SETTINGS = {
    "main": {"set": [], "tokens": 1500 * 16 * 128},
    "second": {"set": ["model.dim=192", "model.heads=6", "data.micro_batch_size=8", "data.path=@torch"],
               "tokens": 1000 * 8 * 128},
    # chosen after the default was: shorter sequences, a narrower and deeper model, larger micro-batches
    "third": {"set": ["model.seq_len=64", "model.dim=64", "model.heads=2", "model.layers=4",
                      "data.micro_batch_size=32"], "tokens": 600 * 32 * 64},
}

CBC = {"algorithm": "cbc", "kappa": 0.25, "max_draws": 16}  # gqc-train's default
RUNS = {
    "fixed1": ["--baseline", "1"],
    "fixed2": ["--baseline", "2"],
    "fixed4": ["--baseline", "4"],
    "fixed8": ["--baseline", "8"],
    "gnts": ["--set", 'gqc={"algorithm": "gnts", "max_draws": 16, "schedule": {"num_training_steps": 300, '
             '"num_warmup_steps": 20, "initial_threshold": 1.0, "final_threshold": 0.45, "warmup_multiplier": 3}}'],
    "cbc": ["--set", "gqc=" + json.dumps(CBC)],
    "cbc_k0.5": ["--set", "gqc=" + json.dumps({**CBC, "kappa": 0.5})],
}
FIXED = ["fixed1", "fixed2", "fixed4", "fixed8"]


def run(setting: str, name: str) -> Path:
    """Make one run (unless already made); returns its directory."""
    out = OUT / setting / name
    if (out / "summary.json").exists():
        return out
    spec = SETTINGS[setting]
    overrides = [s.replace("@torch", _torch_sources()) for s in spec["set"]]
    command = [sys.executable, "-m", "gqc_dist.train", "--no-progress", "--out-dir", str(out),
               "--set", f"train.tokens={spec['tokens']}", "--set", "train.optimizer_steps=1000000",
               "--set", "train.max_micro_steps=1000000", "--set", "train.checkpoint_interval=1000000",
               "--set", "train.eval_interval=25", *sum((["--set", s] for s in overrides), []), *RUNS[name]]
    print(f"[{setting}] {name}: {' '.join(command[3:])}", flush=True)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return out


def load(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((out / "summary.json").read_text())
    return {"summary": summary, "val": [r for r in records if r["kind"] == "val"],
            "steps": [r for r in records if r["kind"] == "step"]}


def fixed_steps_for(loss: float, fixed: list) -> float:
    """Optimizer steps fixed accumulation needs to end at ``loss``: interpolation in log-steps
    between fixed runs' (steps, final loss); ``nan`` outside their range."""
    points = sorted((r["summary"]["optimizer_steps"], r["summary"]["val_loss"]) for r in fixed)
    for (s0, l0), (s1, l1) in zip(points, points[1:]):
        if min(l0, l1) <= loss <= max(l0, l1) and l0 != l1:
            t = (loss - l0) / (l1 - l0)
            return math.exp(math.log(s0) + t * (math.log(s1) - math.log(s0)))
    return math.nan


def _show(value, spec: str) -> str:
    """A number, or "-" where it does not apply (fixed runs, a loss outside the fixed range)."""
    return "-" if value is None or value != value else format(value, spec)


def report(settings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(settings), 2, figsize=(13, 4.5 * len(settings)), squeeze=False)
    for row, setting in enumerate(settings):
        runs = {name: load(OUT / setting / name) for name in RUNS if (OUT / setting / name / "summary.json").exists()}
        fixed = [runs[name] for name in FIXED if name in runs]
        best = min((r["summary"]["val_loss"] for r in fixed), default=math.nan)
        print(f"\n{setting}: {SETTINGS[setting]['tokens']:,} tokens per run")
        print(f"{'run':10} {'val loss':>9} {'vs best fixed':>13} {'steps':>6} {'micro-batches':>13} "
              f"{'fixed steps for this loss':>26} {'ratio':>6} {'forced':>7}")
        for name, r in runs.items():
            s = r["summary"]
            need = fixed_steps_for(s["val_loss"], fixed) if name not in FIXED else math.nan
            ratio = s["optimizer_steps"] / need if need == need else math.nan
            forced = r["steps"][-1].get("forced_steps", 0) if r["steps"] and name not in FIXED else None
            print(f"{name:10} {s['val_loss']:9.4f} {100 * (s['val_loss'] / best - 1):+12.2f}% "
                  f"{s['optimizer_steps']:6d} {s['micro_steps']:13d} {_show(need, '.0f'):>26} "
                  f"{_show(ratio, '.2f'):>6} {_show(forced, 'd'):>7}")
            style = "--" if name in FIXED else "-"
            axes[row][0].plot([v["tokens"] for v in r["val"]], [v["val_loss"] for v in r["val"]], style, label=name)
            axes[row][1].plot([v["step"] for v in r["val"]], [v["val_loss"] for v in r["val"]], style, label=name)
        for ax, unit in zip(axes[row], ("tokens", "optimizer steps")):
            ax.set_xlabel(unit)
            ax.set_ylabel("val loss (nats/token)")
            ax.set_title(f"{setting}: val loss vs {unit}")
            ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
            ax.grid(alpha=0.3)
            ax.legend()
        axes[row][1].set_xscale("log")
    fig.tight_layout()
    path = OUT.parent / "efficiency.png"
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        for setting in args.settings:
            for name in args.runs:
                run(setting, name)
    report(args.settings)


if __name__ == "__main__":
    main()
