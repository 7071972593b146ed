"""Wall-clock where communication is the bottleneck: the cost-aware rule (``goodput``) against
fixed accumulation under DDP's ``no_sync``, on two hosts joined by a shaped link.

    sudo python benchmarks/goodput.py                  # both links, every arm (~40 min on 2 quiet cores)
    python benchmarks/goodput.py --report-only         # tables, cost model and PNG from results/goodput

Two network namespaces act as two hosts (tests/virtual_cluster.py), each running one gqc-train
rank (torchrun, static rendezvous) of the main job's model on DDP with rank-local accumulation:
each rank draws 8 of the 16 sequences of a global micro-batch, gradients stay local between
steps and are all-reduced once per window (DDP's ``no_sync``, what users do for accumulation
today). The link between the hosts is shaped with ``tc tbf`` to 100 Mbit/s (one all-reduce of
the 2.4 MB gradient costs more than a micro-step) and to 1 Gbit/s (it costs a fraction of one).
Arms: fixed k = 1, 2, 4, 8 micro-batches per step (learning rate coupled by the square-root
rule, as gqc-train does) and the goodput rule. Every run consumes the same tokens in the same
order. Figures: wall-clock to reach each fixed run's final loss, loss at equal wall-clock,
a plot of loss against seconds.

The cost model (``model_seconds``) replays a single-process run of the same per-rank work (its
measured micro-step and optimizer-step seconds and its noise-scale trajectory in samples) at
other bandwidths and world sizes, with a ring all-reduce (``2 (W - 1) / W`` of the gradient's
bytes over each link, plus a per-hop latency); it is checked against the shaped runs.
Results: one small JSON per run under ``benchmarks/results/goodput/``.
"""

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
OUT = HERE / "out" / "goodput"
RESULTS = HERE / "results" / "goodput"

TOKENS = 750 * 16 * 128  # half the main job's budget: 750 global micro-batches of 16 sequences
COMMON = ["--set", f"train.tokens={TOKENS}", "--set", "train.optimizer_steps=10000000",
          "--set", "train.max_micro_steps=10000000", "--set", "train.checkpoint_interval=10000000",
          "--set", "train.eval_interval=25", "--no-progress"]
ARMS = {**{f"fixed{k}": ["--baseline", str(k), "--set", "gqc.local_accumulation=true"] for k in (1, 2, 4, 8)},
        "goodput": ["--set", 'gqc={"algorithm": "goodput", "max_draws": 32, "local_accumulation": true}']}
LINKS = {"100mbit": 100, "1gbit": 1000}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_two_hosts(link: str, arm: str) -> Path:
    """One run of ``arm`` on two hosts over ``link``; its compact result (made once)."""
    from virtual_cluster import VirtualHosts

    result = RESULTS / link / f"{arm}.json"
    if result.exists():
        return result
    out = OUT / link / arm
    hosts = VirtualHosts(2).start()
    try:
        hosts.shape(LINKS[link])
        procs = []
        for node in range(2):
            env = {**_env(), "NNODES": "2", "NODE_RANK": str(node), "NPROC": "1",
                   "MASTER_ADDR": hosts.addresses[0], "MASTER_PORT": "29500"}
            command = hosts.command(node, ["bash", REPO / "launch" / "torchrun.sh", "--engine", "ddp", "--overwrite",
                                           "--out-dir", out, *COMMON, *ARMS[arm]])
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True))
        print(f"[{link}] {arm}", flush=True)
        errors = [p.communicate(timeout=3600)[1] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"{link} {arm} failed:\n" + "\n".join(e[-2000:] for e in errors))
    finally:
        hosts.stop()
    return _keep(out, result, {"link": link, "arm": arm, "mbit": LINKS[link]})


def run_single() -> Path:
    """The single-process run the cost model replays: one rank's work (8 sequences per
    micro-step), the default controller (its probes measure the noise scale)."""
    result = RESULTS / "single.json"
    if result.exists():
        return result
    out = OUT / "single"
    subprocess.run([sys.executable, "-m", "gqc_dist.train", "--overwrite", "--out-dir", str(out), *COMMON,
                    "--set", f"train.tokens={TOKENS // 2}", "--set", "data.micro_batch_size=8"],
                   env=_env(), check=True, stdout=subprocess.DEVNULL)
    return _keep(out, result, {"arm": "single"})


