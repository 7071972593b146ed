"""One run of a sweep: its command, its process, and what it left (a result or a failure).

Files, per ``(arm, seed)`` named ``<arm>@s<seed>``:

* ``<results>/<arm>@s<seed>.json``: the compact record (:mod:`gqc_dist.sweep.records`), written
  atomically once the run finished: its presence is what "finished" means;
* ``<results>/<arm>@s<seed>.failed.json``: a run that ended without a result (diverged, out of
  memory, a crash), with the one line that says why; the sweep goes on and does not retry it
  unless asked (``--retry-failed``);
* ``<runs>/<arm>@s<seed>/``: the run directory, and ``<runs>/<arm>@s<seed>.log`` its output;
* ``<runs>/<arm>@s<seed>.lock``: held (``fcntl.lockf``, dropped by the kernel when the holder
  dies) by the process that runs it, so a local sweep and a Slurm task never run one run twice.

The command is gqc-train (under torchrun when ``nproc`` > 1), or the spec's ``command``
template for the user's own script, whose placeholders are :data:`TEMPLATE_FIELDS`:
``{out}`` (the run directory: the script writes ``sweep_result.json`` there with
:func:`gqc_dist.sweep.write_result`), ``{seed}``, ``{arm}``, ``{lr}`` (the rate of a step on one
micro-batch times ``sqrt(k)`` for a fixed arm: the rate that arm steps at), ``{lr_base}`` (the
spec's ``base_lr`` times the arm's multiplier), ``{k}`` (the fixed window, empty for a
controller), ``{gqc}`` (the arm's ``gradient_quality_control`` section as JSON: ``fixed`` with
``accumulation_steps`` k for a fixed arm), ``{python}`` (this interpreter).
"""

import ctypes
import errno
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from gqc_dist.errors import GQCConfigError
from gqc_dist.sweep.records import SCRIPT_RESULT, record_of_run, record_of_script, write_json
from gqc_dist.sweep.spec import TWIN_NUDGE, Arm, Spec
from gqc_dist.sweep.table import best_fixed_per_k, by_arm

TEMPLATE_FIELDS = ("out", "seed", "arm", "lr", "lr_base", "k", "gqc", "python")
Key = Tuple[str, int]


def run_name(key: Key) -> str:
    return f"{key[0]}@s{key[1]}"


def result_path(spec: Spec, key: Key) -> Path:
    return spec.results / f"{run_name(key)}.json"


def failure_path(spec: Spec, key: Key) -> Path:
    return spec.results / f"{run_name(key)}.failed.json"


def run_dir(spec: Spec, key: Key) -> Path:
    return spec.runs / run_name(key)


def load_records(spec: Spec) -> List[dict]:
    """Every finished run's record in the results folder (of any arm: earlier specs' too)."""
    if not spec.results.exists():
        return []
    return [json.loads(p.read_text()) for p in sorted(spec.results.glob("*@s*.json"))
            if not p.name.endswith(".failed.json")]


def load_failures(spec: Spec) -> List[dict]:
    return [json.loads(p.read_text()) for p in sorted(spec.results.glob("*.failed.json"))] \
        if spec.results.exists() else []


def k1_keys(spec: Spec) -> List[Key]:
    """The runs that decide what ``lr: "k1"`` stands for: fixed k = 1's seed-0 runs."""
    return [(a.name, 0) for a in spec.arms.values() if a.kind == "fixed" and a.k == 1 and 0 in a.seeds]


def settled(spec: Spec, key: Key) -> bool:
    return result_path(spec, key).exists() or failure_path(spec, key).exists()


def k1_multiplier(spec: Spec) -> Optional[float]:
    """The learning-rate multiplier ``"k1"`` stands for: pinned (``k1_lr``), or fixed k = 1's best
    arm in the results (lowest mean loss among those run on the most seeds); None while fixed
    k = 1's seed-0 runs are not all settled."""
    if spec.k1_lr is not None:
        return spec.k1_lr
    if not all(settled(spec, key) for key in k1_keys(spec)):
        return None
    best = best_fixed_per_k(by_arm(r for r in load_records(spec) if r["arm"] in spec.arms)).get(1)
    if best is None:
        raise GQCConfigError(f"sweep {spec.name}: every fixed k = 1 run failed (see {spec.results}/*.failed.json), "
                             "so lr \"k1\" has nothing to stand for: fix them, or pin \"k1_lr\" in the spec")
    return spec.arms[best].lr


