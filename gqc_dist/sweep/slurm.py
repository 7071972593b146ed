"""A sweep as Slurm job arrays: one run per array task, with the job's own resources.

``gqc-train sweep SPEC --slurm`` writes the runs not yet finished into a task list
(``<results>/slurm/tasks-<stamp>.json``) and an sbatch script beside it, and submits it with
``sbatch --array=0-(n-1)``; controllers at lr ``"k1"`` go into a second array that starts after
the first (``--dependency=afterany``), once fixed k = 1's seed-0 runs are settled. Each task runs
``gqc-train sweep --task LIST INDEX``: the same code as a local sweep's run (claim, run, record),
so the results folder must be on a file system every node mounts. A task that is cancelled,
preempted or killed leaves no record (SIGTERM stops its run first): ``--report-only`` lists it
as missing, and submitting again runs only what is missing. Extra ``sbatch`` arguments (GPUs,
time, partition) come from the spec's ``slurm.sbatch`` and ``--sbatch``.
"""

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from gqc_dist.errors import GQCError
from gqc_dist.sweep import runs as R
from gqc_dist.sweep.local import hold_results
from gqc_dist.sweep.spec import Spec, load


def _script(spec: Spec, tasks: Path, count: int) -> str:
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name=gqc-sweep-{spec.name}",
        f"#SBATCH --array=0-{count - 1}",
        "# task logs: sbatch --output=<results>/slurm/%A_%a.out, given on its command line (any path)",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={spec.nproc}",
        "# one run of the sweep per array task (gqc_dist.sweep.slurm)",
        f"exec {shlex.quote(sys.executable)} -m gqc_dist.train sweep --task {shlex.quote(str(tasks))} "
        '"$SLURM_ARRAY_TASK_ID"', ""])


def _sbatch(script: Path, extra: Sequence[str], env: Optional[dict]) -> str:
    try:
        done = subprocess.run(["sbatch", "--parsable", *extra, str(script)], capture_output=True, text=True,
                              env=env, check=False)
    except FileNotFoundError:
        raise GQCError("sbatch is not on PATH: --slurm submits from a Slurm login node") from None
    if done.returncode != 0:
        raise GQCError(f"sbatch refused the sweep's array ({script}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def submit(spec: Spec, spec_args: dict, retry_failed: bool = False, sbatch_args: Sequence[str] = (),
           say: Callable[[str], None] = print, env: Optional[dict] = None) -> List[str]:
    """Submit the runs not yet finished as one or two job arrays; returns the job ids."""
    lock = hold_results(spec)  # not while a local sweep runs on the same folder
    try:
        todo = R.plan_status(spec, spec.runs_planned(), retry_failed)["todo"]
        if retry_failed:
            for key in todo:
                R.failure_path(spec, key).unlink(missing_ok=True)
        if not todo:
            say(f"sweep {spec.name}: nothing to submit, every run is finished or failed (--retry-failed reruns "
                "the failed ones)")
            return []
        k1_known = R.k1_multiplier(spec) is not None
        waves = [[k for k in todo if k1_known or not spec.arms[k[0]].needs_k1],
                 [k for k in todo if not k1_known and spec.arms[k[0]].needs_k1]]
        folder = spec.results / "slurm"
        folder.mkdir(parents=True, exist_ok=True)
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"  # unique: earlier tasks read theirs
        jobs: List[str] = []
        for i, wave in enumerate(w for w in waves if w):
            tasks = folder / f"tasks-{stamp}-{i}.json"
            tasks.write_text(json.dumps({**spec_args, "runs": [list(k) for k in wave]}) + "\n")
            script = folder / f"array-{stamp}-{i}.sbatch"
            script.write_text(_script(spec, tasks, len(wave)))
            after = [f"--dependency=afterany:{jobs[-1]}"] if jobs else []
            logs = f"--output={folder / '%A_%a.out'}"  # an argument, not a directive: any path
            jobs.append(_sbatch(script, [logs, *spec.sbatch, *sbatch_args, *after], env))
            say(f"sweep {spec.name}: submitted job array {jobs[-1]} ({len(wave)} runs{', after ' + jobs[-2] if after else ''}"
                f"); `gqc-train sweep {spec_args['spec']} --report-only` merges what has finished")
        return jobs
    finally:
        os.close(lock)


def run_task(tasks: Path, index: int, say: Callable[[str], None] = print) -> int:
    """One array task: run ``tasks``' run number ``index`` and keep its record (or its failure)."""
    listing = json.loads(Path(tasks).read_text())
    spec = load(listing["spec"], listing.get("set", ()), listing.get("results"))
    key = tuple(listing["runs"][index])
    key = (key[0], int(key[1]))
    name = R.run_name(key)
    if R.result_path(spec, key).exists():
        say(f"sweep task: {name} already finished")
        return 0
    try:
        fd = R.claim(spec, key)
    except R.RunClaimed:
        say(f"sweep task: {name} is running in another process (a sweep or task): nothing to do")
        return 0
    multiplier = R.multiplier_of(spec, spec.arms[key[0]])
    if multiplier is None:
        os.close(fd)
        say(f"sweep task: {name} runs at fixed k = 1's best rate, but fixed k = 1's seed-0 runs have not finished")
        return 1
    stopped = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    running = R.start(spec, key, multiplier, fd)
    try:
        while running.process.poll() is None and not stopped:
            time.sleep(0.2)
        # Slurm signals every process of the task, the run too: it may have ended (stopped by that
        # SIGTERM, exit 143) before this loop saw the signal, and must not be kept as failed then;
        # a run that finished (exit 0) just before keeps its record
        if stopped and running.process.poll() != 0:  # scancel, preemption, the time limit: keep no record
            R.stop([running])
            say(f"sweep task: {name} stopped by SIGTERM (cancelled or preempted): no record kept; "
                "submit the sweep again to run it")
            return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    outcome = R.finish(spec, running)
    say(f"sweep task: {name}: {R.describe(outcome)}")
    return 0 if outcome[0] == "done" else 1
