"""``gqc-train sweep``: does GQC pay on my job? A fair A/B sweep, its progress and its report.

    gqc-train sweep my_sweep.json --jobs 4          # every (arm, seed) here, 4 at a time
    gqc-train sweep my_sweep.json --slurm --sbatch=--gres=gpu:1   # one Slurm array task per run
    gqc-train sweep my_sweep.json --report-only     # the report from what has finished
    gqc-train sweep configs/sweep_gpu.json --set data.path=/data/corpus.txt

The spec (:mod:`gqc_dist.sweep.spec`) names the base config, the arms, the seeds and the twins.
Finished runs are skipped, so rerunning the command resumes a killed sweep. The report goes to
``<results>/report.md`` and ``<results>/report.png`` and is printed.
"""

import argparse
import sys
from pathlib import Path

from gqc_dist.errors import GQCError
from gqc_dist.sweep import runs as R


def _parser():
    parser = argparse.ArgumentParser(prog="gqc-train sweep", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("spec", nargs="?", help="the sweep's spec file (JSON)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side on this machine (default 1)")
    parser.add_argument("--slurm", action="store_true", help="submit the unfinished runs as Slurm job arrays")
    parser.add_argument("--sbatch", action="append", default=[], metavar="ARG",
                        help="an extra sbatch argument for --slurm (repeat: --sbatch=--gres=gpu:1)")
    parser.add_argument("--report-only", action="store_true", help="report what has finished; run nothing")
    parser.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="append an override to the spec's base config")
    parser.add_argument("--results", help="the results folder instead of the spec's")
    parser.add_argument("--only", nargs="+", metavar="ARM@sSEED", help="run only these runs")
    parser.add_argument("--task", nargs=2, metavar=("LIST", "INDEX"), help=argparse.SUPPRESS)  # a Slurm task
    return parser


def _keys(spec, names):
    planned = spec.runs_planned()
    keys = []
    for name in names:
        arm, _, seed = name.rpartition("@s")
        if (arm, int(seed) if seed.isdigit() else -1) not in planned:
            raise GQCError(f"--only: {name!r} is not a run of this sweep (runs are ARM@sSEED, e.g. "
                           f"{R.run_name(planned[0])})")
        keys.append((arm, int(seed)))
    return keys


def report(spec, say=print) -> int:
    """Write and print the report; returns how many planned runs have neither record nor failure."""
    from gqc_dist.sweep.report import markdown, plot

    records = R.load_records(spec)
    failures = [f for f in R.load_failures(spec) if f["arm"] in spec.arms]
    settled = {(r["arm"], r["seed"]) for r in records} | {(f["arm"], f["seed"]) for f in failures}
    missing = [k for k in spec.runs_planned() if k not in settled]
    spec.results.mkdir(parents=True, exist_ok=True)
    png = plot(spec, records, spec.results / "report.png") if any(r["arm"] in spec.arms for r in records) else None
    text = markdown(spec, records, failures, missing, png)
    (spec.results / "report.md").write_text(text)
    say(text.rstrip())
    say(f"wrote {spec.results / 'report.md'}" + (f" and {png}" if png else ""))
    return len(missing)


def main(argv) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.task:
            from gqc_dist.sweep.slurm import run_task

            return run_task(Path(args.task[0]), int(args.task[1]))
        if not args.spec:
            raise GQCError("give the sweep's spec file (gqc-train sweep SPEC; see --help)")
        from gqc_dist.sweep.spec import load

        spec = load(args.spec, args.set, args.results)
        if args.jobs < 1:
            raise GQCError(f"--jobs must be >= 1, got {args.jobs}")
        if args.report_only:
            report(spec)
            return 0
        if args.slurm:
            from gqc_dist.sweep.slurm import submit

            spec_args = {"spec": str(Path(args.spec).resolve()), "set": args.set,
                         "results": None if args.results is None else str(Path(args.results).resolve())}
            submit(spec, spec_args, args.retry_failed, args.sbatch)
            return 0
        from gqc_dist.sweep.local import SweepStopped, main_line, run_local

        try:
            status = run_local(spec, _keys(spec, args.only) if args.only else None, args.jobs, args.retry_failed)
        except SweepStopped as stop:
            print(f"gqc-train sweep: {stop}", file=sys.stderr)
            return stop.code
        report(spec)
        print(main_line(spec, status))
        return 0
    except GQCError as error:
        print(f"gqc-train sweep: {error}", file=sys.stderr)
        return 2