def multiplier_of(spec: Spec, arm: Arm) -> Optional[float]:
    """The arm's learning-rate multiplier (a twin's is its arm's; the nudge is applied to the
    rate); None while ``"k1"`` is not known yet."""
    return k1_multiplier(spec) if arm.needs_k1 else arm.lr


def _gqc_section(arm: Arm) -> Optional[dict]:
    if arm.k is not None:  # fixed, or a fixed arm's twin
        return {"algorithm": "fixed", "accumulation_steps": int(arm.k) if float(arm.k).is_integer() else arm.k}
    return arm.gqc


def command_of(spec: Spec, arm: Arm, seed: int, multiplier: float) -> List[str]:
    """The command line of one run (gqc-train's, or the spec's template filled in)."""
    out = run_dir(spec, (arm.name, seed))
    lr_base = spec.base_lr * multiplier
    if arm.kind == "twin":
        lr_base *= 1 + TWIN_NUDGE
    section = _gqc_section(arm)
    if spec.command is not None:
        k = "" if arm.k is None else f"{arm.k:g}"
        values = {"out": str(out), "seed": seed, "arm": arm.name, "lr_base": repr(lr_base),
                  "lr": repr(lr_base * math.sqrt(arm.k or 1)), "k": k,
                  "gqc": json.dumps(section) if section is not None else "null", "python": sys.executable}
        return [part.format(**values) for part in spec.command]
    launcher = [sys.executable, "-m", "gqc_dist.train"]
    if spec.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(spec.nproc), "-m", "gqc_dist.train"]
    args = ["--no-progress", "--overwrite", "--out-dir", str(out), "--seed", str(seed)]
    if spec.base_config is not None:
        args += ["--config", str(spec.base_config)]
    overrides = list(spec.base_set) + [("optimizer.lr", lr_base)]
    if arm.k is not None:
        args += ["--baseline", f"{arm.k:g}"]
        overrides.append(("optimizer.lr_coupling", "sqrt"))  # the grid's rule: lr x sqrt(k)
    elif arm.gqc is not None:
        overrides.append(("gqc", arm.gqc))
    overrides += list(arm.overrides)
    for key, value in overrides:
        args += ["--set", f"{key}={json.dumps(value)}"]
    return launcher + args


def _die_with_parent() -> None:
    """In the child: SIGKILL when the sweep (or Slurm task) that started it dies, however it dies,
    so that a killed sweep leaves no run training on into a directory it will restart."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class RunClaimed(Exception):
    """Another process (a sweep, a Slurm task) is running this run now."""


def claim(spec: Spec, key: Key):
    """Hold ``<runs>/<arm>@s<seed>.lock`` for this process; :class:`RunClaimed` if another holds it."""
    spec.runs.mkdir(parents=True, exist_ok=True)
    fd = os.open(spec.runs / f"{run_name(key)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EACCES, errno.EAGAIN):
            raise RunClaimed(run_name(key)) from None
        raise
    return fd


@dataclass
class Running:
    """A started run: its key, process, log and start time (``fd``: its claim)."""

    key: Key
    fields: dict
    command: List[str]
    process: subprocess.Popen
    log: Path
    started: float
    fd: int


def start(spec: Spec, key: Key, multiplier: float, fd: int) -> Running:
    """Start one claimed run (its leftovers from a killed attempt are replaced)."""
    arm = spec.arms[key[0]]
    out = run_dir(spec, key)
    command = command_of(spec, arm, key[1], multiplier)
    if spec.command is not None:  # gqc-train replaces its own directory (--overwrite); a script may not
        out.mkdir(parents=True, exist_ok=True)
        (out / SCRIPT_RESULT).unlink(missing_ok=True)
    log = spec.runs / f"{run_name(key)}.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # not a launched rank: a sweep task under Slurm must not read its SLURM_PROCID as a rank
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, preexec_fn=_die_with_parent)
    fields = {"setting": spec.name, "arm": arm.name, "seed": key[1], "kind": arm.kind, "k": arm.k,
              "lr_multiplier": multiplier}
    return Running(key, fields, command, process, log, time.monotonic(), fd)


def _last_line(log: Path) -> str:
    """The line that says why a run ended: gqc-train's own one-liner, else the last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    own = [line for line in lines if line.startswith("gqc-train:")]
    return (own or lines or [""])[-1][:300]


