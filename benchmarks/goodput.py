"""Wall-clock where communication is the bottleneck: the cost-aware rule (``goodput``) against
fixed accumulation under DDP's ``no_sync``, on two hosts joined by a shaped link.

    sudo python benchmarks/goodput.py                  # both links, every arm (~40 min on 2 quiet cores)
    python benchmarks/goodput.py --report-only         # tables, cost model and PNG from results/goodput

Two network namespaces act as two hosts (tests/virtual_cluster.py), each running one gqc-train
rank (torchrun, static rendezvous) of the main job's model on DDP with rank-local accumulation:
each rank draws 1 of the 2 sequences of a global micro-batch (the regime where the noise scale
is well above the micro-batch and accumulating can pay; with the main job's 16 sequences it is
below one micro-batch and the best window is one whatever the link), gradients stay local
between steps and are all-reduced once per window (DDP's ``no_sync``, what users do for
accumulation today). The link between the hosts is shaped with ``tc tbf`` to 100 Mbit/s (one
all-reduce of the 2.6 MB gradient costs several micro-steps) and to 1 Gbit/s (about one).
Arms: fixed k = 1, 2, 4, 8 micro-batches per step (learning rate coupled by the square-root
rule, as gqc-train does) and the goodput rule. Every run consumes the same tokens in the same
order. Figures: wall-clock to reach each fixed run's final loss, loss at equal wall-clock,
a plot of loss against seconds.

The cost model (``model_seconds``) replays a single-process run of the same per-rank work (a
micro-step's and a step's own seconds fitted to its windows, ``fit_window_seconds``, and its
noise-scale trajectory in samples) at
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

SEQUENCES = 2  # global sequences per micro-batch: one per rank
TOKENS = 2000 * SEQUENCES * 128  # 2000 global micro-batches
COMMON = ["--set", f"train.tokens={TOKENS}", "--set", "train.optimizer_steps=10000000",
          "--set", "train.max_micro_steps=10000000", "--set", "train.checkpoint_interval=10000000",
          "--set", "train.eval_interval=25", "--set", f"data.micro_batch_size={SEQUENCES}", "--no-progress"]
_GOODPUT = ["--set", 'gqc={"algorithm": "goodput", "max_draws": 32, "local_accumulation": true}']
ARMS = {**{f"fixed{k}": ["--baseline", str(k), "--set", "gqc.local_accumulation=true"] for k in (1, 2, 4, 8)},
        "goodput": _GOODPUT,
        # larger windows end a shared token budget at a higher loss: given 3x the tokens, when does the
        # rule reach fixed k = 1's final loss?
        "goodput-3x": _GOODPUT + ["--set", f"train.tokens={3 * TOKENS}"]}
# Mbit/s; None: the veth pair unshaped (10-31 Gbit/s measured here), the "fast link" where a
# reduction costs a fraction of a micro-step
LINKS = {"100mbit": 100, "1gbit": 1000, "unshaped": None}


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
        if LINKS[link]:
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


PROBE = """
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
small, big = torch.zeros(9, dtype=torch.float64), torch.zeros(int(sys.argv[1]) // 4)
for tensor, count in ((small, 20), (big, 2)):  # warm up
    for _ in range(count):
        dist.all_reduce(tensor)
times = {}
for name, tensor, count in (("small_all_reduce_s", small, 300), ("gradient_all_reduce_s", big, 10)):
    dist.barrier()
    start = time.perf_counter()
    for _ in range(count):
        dist.all_reduce(tensor)
    times[name] = (time.perf_counter() - start) / count
if dist.get_rank() == 0:
    print(repr(times))
dist.destroy_process_group()
"""


def measure_link(link: str, gradient_bytes: int) -> Path:
    """The shaped link's own figures, the cost model's inputs: the mean seconds of a 9-value
    all-reduce (the packet: latency) and of one of the gradient's size, between the two hosts."""
    from virtual_cluster import VirtualHosts

    result = RESULTS / link / "link.json"
    if result.exists():
        return result
    hosts = VirtualHosts(2).start()
    try:
        if LINKS[link]:
            hosts.shape(LINKS[link])
        procs = [subprocess.Popen(hosts.command(rank, [sys.executable, "-c", PROBE, gradient_bytes]),
                                  env={**_env(), "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": hosts.addresses[0],
                                       "MASTER_PORT": "29511"}, stdout=subprocess.PIPE, text=True)
                 for rank in range(2)]
        out = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        hosts.stop()
    figures = eval(out[0].strip().splitlines()[-1])  # noqa: S307 -- our own probe's repr of a dict of floats
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps({"link": link, "mbit": LINKS[link], **figures}) + "\n")
    return result


