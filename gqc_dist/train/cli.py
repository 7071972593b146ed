"""``gqc-train``: train a byte-level GPT with GQC; ``gqc-train compare``: overlay runs;
``gqc-train sweep``: a fair A/B sweep against tuned fixed accumulation (``gqc_dist.sweep``).

    gqc-train                                  # the embedded default: one CPU process, ~4 min
    gqc-train --config configs/train_fsdp2.json             # under torchrun for ddp/fsdp2
    gqc-train --baseline 4 --out-dir runs/fixed4             # fixed accumulation, same data
    gqc-train --set gqc.max_draws=32 --set train.optimizer_steps=300
    gqc-train compare runs/gqc-train runs/fixed4 --out compare.png
    gqc-train sweep my_sweep.json --jobs 2                   # does it pay on my job?
"""

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

from gqc_dist.errors import GQCConfigError, GQCError
from gqc_dist.extras import require
from gqc_dist.train.settings import DEFAULT_CONFIG, ENGINES, apply_override, load_config, merge, validate


def _accumulation(text: str):
    """--baseline's K: an integer, or a number >= 1 such as 1.25 (a fixed pattern)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}") from None
    return int(value) if value.is_integer() else value


def _parser():
    parser = argparse.ArgumentParser(prog="gqc-train", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", help="JSON config (missing keys take the embedded defaults)")
    parser.add_argument("--engine", choices=ENGINES)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"],
                        help="auto (default): each rank on its LOCAL_RANK GPU when CUDA is present, else CPU")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default fp32")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: a table of GPUs)")
    parser.add_argument("--out-dir")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--optimizer-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--max-micro-steps", type=int, help="stop after this many micro-batches")
    parser.add_argument("--micro-batch-size", type=int, help="global sequences per micro-batch")
    parser.add_argument("--max-draws", type=int, help="GQC max micro-batches per step")
    parser.add_argument("--baseline", type=_accumulation, metavar="K",
                        help="fixed accumulation of K micro-batches per step instead of GQC (a fraction such as "
                             "1.25 is a fixed pattern with that mean)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and a few steps (smoke test, ~20 s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir from its latest checkpoint, with its own config")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out-dir")
    parser.add_argument("--collective-timeout", type=float, metavar="SECONDS",
                        help="fail any collective (and so a job with a stalled rank) after this long "
                             "(default 300; config train.collective_timeout_s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override any config key (value parsed as JSON)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser


QUICK = {"model": {"seq_len": 32, "dim": 32, "layers": 1, "heads": 2},
         "data": {"max_bytes": 300_000, "micro_batch_size": 8},
         "optimizer": {"warmup_steps": 2},
         "train": {"tokens": None, "optimizer_steps": 12, "max_micro_steps": 300, "eval_interval": 6,
                   "eval_batches": 2, "final_eval_batches": 4, "checkpoint_interval": 6}}


# What a resumed run may not change: it would no longer be the run its checkpoints belong to.
FIXED_ON_RESUME = ("engine", "seed", "model", "data", "optimizer", "gqc", "deepspeed")
# what a resumed run may change among them: the peak learning rate (the way on after a divergence;
# every step's rate is set from the config by the window hook, so the checkpoint holds none of it)
CHANGEABLE_ON_RESUME = ("optimizer.lr",)


def default_out_dir(args) -> str:
    """Runs of different kinds get different default directories, so one never lands on another."""
    if args.baseline is not None:
        return f"runs/fixed-{args.baseline}" + ("-quick" if args.quick else "")
    if args.quick:
        return "runs/gqc-train-quick"
    return DEFAULT_CONFIG["out_dir"]


def build_config(args) -> dict:
    """The validated config from defaults, --config, --quick, flags and --set (in that order).

    With ``--resume`` the run's own ``config.json`` takes the place of the defaults, and an
    override that would change its model, data, optimizer (but its peak ``optimizer.lr``),
    algorithm, engine or seed is refused naming the key.
    """
    if args.resume:
        from gqc_dist.train.run_dir import saved_config

        out_dir = Path(args.out_dir or default_out_dir(args))
        saved = validate(saved_config(out_dir))
        config = _overrides(args, saved)
        _check_unchanged(saved, config)
        return config
    base = {"out_dir": default_out_dir(args)}
    return _overrides(args, merge(QUICK, base) if args.quick else base)


def _check_unchanged(saved: dict, config: dict) -> None:
    changed = [(key, values) for key, values in _differences([saved, config])
               if key.split(".")[0] in FIXED_ON_RESUME and key not in CHANGEABLE_ON_RESUME]
    if changed:
        name, (old, new) = min(changed, key=lambda item: FIXED_ON_RESUME.index(item[0].split(".")[0]))
        raise GQCConfigError(f"--resume would change {name} from {old!r} to {new!r}: a resumed run keeps "
                             "the model, data, optimizer (but optimizer.lr), algorithm, engine and seed of its "
                             "config.json; start a new run with another --out-dir to change them")


def _overrides(args, config: dict) -> dict:
    """``config`` with --config, --quick (when resuming), the flags and --set applied, validated."""
    if args.config:
        config = merge(config, load_config(args.config))
    if args.quick and args.resume:
        config = merge(config, QUICK)
    flags = {"engine": args.engine, "out_dir": args.out_dir, "seed": args.seed, "device": args.device,
             "precision": args.precision}
    config = merge(config, {k: v for k, v in flags.items() if v is not None})
    train = {"optimizer_steps": args.optimizer_steps, "max_micro_steps": args.max_micro_steps,
             "collective_timeout_s": args.collective_timeout, "peak_tflops": args.peak_tflops}
    config = merge(config, {"train": {k: v for k, v in train.items() if v is not None}})
    if args.micro_batch_size is not None:
        config = merge(config, {"data": {"micro_batch_size": args.micro_batch_size}})
    if args.baseline is not None:
        config = {**config, "gqc": {"algorithm": "fixed", "accumulation_steps": args.baseline}}
    if args.max_draws is not None:
        config = apply_override(config, f"gqc.max_draws={args.max_draws}")
    for assignment in args.set:
        config = apply_override(config, assignment)
    return validate(config)


def compare_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="gqc-train compare",
                                     description="Overlay runs (loss vs tokens, draws per step) in one PNG")
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", default="compare.png")
    args = parser.parse_args(argv)
    try:
        require("matplotlib", "train", "the plot")
    except GQCError as error:
        print(f"gqc-train compare: {error}", file=sys.stderr)
        return 2
    from gqc_dist.train.plots import plot_compare

    configs = [_run_config(Path(run)) for run in args.runs]
    runs = [(f"{Path(run).name}: {_arm(config)}" if config else Path(run).name, Path(run) / "metrics.jsonl")
            for run, config in zip(args.runs, configs)]
    differ = _differences([c for c in configs if c], ignored=("gqc", "optimizer.lr", "out_dir"))
    if differ:  # a comparison of controllers should hold everything else equal
        print("gqc-train compare: warning: the runs differ in more than the controller: "
              + "; ".join(f"{key} {' / '.join(map(repr, values))}" for key, values in differ), file=sys.stderr)
    try:
        path = plot_compare(runs, args.out)
    except ValueError as error:
        print(f"gqc-train compare: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _run_config(run_dir: Path):
    """A run's ``config.json`` (``None`` if it has none or it is not a JSON object)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _arm(config: dict) -> str:
    """What a run compares: its controller (``fixed k=K`` for fixed accumulation) and learning rate."""
    gqc = config.get("gqc") or {}
    name = gqc.get("algorithm", "?")
    if name == "fixed":
        name = f"fixed k={gqc.get('accumulation_steps')}"
    return f"{name}, lr {config.get('optimizer', {}).get('lr')}"


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(configs, ignored=()) -> list:
    """``(dotted key, values)`` for every setting on which the configs differ (objects compared key
    by key), in key order; a key in ``ignored``, or under one, is left out."""
    flat = [_flat(config) for config in configs]
    keys = sorted(set().union(*flat)) if flat else []
    return [(key, values) for key in keys
            if not any(key == skip or key.startswith(skip + ".") for skip in ignored)
            for values in ([f.get(key) for f in flat],) if any(value != values[0] for value in values[1:])]


