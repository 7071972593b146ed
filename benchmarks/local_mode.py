"""Communication-avoiding mode against exact mode on gqc-train's main job: DDP with 2 and 4 ranks,
FSDP2 and DeepSpeed ZeRO-1 with 2 ranks.

    python benchmarks/local_mode.py                  # the main job's token budget
    python benchmarks/local_mode.py --tokens 400000  # shorter
    python benchmarks/local_mode.py --report-only    # the table from benchmarks/results/local_mode/

For each engine and world size it runs gqc-train twice on the same data (the default
controller): exact mode (DDP all-reduces every micro-step, FSDP2 reduce-scatters every
micro-step, ZeRO-1 all-reduces a copy every micro-step) and ``gqc.local_accumulation`` (DDP
under no_sync, FSDP2 with gradient sync off, ZeRO-1 accumulating locally: one small all-reduce
per micro-step, one full reduction per optimizer step). It
prints the fraction of optimizer steps whose window has the same length in both runs (compared
step by step while the runs agree on where windows start, and index by index over the whole
run), the final validation losses and their
relative difference, and the gradient bytes all-reduced per optimizer step by each mode
(computed from the parameter count: exact mode moves the gradient once per micro-step, local
mode once per step; the small statistics packet is the same in both and left out).

Each run leaves one small JSON in ``benchmarks/results/local_mode/`` (its command, final loss,
tokens, every step's window and the last prediction error), from which the table is rebuilt; a
run whose JSON exists is not rerun.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "local_mode"
RESULTS = Path(__file__).resolve().parent / "results" / "local_mode"


RUNS = [("ddp", 2), ("ddp", 4), ("fsdp2", 2), ("deepspeed", 2)]  # (engine, ranks)


def _out(engine: str, world: int, local: bool, tokens) -> Path:
    return OUT / f"{engine}-w{world}-{'local' if local else 'exact'}-{tokens or 'default'}"


def _result(engine: str, world: int, local: bool, tokens) -> Path:
    return RESULTS / f"{_out(engine, world, local, tokens).name}.json"


def run(engine: str, world: int, local: bool, tokens) -> dict:
    """The run's record (command, final loss, tokens, windows, last prediction error), from its
    JSON or a fresh run."""
    result = _result(engine, world, local, tokens)
    if result.exists():
        return json.loads(result.read_text())
    out = _out(engine, world, local, tokens)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_port", str(29600 + world * 2 + local), "-m", "gqc_dist.train", "--engine", engine,
               "--no-progress", "--overwrite", "--out-dir", str(out), "--set", "train.checkpoint_interval=1000000",
               "--set", f"gqc.local_accumulation={str(local).lower()}"]
    if tokens:
        command += ["--set", f"train.tokens={tokens}"]
    if engine == "deepspeed":  # ZeRO-1: gradients stay rank-local until the step
        command += ["--set", "deepspeed.zero_optimization.stage=1"]
    print(" ".join(command[3:]), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    summary = json.loads((out / "summary.json").read_text())
    record = {"command": " ".join(command[3:]), "val_loss": summary["val_loss"], "tokens": summary["tokens"],
              "draws": [r["draws"] for r in steps], "prediction_error": steps[-1].get("prediction_error")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    return record


def _parameters() -> int:
    from gqc_dist.train.model import GPT, ModelConfig
    from gqc_dist.train.settings import DEFAULT_CONFIG

    return sum(p.numel() for p in GPT(ModelConfig(**DEFAULT_CONFIG["model"])).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="default: the main job's own budget")
    parser.add_argument("--report-only", action="store_true", help="no runs: the table from the kept JSONs")
    args = parser.parse_args()
    gradient_bytes = 4 * _parameters()
    print(f"\n{'engine':>9} {'ranks':>5} {'aligned prefix':>15} {'same length, by index':>22} {'val exact':>10} {'val local':>10} {'diff':>7} "
          f"{'exact MB/step':>14} {'local MB/step':>14} {'last pred. err':>15}")
    for engine, world in RUNS:
        if args.report_only and not all(_result(engine, world, mode, args.tokens).exists() for mode in (False, True)):
            print(f"{engine:>9} {world:5d}   not run")
            continue
        exact, local = (run(engine, world, mode, args.tokens) for mode in (False, True))
        same, start_exact, start_local = 0, 0, 0
        for a, b in zip(exact["draws"], local["draws"]):  # windows compared while they start on the same micro-step
            if start_exact != start_local:
                break
            same += a == b
            start_exact += a
            start_local += b
        compared = min(len(exact["draws"]), len(local["draws"]))
        by_index = sum(a == b for a, b in zip(exact["draws"], local["draws"]))
        val = [exact["val_loss"], local["val_loss"]]
        draws = [sum(r["draws"]) / len(r["draws"]) for r in (exact, local)]
        error = local["prediction_error"]
        print(f"{engine:>9} {world:5d} {same:>6d} / {compared:<6d} {100 * by_index / compared:21.1f}% {val[0]:10.4f} {val[1]:10.4f} {100 * (val[1] / val[0] - 1):+6.2f}% "
              f"{(draws[0] + (engine == 'deepspeed')) * gradient_bytes / 1e6:14.2f} {gradient_bytes / 1e6:14.2f} "
              f"{'n/a' if error is None else f'{error:+.3f}':>15}")
    print("\nMB/step: gradient bytes reduced per optimizer step (fp32 gradient of "
          f"{gradient_bytes / 4 / 1e6:.2f} M parameters), exact = once per micro-step, local = once per step "
          "(ZeRO-1 exact: the copy every micro-step plus DeepSpeed's own at the step)")


if __name__ == "__main__":
    main()