def interrupted(returncode: int) -> bool:
    """The run was stopped by a signal (a killed or preempted sweep or task, the OOM killer):
    not a result of its arm, so it keeps no record and runs again when the sweep does."""
    return returncode < 0 or returncode in (128 + signal.SIGINT, 128 + signal.SIGKILL, 128 + signal.SIGTERM)


def failure_status(returncode: int, log: Path) -> str:
    """``diverged``, ``out of memory`` or ``failed``, from the exit code and the log."""
    text = log.read_text(errors="replace")[-20000:].lower() if log.exists() else ""
    if "out of memory" in text or "outofmemoryerror" in text:
        return "out of memory"
    if returncode == 4 or "diverged" in text:
        return "diverged"
    return "failed"


def finish(spec: Spec, running: Running) -> Tuple[str, dict]:
    """What a run that exited left: ``("done", record)`` written to the results folder,
    ``("failed", failure)`` written beside it, or ``("interrupted", info)`` (stopped by a signal:
    nothing written, it runs again). Releases the claim."""
    key, code = running.key, running.process.returncode
    out = run_dir(spec, key)
    try:
        outcome = None
        if interrupted(code):
            signum = -code if code < 0 else code - 128
            return ("interrupted", {"status": f"stopped by signal {signum}", "log": str(running.log),
                                    "line": "not kept: it runs again when the sweep does"})
        if code == 0:
            fields = record_of_script(out) if spec.command is not None else record_of_run(out)
            if fields is not None:
                record = {**running.fields, "command": " ".join(running.command[1:]), **fields}
                if record.get("wall_time") is None:
                    record["wall_time"] = round(time.monotonic() - running.started, 1)
                write_json(result_path(spec, key), record)
                failure_path(spec, key).unlink(missing_ok=True)
                outcome = ("done", record)
            else:
                line = (f"the command exited 0 without writing {SCRIPT_RESULT} into {{out}}: call "
                        "gqc_dist.sweep.write_result(out, val_loss, tokens, windows) at its end")
                outcome = ("failed", {"status": "no result", "line": line})
        if outcome is None:
            outcome = ("failed", {"status": failure_status(code, running.log), "line": _last_line(running.log)})
        if outcome[0] == "failed":
            failure = {"arm": key[0], "seed": key[1], "returncode": code, **outcome[1], "log": str(running.log)}
            write_json(failure_path(spec, key), failure)
            outcome = ("failed", failure)
        return outcome
    finally:
        os.close(running.fd)


def stop(running: List[Running], grace: float = 30.0) -> None:
    """SIGTERM every run (gqc-train checkpoints and exits), SIGKILL what is left after ``grace`` s."""
    for r in running:
        if r.process.poll() is None:
            r.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for r in running:
        try:
            r.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.process.kill()
            r.process.wait()
        os.close(r.fd)


def describe(outcome: Tuple[str, dict]) -> str:
    kind, info = outcome
    if kind == "done":
        return f"val loss {info['val_loss']:.4f} in {info['optimizer_steps']} steps ({info['wall_time']:.0f} s)"
    return f"{info['status']}: {info['line']} (log: {info['log']})"


def plan_status(spec: Spec, keys: List[Key], retry_failed: bool) -> Dict[str, List[Key]]:
    """``keys`` sorted into ``done``, ``failed`` (kept, not rerun) and ``todo``."""
    out: Dict[str, List[Key]] = {"done": [], "failed": [], "todo": []}
    for key in keys:
        if result_path(spec, key).exists():
            out["done"].append(key)
        elif failure_path(spec, key).exists() and not retry_failed:
            out["failed"].append(key)
        else:
            out["todo"].append(key)
    return out