def _nccl_refused(error: RuntimeError) -> bool:
    """NCCL refused the call itself (its invalid-usage or invalid-argument codes, such as two
    ranks on one GPU): a setup error, whatever the other ranks do."""
    text = str(error).lower()
    return "nccl" in text and ("invalid usage" in text or "invalid argument" in text)


def _peer_lost(error: RuntimeError) -> bool:
    """A process-group collective gave up on a peer (gloo/NCCL timeout or a closed connection).
    Ask :func:`_nccl_refused` first: NCCL's own refusals are DistErrors too."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return dist.is_initialized() and any(s in text for s in ("timed out", "timeout", "connection closed",
                                                               "connection reset"))


def _collective_of(error: BaseException) -> str:
    """Which collective failed and where gqc-train called it, read off the traceback: the last
    torch.distributed frame names the collective, the last gqc_dist frame the call site."""
    frames = traceback.extract_tb(error.__traceback__)
    collective = next((f.name for f in reversed(frames) if "distributed_c10d" in f.filename), "a collective")
    site = next((f for f in reversed(frames) if "/gqc_dist/" in f.filename.replace("\\", "/")), None)
    where = f" in {Path(site.filename).name}:{site.name}" if site else ""
    return f"the {collective}{where}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    if argv[:1] == ["sweep"]:
        from gqc_dist.sweep.cli import main as sweep_main

        return sweep_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        for module in ("tqdm", "matplotlib"):  # the progress bar and training.png
            require(module, "train", "training")
        config = build_config(args)
    except GQCConfigError as error:
        print(f"gqc-train: config error: {error}", file=sys.stderr)
        return 2
    except GQCError as error:
        print(f"gqc-train: {error}", file=sys.stderr)
        return 2
    from gqc_dist.train import signals
    from gqc_dist.train.health import TrainDiverged
    from gqc_dist.train.run import train
    from gqc_dist.train.run_lock import release_all
    from gqc_dist.train.storage import cause_of

    restore_signals = signals.install()  # SIGTERM / SIGUSR1: checkpoint and stop at the next micro-step
    try:
        summary = train(config, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    except signals.RunStopped as stop:  # every rank agreed and saved; rank 0 says so
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"gqc-train: {stop}", file=sys.stderr)
        return stop.code
    except TrainDiverged as diverged:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"gqc-train: {diverged}", file=sys.stderr)
        return 4
    except GQCError as error:  # foreseeable: one line, no traceback
        print(f"gqc-train: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file operation outside the run's own writers (a plot, a corpus read)
        where = f" {error.filename}" if getattr(error, "filename", None) else ""
        print(f"gqc-train: file error{where}: {cause_of(error)}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if _nccl_refused(error):
            print(f"gqc-train: NCCL refused {_collective_of(error)} on rank {rank}: a setup error, not a lost "
                  f"peer; NCCL_DEBUG=WARN prints NCCL's reason ({str(error).splitlines()[0]})", file=sys.stderr)
            return 2
        if not _peer_lost(error):
            raise
        print(f"gqc-train: {_collective_of(error)} did not complete on rank {rank} (bound: "
              f"train.collective_timeout_s={config['train']['collective_timeout_s']:g} s): another rank is "
              f"stalled or gone ({str(error).splitlines()[0]})", file=sys.stderr)
        return 3
    finally:
        release_all()
        restore_signals()

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"validation loss {summary['val_loss']:.4f} nats/token | tokens seen {summary['tokens']:,} | "
              f"optimizer steps {summary['optimizer_steps']} | mean micro-batches per step "
              f"{summary['mean_micro_batches_per_step']:.2f} | {summary['wall_time']:.0f} s | "
              f"metrics, checkpoints and training.png in {summary['out_dir']}")
    if dist.is_initialized():
        import torch

        from gqc_dist.core import collectives

        collectives.barrier(torch.device(summary["device"]))  # rank 0 may still be plotting; tear down together
        dist.destroy_process_group()
    return 0


def entry() -> None:
    """The ``gqc-train`` command: :func:`main`, then exit without interpreter finalization.

    Gloo worker threads of process groups still referenced at exit (MoE expert groups live in
    the model) can free a collective's tensor after shutdown began and abort the rank
    ("terminate called without an active exception") after a finished run; every file is
    written and closed by then, so nothing is lost by skipping finalization.

    Under a launcher the process also asks to die with it (``signals.die_with_parent``): torchrun
    starts each rank in a session of its own, and a rank outliving a killed launcher would train
    on into the run directory. (Here, not in :func:`main`: an in-process caller keeps its own.)"""
    from gqc_dist.train import signals

    if signals.launched():
        signals.die_with_parent()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