def gradient_size() -> int:
    """Bytes of the main job's fp32 gradient."""
    from gqc_dist.train.model import GPT, ModelConfig
    from gqc_dist.train.settings import DEFAULT_CONFIG

    return 4 * sum(p.numel() for p in GPT(ModelConfig(**DEFAULT_CONFIG["model"])).parameters())


def run_single() -> Path:
    """The single-process run the cost model replays: one rank's work (one sequence per
    micro-step), the default controller (its probes measure the noise scale), with an identical
    run beside it."""
    result = RESULTS / "single.json"
    if result.exists():
        return result
    # the two hosts share this machine's cores: a twin run beside it loads them as the two ranks do
    out = OUT / "single"
    procs = [subprocess.Popen([sys.executable, "-m", "gqc_dist.train", "--overwrite", "--out-dir", str(folder),
                               *COMMON, "--set", f"train.tokens={TOKENS // 2}",
                               "--set", f"data.micro_batch_size={SEQUENCES // 2}"],
                              env=_env(), stdout=subprocess.DEVNULL)
             for folder in (out, OUT / "single-twin")]
    if any(p.wait() for p in procs):
        raise RuntimeError("the single-process reference run failed")
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

    train_s = training_seconds(records)
    record = {**fields, "val_loss": summary["val_loss"], "wall_time": round(train_s[-1], 2),
              "wall_time_with_evaluation": round(summary["wall_time"], 2),
              "fit": fit_window_seconds(records),
              "optimizer_steps": summary["optimizer_steps"], "micro_steps": summary["micro_steps"],
              "tokens": summary["tokens"], "windows": windows,
              "costs": {key: late_mean(key) for key in ("cost_micro_step_s", "cost_reduction_s", "cost_optimizer_step_s")},
              "noise_scale_second_half": late_mean("noise_scale"),
              "val_curve": [[r["tokens"], r["step"], round(t, 2), round(r["val_loss"], 5)]
                            for r, t in zip(records, train_s) if r["kind"] == "val"],
              # per step: tokens consumed, noise scale (micro-batches): the cost model's trajectory
              "trajectory": [[r["tokens"], r.get("noise_scale")] for r in steps[::max(1, len(steps) // 200)]]}
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    return result


def training_seconds(records):
    """Per record, the seconds of training so far: its wall time less the evaluations before it
    (an evaluation's pause: its record's time less the step record's before it). Evaluation
    runs every 25 steps, so it would weigh 8x more on k = 1 than on k = 8; the cost model
    predicts training alone."""
    out, paused, last_step = [], 0.0, 0.0
    for r in records:
        if r["kind"] == "val":  # the model as the last step left it, after as much training
            out.append(last_step - paused)
            paused += r["wall_time"] - last_step
        else:
            out.append(r["wall_time"] - paused)
            last_step = r["wall_time"]
    return out


def fit_window_seconds(records):
    """``{"micro_step_s": c, "step_s": r0}`` fitted to a run's steps by least squares,
    ``seconds of a window of n = n c + r0``, leaving out windows an evaluation interrupted (the
    host loop's pause is not training's); ``None`` with fewer than two window lengths."""
    rows, previous, evaluated = [], None, False
    for r in records:
        if r["kind"] == "val":
            evaluated = True
        elif r["kind"] == "step":
            if previous is not None and not evaluated:
                rows.append((r["draws"], r["wall_time"] - previous))
            previous, evaluated = r["wall_time"], False
    if len({n for n, _ in rows}) < 2:
        return None
    count = len(rows)
    sn, st = sum(n for n, _ in rows), sum(t for _, t in rows)
    snn, snt = sum(n * n for n, _ in rows), sum(n * t for n, t in rows)
    c = (count * snt - sn * st) / (count * snn - sn * sn)
    return {"micro_step_s": c, "step_s": (st - c * sn) / count}


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
def ring_all_reduce_s(gradient_bytes: float, world: int, mbit: float, hop_latency_s: float) -> float:
    """Seconds of a ring all-reduce: ``2 (W - 1) / W`` of the bytes cross each link, and
    ``2 (W - 1)`` hops each pay the link latency."""
    if world < 2:
        return 0.0
    return 2 * (world - 1) / world * gradient_bytes * 8 / (mbit * 1e6) + 2 * (world - 1) * hop_latency_s


def link_mbit(link: dict, gradient_bytes: float) -> float:
    """The link's bandwidth in Mbit/s: its shaping, or for an unshaped link the one its measured
    gradient all-reduce implies under the ring model (2 ranks: the bytes once, plus 2 hops)."""
    if link["mbit"]:
        return link["mbit"]
    return gradient_bytes * 8 / (link["gradient_all_reduce_s"] - 2 * hop_latency_s(link)) / 1e6


def hop_latency_s(link: dict) -> float:
    """Per-hop latency from a measured 9-value all-reduce on 2 ranks (2 hops)."""
    return link["small_all_reduce_s"] / 2


def model_seconds(policy, single: dict, world: int, mbit: float, gradient_bytes: float, tokens: int,
                  hop_s: float, sequences_per_rank: int = SEQUENCES // 2, seq_len: int = 128):
    """Predicted ``(seconds, optimizer steps, windows)`` to consume ``tokens`` on ``world`` ranks
    drawing ``sequences_per_rank`` each per micro-step: a micro-step costs the single-process
    run's fitted compute plus the packet's all-reduce (``2 log2 W`` hops of ``hop_s``: small
    all-reduces take a tree or halving-doubling, not the ring), a step
    its fitted own work plus the ring all-reduce of the gradient and the exact packet's re-read.
    The goodput rule's windows come from the single run's noise scale (samples) against tokens.
    ``policy``: a window length (fixed accumulation) or ``"goodput"``."""
    from gqc_dist.algorithms.goodput import goodput_draws

    packet = 2 * math.ceil(math.log2(world)) * hop_s if world > 1 else 0.0  # a small all-reduce: a tree
    c = single["fit"]["micro_step_s"] + packet
    r = single["fit"]["step_s"] + ring_all_reduce_s(gradient_bytes, world, mbit, hop_s) + packet
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


def fmt_s(seconds: float) -> str:
    return "never (not within its budget)" if seconds != seconds else f"{seconds:.0f} s"


def fmt_ratio(ratio: float) -> str:
    return "-" if ratio != ratio else f"{ratio:.2f}x"


def report() -> None:
    gradient_bytes = gradient_size()
    single = json.loads((RESULTS / "single.json").read_text()) if (RESULTS / "single.json").exists() else None
    for link in LINKS:
        runs = _runs(link)
        if not runs or not (RESULTS / link / "link.json").exists():
            continue
        measured = json.loads((RESULTS / link / "link.json").read_text())
        hop, mbit = hop_latency_s(measured), link_mbit(measured, gradient_bytes)
        print(f"\n{link} ({mbit:.0f} Mbit/s): 2 hosts, {TOKENS:,} tokens, gradient {gradient_bytes / 2**20:.1f} MiB per all-reduce; "
              f"measured: 9-value all-reduce {1e3 * measured['small_all_reduce_s']:.2f} ms, gradient all-reduce "
              f"{1e3 * measured['gradient_all_reduce_s']:.0f} ms (ring model "
              f"{1e3 * ring_all_reduce_s(gradient_bytes, 2, mbit, hop):.0f} ms)")
        print(f"{'arm':8} {'val loss':>8} {'seconds':>8} {'steps':>6} {'reduction/micro-step':>20} "
              f"{'windows taken':>28} {'model s':>8} {'model err':>9}")
        for arm, run in runs.items():
            costs = run["costs"]
            ratio = (costs["cost_reduction_s"] or 0) / costs["cost_micro_step_s"] if costs["cost_micro_step_s"] else math.nan
            windows = " ".join(f"{n}:{c}" for n, c in sorted(run["windows"].items(), key=lambda kv: int(kv[0]))[:6])
            predicted = math.nan
            if single:
                policy = "goodput" if arm.startswith("goodput") else int(arm[5:])
                predicted = model_seconds(policy, single, 2, mbit, gradient_bytes, run["tokens"], hop)[0]
            print(f"{arm:8} {run['val_loss']:8.4f} {run['wall_time']:8.1f} {run['optimizer_steps']:6d} "
                  f"{ratio:20.2f} {windows:>28} {predicted:8.1f} {100 * (predicted / run['wall_time'] - 1):+8.1f}%")
        for name in ("goodput", "goodput-3x"):
            if name not in runs:
                continue
            g, fixed = runs[name], {arm: run for arm, run in runs.items() if arm.startswith("fixed")}
            ends = g["wall_time"]
            at_end = {arm: loss_at(run["val_curve"], ends) if run["wall_time"] > ends else run["val_loss"]
                      for arm, run in fixed.items()}
            best = min(at_end, key=at_end.get) if at_end else None
            print(f"  {name} ends at {g['val_loss']:.4f} after {ends:.0f} s; at {ends:.0f} s the fixed runs are at "
                  + ", ".join(f"{arm} {loss:.4f}" for arm, loss in at_end.items())
                  + (f" (best {best})" if best else ""))
            for arm, run in fixed.items():
                reach = seconds_to_reach(g["val_curve"], run["val_loss"])
                print(f"    {name} reaches {arm}'s final {run['val_loss']:.4f} after {fmt_s(reach)} "
                      f"({fmt_ratio(reach / run['wall_time'])} of its {run['wall_time']:.0f} s)")
    print("\nTargets:")
    for line in targets(gradient_bytes, single):
        print("  " + line)
    if single and (RESULTS / "1gbit" / "link.json").exists():
        hop = hop_latency_s(json.loads((RESULTS / "1gbit" / "link.json").read_text()))
        print(f"\ncost model: predicted training seconds for the same micro-steps per rank (W/2 times the tokens; "
              f"{1e6 * hop:.0f} us per hop, as measured on the 1 Gbit/s link). Fixed k > 1 ends at a higher loss "
              "at equal tokens (the shaped runs' losses above); goodput weighs that from the noise scale")
        print(f"{'ranks':>6} {'Gbit/s':>7} {'reduction/micro':>15} {'fixed1 s':>9} {'fixed2 s':>9} {'fixed8 s':>9} "
              f"{'goodput s':>10} {'goodput windows':>24}")
        c = single["fit"]["micro_step_s"]
        for world in (8, 64, 1000):
            for gbit in (1, 10, 100):
                tokens = TOKENS * world // 2
                fixed = {k: model_seconds(k, single, world, gbit * 1000, gradient_bytes, tokens, hop)[0]
                         for k in (1, 2, 8)}
                seconds, _, windows = model_seconds("goodput", single, world, gbit * 1000, gradient_bytes, tokens, hop)
                common = " ".join(f"{n}:{c}" for n, c in sorted(windows.items())[:4])
                ratio = ring_all_reduce_s(gradient_bytes, world, gbit * 1000, hop) / c
                print(f"{world:6d} {gbit:7d} {ratio:15.2f} {fixed[1]:9.1f} {fixed[2]:9.1f} {fixed[8]:9.1f} "
                      f"{seconds:10.1f} {common:>24}")
    plot()


def _runs(link: str) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted((RESULTS / link).glob("*.json")) if p.stem != "link"}


def targets(gradient_bytes: int, single) -> list:
    """The issue's three targets, each a line saying met or missed with its numbers."""
    out = []
    slow = _runs("100mbit")
    if {"fixed1", "goodput", "goodput-3x"} <= set(slow):
        k1, g3, g = slow["fixed1"], slow["goodput-3x"], slow["goodput"]
        reach = seconds_to_reach(g3["val_curve"], k1["val_loss"]) / k1["wall_time"]
        fixed_at = {a: loss_at(r["val_curve"], g["wall_time"]) if r["wall_time"] > g["wall_time"] else r["val_loss"]
                    for a, r in slow.items() if a.startswith("fixed")}
        best = min(fixed_at, key=fixed_at.get)
        out.append(f"slow link (100 Mbit/s): reaches fixed1's final loss in {fmt_ratio(reach)} its wall-clock "
                   f"(target <= 0.70x): {'met' if reach <= 0.7 else 'missed'}; at its end ({g['wall_time']:.0f} s) "
                   f"{g['val_loss']:.4f} against the best fixed there ({best}) {fixed_at[best]:.4f}: "
                   f"{'met' if g['val_loss'] <= fixed_at[best] else 'missed'}")
    fast = _runs("unshaped")
    if "goodput" in fast and any(a.startswith("fixed") for a in fast):
        g = fast["goodput"]
        best = min((a for a in fast if a.startswith("fixed")), key=lambda a: fast[a]["val_loss"])
        gap = g["val_loss"] / fast[best]["val_loss"] - 1
        slower = g["wall_time"] / fast[best]["wall_time"]
        out.append(f"fast link (unshaped): at equal tokens {100 * gap:+.2f}% against the best fixed ({best}), "
                   f"{slower:.2f}x its wall-clock (target within 1% and not slower): "
                   f"{'met' if gap <= 0.01 and slower <= 1.0 else 'missed'}")
    if single:
        errors = []
        for link in LINKS:
            if not (RESULTS / link / "link.json").exists():
                continue
            measured = json.loads((RESULTS / link / "link.json").read_text())
            hop, mbit = hop_latency_s(measured), link_mbit(measured, gradient_bytes)
            for arm, run in _runs(link).items():
                policy = "goodput" if arm.startswith("goodput") else int(arm[5:])
                predicted = model_seconds(policy, single, 2, mbit, gradient_bytes, run["tokens"], hop)[0]
                errors.append((abs(predicted / run["wall_time"] - 1), f"{link} {arm}"))
        if errors:
            worst = max(errors)
            within = sum(e <= 0.15 for e, _ in errors)
            out.append(f"cost model: {within} of {len(errors)} shaped runs within 15%, worst {100 * worst[0]:.0f}% "
                       f"({worst[1]}): {'met' if within == len(errors) else 'missed'}")
    return out


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LINKS), figsize=(13, 4.5), squeeze=False)
    for ax, link in zip(axes[0], LINKS):
        for run in _runs(link).values():
            curve = run["val_curve"]
            ax.plot([p[2] for p in curve], [p[3] for p in curve], "-" if run["arm"].startswith("goodput") else "--",
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
            measure_link(link, gradient_size())
            for arm in args.arms:
                run_two_hosts(link, arm)
    report()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
