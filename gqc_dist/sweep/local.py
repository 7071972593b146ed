"""Running a sweep's runs on this machine, ``jobs`` at a time.

Finished runs are skipped (their record is in the results folder); a failed run is kept as
failed and not rerun unless ``retry_failed``; a run whose learning rate is ``"k1"`` waits until
fixed k = 1's seed-0 runs are settled. The results folder is held by one sweep at a time
(``<results>/.sweep.lock``, dropped by the kernel however the holder ends). SIGTERM or SIGINT stop
the runs in flight and keep everything finished; SIGKILL takes the runs in flight with it
(``PR_SET_PDEATHSIG``): rerunning the same command restarts them and nothing else.
"""

import errno
import fcntl
import json
import os
import signal
import socket
import time
from typing import Callable, Dict, List, Optional

from gqc_dist.errors import GQCError
from gqc_dist.sweep import runs as R
from gqc_dist.sweep.spec import Spec

LOCK_NAME = ".sweep.lock"


class SweepBusy(GQCError):
    """Another sweep holds the results folder."""


class SweepStopped(GQCError):
    """The sweep was asked to stop (``code``: 128 + the signal)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def hold_results(spec: Spec) -> int:
    """Lock the results folder for this process (released when it exits); :class:`SweepBusy`
    naming the holder if another sweep has it."""
    spec.results.mkdir(parents=True, exist_ok=True)
    fd = os.open(spec.results / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        holder = "another gqc-train sweep"
        for _ in range(20):  # the holder writes its record just after taking the lock
            try:
                owner = json.loads(os.pread(fd, 4096, 0).decode() or "null")
                holder = (f"gqc-train sweep pid {owner['pid']} on host {owner['host']} (started "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner['started']))})")
                break
            except (ValueError, TypeError, KeyError):
                time.sleep(0.05)
        os.close(fd)
        raise SweepBusy(f"{spec.results} is in use by {holder}: two sweeps on one results folder would run the "
                        "same runs twice; wait for it to end, or give this sweep another results folder "
                        "(--results DIR)") from None
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    return fd


class Progress:
    """One line per event: runs done, running, failed, to go, and the time left at this pace."""

    def __init__(self, name: str, total: int, done: int, failed: int, jobs: int, say: Callable[[str], None]):
        self.name, self.total, self.done, self.failed, self.jobs, self.say = name, total, done, failed, jobs, say
        self.durations: List[float] = []

    def line(self, running: int, event: str) -> None:
        left = self.total - self.done - self.failed
        eta = ""
        if self.durations and left:
            per_run = sum(self.durations) / len(self.durations)
            minutes = per_run * (left - running / 2) / max(1, min(self.jobs, left)) / 60
            eta = f", about {max(minutes, 0.1):.1f} min left"
        self.say(f"sweep {self.name}: {self.done}/{self.total} done, {running} running, {self.failed} failed, "
                 f"{left - running} to go{eta} | {event}")


def run_local(spec: Spec, keys: Optional[List[R.Key]] = None, jobs: int = 1, retry_failed: bool = False,
              say: Callable[[str], None] = print) -> Dict[str, List[R.Key]]:
    """Run ``keys`` (default: every run the spec plans) ``jobs`` at a time; returns the keys
    ``done``, ``failed`` and ``todo`` (not finished here: held by another process, or stopped by
    a signal). Raises :class:`SweepBusy`, :class:`SweepStopped`, or ``GQCError`` (lr ``"k1"``
    whose fixed k = 1 runs all failed or are not in ``keys``)."""
    keys = spec.runs_planned() if keys is None else keys
    lock = hold_results(spec)
    status = R.plan_status(spec, keys, retry_failed)
    todo = status["todo"]
    progress = Progress(spec.name, len(keys), len(status["done"]), len(status["failed"]), jobs, say)
    progress.line(0, f"{len(todo)} to run, {jobs} at a time; results in {spec.results}")
    running: List[R.Running] = []
    left: List[R.Key] = []  # not finished here: held by another process, or stopped by a signal
    stop_signal = []
    previous = {s: signal.signal(s, lambda signum, frame: stop_signal.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while todo or running:
            if stop_signal:
                R.stop(running)
                done = progress.done
                raise SweepStopped(f"sweep {spec.name} stopped by signal {stop_signal[0]}: {done} finished runs are "
                                   f"kept in {spec.results}; run the same command to go on ({len(running)} in "
                                   "flight will restart)", 128 + stop_signal[0])
            started = False
            for key in list(todo):
                if len(running) >= jobs:
                    break
                multiplier = R.multiplier_of(spec, spec.arms[key[0]])
                if multiplier is None:
                    continue  # waits for fixed k = 1's seed-0 runs
                try:
                    fd = R.claim(spec, key)
                except R.RunClaimed:
                    continue  # another process runs it; checked again below
                todo.remove(key)
                if R.result_path(spec, key).exists():  # finished by another process meanwhile
                    os.close(fd)
                    progress.done += 1
                    continue
                running.append(R.start(spec, key, multiplier, fd))
                progress.line(len(running), f"started {R.run_name(key)}")
                started = True
            for r in [r for r in running if r.process.poll() is not None]:
                running.remove(r)
                outcome = R.finish(spec, r)
                if outcome[0] == "done":
                    progress.done += 1
                    progress.durations.append(time.monotonic() - r.started)
                elif outcome[0] == "failed":
                    progress.failed += 1
                else:  # stopped by a signal from outside: it runs again next time, not now
                    left.append(r.key)
                if outcome[0] != "interrupted":
                    status[outcome[0]].append(r.key)
                progress.line(len(running), f"{R.run_name(r.key)}: {R.describe(outcome)}")
            if not running and todo and not started:
                # nothing can start: the rest is held by other processes, or waits for fixed k = 1
                waiting = [k for k in todo if not R.settled(spec, k)]
                k1_open = [k for k in R.k1_keys(spec) if not R.settled(spec, k)]
                if not any(_claimed(spec, k) for k in k1_open) and all(_claimed(spec, k) for k in waiting):
                    left += waiting
                    progress.done += len(todo) - len(waiting)
                    break
                if k1_open and not any(k in todo or _claimed(spec, k) for k in k1_open):
                    raise GQCError(f"sweep {spec.name}: the controllers at lr \"k1\" wait for fixed k = 1's seed-0 "
                                   f"runs {', '.join(map(R.run_name, k1_open))}, which this sweep does not run: "
                                   "include them")
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(lock)
    status["todo"] = left
    return status


def _claimed(spec: Spec, key: R.Key) -> bool:
    try:
        os.close(R.claim(spec, key))
        return False
    except R.RunClaimed:
        return True


def main_line(spec: Spec, status: Dict[str, List[R.Key]]) -> str:
    text = f"sweep {spec.name}: {len(status['done'])} done, {len(status['failed'])} failed"
    if status["todo"]:
        text += (f", {len(status['todo'])} not finished here (held by another sweep or Slurm task, or stopped by a "
                 "signal: run the sweep again)")
    return text