def _keep(out: Path, result: Path, fields: dict) -> Path:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if r["kind"] == "step"]
    summary = json.loads((out / "summary.json").read_text())
    windows = {}
    for r in steps:
        windows[str(r["draws"])] = windows.get(str(r["draws"]), 0) + 1
    half = steps[len(steps) // 2:]

    def late_mean(key):
        values = [r[key] for r in half if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    record = {**fields, "val_loss": summary["val_loss"], "wall_time": round(summary["wall_time"], 2),
              "optimizer_steps": summary["optimizer_steps"], "micro_steps": summary["micro_steps"],
              "tokens": summary["tokens"], "windows": windows,
              "costs": {key: late_mean(key) for key in ("cost_micro_step_s", "cost_reduction_s", "cost_optimizer_step_s")},
              "noise_scale_second_half": late_mean("noise_scale"),
              "val_curve": [[r["tokens"], r["step"], round(r["wall_time"], 2), round(r["val_loss"], 5)]
                            for r in records if r["kind"] == "val"],
              # per step: tokens consumed, noise scale (micro-batches): the cost model's trajectory
              "trajectory": [[r["tokens"], r.get("noise_scale")] for r in steps[::max(1, len(steps) // 200)]]}
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    return result


# ---------------------------------------------------------------- reading the runs
def seconds_to_reach(curve, loss):
    """Seconds a run's validation curve ``[[tokens, step, seconds, loss], ...]`` first reaches
    ``loss`` (linear between evaluations); ``nan`` if it never does."""
    previous = None
    for point in curve:
        if point[3] <= loss:
            if previous is None:
                return point[2]
            (t0, l0), (t1, l1) = (previous[2], previous[3]), (point[2], point[3])
            return t0 + (t1 - t0) * (l0 - loss) / (l0 - l1) if l0 != l1 else t1
        previous = point
    return math.nan


def loss_at(curve, seconds):
    """A run's validation loss at ``seconds`` (linear between evaluations; ``nan`` past its end)."""
    for (_, _, t0, l0), (_, _, t1, l1) in zip(curve, curve[1:]):
        if t0 <= seconds <= t1:
            return l0 + (l1 - l0) * (seconds - t0) / (t1 - t0) if t1 > t0 else l1
    return math.nan


# ---------------------------------------------------------------- the cost model
def ring_all_reduce_s(gradient_bytes: float, world: int, mbit: float, hop_latency_s: float = 50e-6) -> float:
    """Seconds of a ring all-reduce: ``2 (W - 1) / W`` of the bytes cross each link, and
    ``2 (W - 1)`` hops each pay the link latency."""
    if world < 2:
        return 0.0
    return 2 * (world - 1) / world * gradient_bytes * 8 / (mbit * 1e6) + 2 * (world - 1) * hop_latency_s


def model_seconds(policy, single: dict, world: int, mbit: float, gradient_bytes: float, tokens: int,
                  sequences_per_rank: int = 8, seq_len: int = 128):
    """Predicted ``(seconds, optimizer steps, windows)`` to consume ``tokens`` on ``world`` ranks
    drawing ``sequences_per_rank`` each per micro-step, from a single-process run's measured
    per-micro-step and optimizer-step seconds and its noise scale (samples) against tokens.
    ``policy``: a window length (fixed accumulation) or ``"goodput"``."""
    from gqc_dist.algorithms.goodput import goodput_draws

    c = single["costs"]["cost_micro_step_s"]
    t_opt = single["costs"]["cost_optimizer_step_s"]
    r = ring_all_reduce_s(gradient_bytes, world, mbit) + t_opt
    per_micro = world * sequences_per_rank * seq_len  # tokens of one global micro-step
    trajectory = [(t, b) for t, b in single["trajectory"] if b is not None]
    done, seconds, steps, windows = 0, 0.0, 0, {}
    while done < tokens:
        if policy == "goodput":
            # the noise scale at this point of the run, from the single run's micro-batches (one
            # rank's sequences) to this world's (world times as many)
            position = done / tokens * single["tokens"]
            b = next((b for t, b in trajectory if t >= position), trajectory[-1][1] if trajectory else None)
            b = None if b is None else b / world
            n = goodput_draws(b, c, r, 1, 32) or 1
        else:
            n = policy
        n = max(1, min(n, math.ceil((tokens - done) / per_micro)))
        seconds += n * c + r
        done += n * per_micro
        steps += 1
        windows[n] = windows.get(n, 0) + 1
    return seconds, steps, windows


def report() -> None:
    from gqc_dist.train.model import GPT, ModelConfig
    from gqc_dist.train.settings import DEFAULT_CONFIG

    gradient_bytes = 4 * sum(p.numel() for p in GPT(ModelConfig(**DEFAULT_CONFIG["model"])).parameters())
    single = json.loads((RESULTS / "single.json").read_text()) if (RESULTS / "single.json").exists() else None
    for link in LINKS:
        runs = {p.stem: json.loads(p.read_text()) for p in sorted((RESULTS / link).glob("*.json"))}
        if not runs:
            continue
        print(f"\n{link}: 2 hosts, {TOKENS:,} tokens, gradient {gradient_bytes / 2**20:.1f} MiB per all-reduce")
        print(f"{'arm':8} {'val loss':>8} {'seconds':>8} {'steps':>6} {'reduction/micro-step':>20} "
              f"{'windows taken':>28} {'model s':>8} {'model err':>9}")
        for arm, run in runs.items():
            costs = run["costs"]
            ratio = (costs["cost_reduction_s"] or 0) / costs["cost_micro_step_s"] if costs["cost_micro_step_s"] else math.nan
            windows = " ".join(f"{n}:{c}" for n, c in sorted(run["windows"].items(), key=lambda kv: int(kv[0]))[:6])
            predicted = math.nan
            if single:
                policy = "goodput" if arm == "goodput" else int(arm[5:])
                predicted = model_seconds(policy, single, 2, LINKS[link], gradient_bytes, TOKENS)[0]
            print(f"{arm:8} {run['val_loss']:8.4f} {run['wall_time']:8.1f} {run['optimizer_steps']:6d} "
                  f"{ratio:20.2f} {windows:>28} {predicted:8.1f} {100 * (predicted / run['wall_time'] - 1):+8.1f}%")
        if "goodput" in runs:
            g = runs["goodput"]
            for arm, run in runs.items():
                if arm == "goodput":
                    continue
                reach = seconds_to_reach(g["val_curve"], run["val_loss"])
                at = loss_at(g["val_curve"], run["wall_time"])
                print(f"  goodput reaches {arm}'s final {run['val_loss']:.4f} after {reach:.0f} s "
                      f"({reach / run['wall_time']:.2f}x its {run['wall_time']:.0f} s); at {run['wall_time']:.0f} s "
                      f"goodput's loss is {at:.4f}")
    if single:
        print("\ncost model: predicted seconds for the same micro-steps per rank (W/2 times the tokens), fixed k = 1 "
              "and the best fixed k against goodput")
        print(f"{'ranks':>6} {'Gbit/s':>7} {'fixed1 s':>9} {'best fixed':>14} {'goodput s':>10} {'goodput windows':>24}")
        for world in (8, 64, 1000):
            for gbit in (1, 10, 100):
                tokens = TOKENS * world // 2
                fixed = {k: model_seconds(k, single, world, gbit * 1000, gradient_bytes, tokens)[0] for k in (1, 2, 4, 8)}
                best = min(fixed, key=fixed.get)
                seconds, _, windows = model_seconds("goodput", single, world, gbit * 1000, gradient_bytes, tokens)
                common = " ".join(f"{n}:{c}" for n, c in sorted(windows.items())[:4])
                print(f"{world:6d} {gbit:7d} {fixed[1]:9.1f} {f'k={best} {fixed[best]:.1f}':>14} {seconds:10.1f} "
                      f"{common:>24}")
    plot()


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LINKS), figsize=(13, 4.5), squeeze=False)
    for ax, link in zip(axes[0], LINKS):
        for path in sorted((RESULTS / link).glob("*.json")):
            run = json.loads(path.read_text())
            curve = run["val_curve"]
            ax.plot([p[2] for p in curve], [p[3] for p in curve], "-" if run["arm"] == "goodput" else "--",
                    label=run["arm"])
        ax.set(xlabel="seconds", ylabel="val loss (nats/token)", title=f"2 hosts over {link}: loss against wall-clock")
        ax.grid(alpha=0.3)
        if ax.lines:
            low = min(min(line.get_ydata()) for line in ax.lines)
            ax.set_ylim(low - 0.05, low + 1.0)
            ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "goodput.png", dpi=90)
    print(f"\nwrote {HERE / 'goodput.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", nargs="+", default=list(LINKS), choices=list(LINKS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        run_single()
        for link in args.links:
            for arm in args.arms:
                run_two_hosts(link, arm)
    report()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
