"""Faults users meet with gqc-train, as a user meets them: real processes, real files, real signals.

* A full disk at a checkpoint write and at a metrics write, a read-only run directory: one
  ``gqc-train:`` line naming the path and the cause, a non-zero exit, the last complete checkpoint
  named by ``latest`` and intact, and ``--resume`` (once the cause is gone) ending exactly as the
  uninterrupted run. Needs root (a small tmpfs); skipped, saying why, without it.
* Starts into one directory: exactly one runs; the other is refused with one line naming the
  directory (and, while it runs, the running process); nothing of the two runs is mixed.
* A diverging run stops within its non-finite-window bound: non-zero, one line (what, since
  when, the last good checkpoint, the fix), strict JSON, no checkpoint written after it diverged.
  The checkpoint it names is one a window after it stepped from with a finite loss (not the one
  taken just before the windows went non-finite), ``latest`` names it, ``--resume`` continues
  from it, and the fix the line gives, run as written, trains to its end.
* A 2-rank job whose launcher is SIGKILLed: every rank is gone within seconds and writes nothing
  more; the directory is free again.
* SIGTERM / SIGUSR1 to one process, SIGTERM to one rank of a 2-rank job: a checkpoint at that
  micro-step, a clear line, and ``--resume`` then equals the uninterrupted run bitwise (CPU fp32:
  every metrics record, the final validation loss and the final parameters).

The oracle is always an uninterrupted run of the same command.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed_harness import children, launched, torchrun_command
from train_runs import ENV, records, summary

PAGE = 4096
QUICK = ["--quick", "--no-progress"]
SHORT = [*QUICK, "--set", "train.optimizer_steps=18", "--set", "train.max_micro_steps=2000",
         "--set", "train.checkpoint_interval=6"]
# long enough that a test can act while the run trains (it is stopped, not waited for)
LONG = [*QUICK, "--set", "train.optimizer_steps=100000", "--set", "train.max_micro_steps=1000000",
        "--set", "train.checkpoint_interval=100000", "--set", "train.eval_interval=100000"]


def command(*args, nproc=None):
    if nproc:
        return torchrun_command(nproc, "-m", "gqc_dist.train", *map(str, args))
    return [sys.executable, "-m", "gqc_dist.train", *map(str, args)]


def run(*args, nproc=None, timeout=300):
    """A gqc-train run to its end: the CompletedProcess."""
    with launched(command(*args, nproc=nproc), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True) as process:
        out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def one_line(stderr: str) -> str:
    """The run's single ``gqc-train:`` line (and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("gqc-train: "), stderr[-3000:]
    return lines[0]


def final_parameters(out: Path):
    """The model state of the run's final checkpoint (rank 0)."""
    folder = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    return torch.load(folder / "rank0.pt", weights_only=True)["engine"]["model"]


def assert_bitwise_equal_runs(reference: Path, other: Path) -> None:
    """Every step record (loss, draws, tokens, grad norm, lr), every validation loss and every final
    parameter equal, bit for bit."""
    keys = ("step", "tokens", "loss", "draws", "mean_grad_norm", "lr", "noise_scale")
    a, b = records(reference), records(other)
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert [r["val_loss"] for r in records(reference, "val")] == [r["val_loss"] for r in records(other, "val")]
    assert summary(reference)["val_loss"] == summary(other)["val_loss"]
    mine, theirs = final_parameters(reference), final_parameters(other)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def wait_for(predicate, process, timeout=120, what=""):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"the run ended before {what}: {process.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def step_records(out: Path) -> int:
    try:
        return sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in line)
    except OSError:
        return 0


# ------------------------------------------------------------------ small file systems (root)

def _why_no_tmpfs():
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "needs mount and umount"
    return None


needs_tmpfs = pytest.mark.skipif(_why_no_tmpfs() is not None, reason=str(_why_no_tmpfs()))


class Tmpfs:
    """A tmpfs of ``size`` bytes mounted at ``path`` (unmounted on close); ``fill(free)`` leaves
    exactly ``free`` bytes free with a filler file, ``unfill()`` removes it."""

    def __init__(self, path: Path, size: int):
        path.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        self.path = path

    def free(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def fill(self, free: int) -> None:
        with open(self.path / "filler", "wb") as handle:
            handle.write(b"\0" * (self.free() - free))
        assert self.free() == free

    def unfill(self) -> None:
        (self.path / "filler").unlink()

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(size=3 << 20):
        mounted.append(Tmpfs(tmp_path / f"mnt{len(mounted)}", size))
        return mounted[-1]

    yield mount
    for fs in mounted:
        fs.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted SHORT run (18 steps, checkpoints at 6, 12, 18) and its file sizes."""
    out = tmp_path_factory.mktemp("reference") / "run"
    finished = run(*SHORT, "--out-dir", out)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return out


def _pages(size: int) -> int:
    return -(-size // PAGE)


def _metrics_bytes(out: Path, through_step: int) -> int:
    """Bytes of the reference's metrics.jsonl up to and including ``through_step``'s records."""
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    return sum(len(line) for line in lines if json.loads(line)["step"] <= through_step)


def _pages_through_first_checkpoint(reference: Path) -> int:
    """tmpfs pages a SHORT run holds once its step-6 checkpoint and ``latest`` are written:
    config.json, metrics, the lock's owner record, the checkpoint, the pointer."""
    checkpoint = (reference / "checkpoints" / "step_000006" / "rank0.pt").stat().st_size
    return (_pages(len((reference / "config.json").read_bytes()) + 16) + _pages(_metrics_bytes(reference, 6))
            + 1 + _pages(checkpoint) + 1)


def _assert_stopped_cleanly(out: Path, latest: str) -> None:
    """``latest`` names the last complete checkpoint, which loads; no temporary file is left."""
    assert (out / "checkpoints" / "latest").read_text().strip() == latest
    state = torch.load(out / "checkpoints" / latest / "rank0.pt", weights_only=True)
    assert state["extra"]["counters"]["step"] == int(latest.split("_")[1])
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or ".partial" in p.name]
    assert leftovers == []
    assert not (out / "summary.json").exists()


@needs_tmpfs
def test_full_disk_at_a_checkpoint_write(tmpfs, reference):
    fs = tmpfs()
    out = fs.path / "run"
    checkpoint_pages = _pages((reference / "checkpoints" / "step_000012" / "rank0.pt").stat().st_size)
    growth = _pages(_metrics_bytes(reference, 12)) - _pages(_metrics_bytes(reference, 6))
    # the step-6 checkpoint fits, the metrics up to step 12 fit, half of the step-12 checkpoint does
    fs.fill((_pages_through_first_checkpoint(reference) + growth + checkpoint_pages // 2) * PAGE)
    failed = run(*SHORT, "--out-dir", out)
    line = one_line(failed.stderr)
    assert failed.returncode != 0
    assert f"cannot write checkpoint {out}/checkpoints/step_000012" in line and "no space left on device" in line
    _assert_stopped_cleanly(out, "step_000006")
    assert records(out)[-1]["step"] == 12
    fs.unfill()  # the cause is gone
    resumed = run(*SHORT, "--out-dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "optimizer step 6" in resumed.stderr
    assert_bitwise_equal_runs(reference, out)


@needs_tmpfs
def test_full_disk_at_a_metrics_write(tmpfs, reference):
    fs = tmpfs()
    out = fs.path / "run"
    # once the step-6 checkpoint is written the disk is full: the next metrics record that needs
    # a new page (before step 12) fails
    assert _pages(_metrics_bytes(reference, 6)) < _pages(_metrics_bytes(reference, 12) - 100)
    fs.fill(_pages_through_first_checkpoint(reference) * PAGE)
    failed = run(*SHORT, "--out-dir", out)
    line = one_line(failed.stderr)
    assert failed.returncode != 0
    assert line == f"gqc-train: cannot write metrics {out}/metrics.jsonl: no space left on device", line
    _assert_stopped_cleanly(out, "step_000006")
    fs.unfill()
    resumed = run(*SHORT, "--out-dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bitwise_equal_runs(reference, out)


@needs_tmpfs
def test_read_only_run_directory(tmpfs, reference):
    fs = tmpfs()
    out = fs.path / "run"
    # a run that stopped after step ~8 (its last checkpoint: step 6), like a killed one
    stop = records(reference)[7]["samples"] // 8
    first = run(*SHORT, "--out-dir", out, "--set", f"train.max_micro_steps={stop}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    fs.remount("ro")
    refused = run(*SHORT, "--out-dir", out, "--resume")
    line = one_line(refused.stderr)
    assert refused.returncode != 0
    assert str(out) in line and "read-only file system" in line, line
    fs.remount("rw")
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    resumed = run(*SHORT, "--out-dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bitwise_equal_runs(reference, out)


# ------------------------------------------------------------------ one run per directory

def test_two_starts_into_one_directory_run_one(tmp_path):
    out = tmp_path / "race"
    logs = [tmp_path / f"start{seed}.log" for seed in (1, 2)]
    with open(logs[0], "w") as log1, open(logs[1], "w") as log2, \
            launched(command(*LONG, "--seed", 1, "--out-dir", out), env=ENV, stderr=log1) as one, \
            launched(command(*LONG, "--seed", 2, "--out-dir", out), env=ENV, stderr=log2) as two:
        starts = {1: one, 2: two}
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in starts.values()):
            assert time.monotonic() < deadline, "neither start was refused"
            time.sleep(0.02)
        [loser] = [seed for seed, p in starts.items() if p.poll() is not None]
        winner = 3 - loser
        assert starts[loser].returncode == 2
        line = one_line(logs[loser - 1].read_text())
        assert str(out) in line and ("in use by gqc-train pid" in line or "already holds a run" in line), line
        if "in use by" in line:
            assert f"pid {starts[winner].pid} " in line
        wait_for(lambda: step_records(out) >= 3, starts[winner], what="the winner's third step")
        # while it runs, even --overwrite is refused, naming it
        overwrite = run(*QUICK, "--out-dir", out, "--overwrite")
        line = one_line(overwrite.stderr)
        assert overwrite.returncode == 2 and f"{out} is in use by gqc-train pid {starts[winner].pid} " in line, line
        os.kill(starts[winner].pid, signal.SIGTERM)
        assert starts[winner].wait(timeout=120) == 128 + signal.SIGTERM
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == winner
    steps = [r["step"] for r in records(out)]
    assert steps == list(range(1, len(steps) + 1))  # one run's records, once each
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert torch.load(out / "checkpoints" / latest / "rank0.pt", weights_only=True)["extra"]["counters"]["step"] \
        == steps[-1]


def _hold(path, members_only, ready):
    """A child process that takes the lock of ``path`` (as rank 0, or as another rank) and waits."""
    code = (f"import sys, time; sys.path[:0] = {sys.path!r}\n"
            "from pathlib import Path\nfrom gqc_dist.train.run_lock import RunLock\n"
            f"lock = RunLock(Path({str(path)!r}))\n"
            f"lock.{'join' if members_only else 'acquire_owner'}()\n"
            f"Path({str(ready)!r}).write_text('held')\ntime.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    return process


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    from gqc_dist.train.run_lock import RunDirectoryInUse, RunLock

    out = tmp_path / "run"
    holder = _hold(out, False, tmp_path / "ready0")
    try:
        with pytest.raises(RunDirectoryInUse, match=rf"{out} is in use by gqc-train pid {holder.pid} on host"):
            RunLock(out).acquire_owner()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(out)  # the holder was killed: the kernel dropped its lock, nothing to clean up
    lock.acquire_owner()
    assert json.loads((out / "gqc-train.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (out / "gqc-train.lock").read_text() == ""  # a finished run leaves no owner behind
    survivor = _hold(out, True, tmp_path / "ready1")  # a rank > 0 of an earlier run, still alive
    try:
        with pytest.raises(RunDirectoryInUse, match="ranks of an earlier run are still running"):
            RunLock(out).acquire_owner()
    finally:
        survivor.kill()
        survivor.wait()
    RunLock(out).acquire_owner()


def test_a_start_refused_before_the_holder_wrote_its_record_still_names_it(tmp_path):
    """The holder writes its record just after it takes the lock: a start refused in that instant
    waits for the record instead of naming nobody (this race once failed the two-starts test)."""
    from gqc_dist.train.run_lock import LOCK_NAME, RunDirectoryInUse, RunLock

    out, ready = tmp_path / "run", tmp_path / "ready"
    out.mkdir()
    code = (f"import fcntl, json, os, socket, time\n"
            f"fd = os.open({str(out / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)\n"
            f"open({str(ready)!r}, 'w').close()\ntime.sleep(0.5)\n"
            "os.pwrite(fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), "
            "'started': time.time()}).encode(), 0)\ntime.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        assert (out / LOCK_NAME).read_text() == ""  # locked, no record yet
        with pytest.raises(RunDirectoryInUse, match=rf"{out} is in use by gqc-train pid {holder.pid} on host"):
            RunLock(out).acquire_owner()
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------ divergence

def test_a_diverging_run_stops_within_its_bound(tmp_path):
    out = tmp_path / "run"
    budget = 100_000
    failed = run(*QUICK, "--out-dir", out, "--set", "optimizer.lr=1000", "--set", "train.checkpoint_interval=2",
                 "--set", f"train.optimizer_steps={budget}", "--set", f"train.max_micro_steps={budget}")
    line = one_line(failed.stderr)
    assert failed.returncode == 4
    result = json.loads((out / "summary.json").read_text(),
                        parse_constant=lambda name: pytest.fail(f"summary.json holds a bare {name}"))
    for text in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON, every record
        json.loads(text, parse_constant=lambda name: pytest.fail(f"metrics.jsonl holds a bare {name}"))
    assert result["status"] == "diverged" and result["val_loss"] is None
    assert result["dropped_windows"] >= 25 and result["micro_steps"] < 200  # bounded, not the budget
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert result["last_good_checkpoint"] == latest
    assert "training diverged" in line and "non-finite" in line and "since optimizer step" in line
    assert f"the last good checkpoint is {out}/checkpoints/{latest}" in line and "optimizer.lr" in line
    # the last good checkpoint was written before the divergence and is sound; none came after it
    state = torch.load(out / "checkpoints" / latest / "rank0.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["engine"]["model"].values())
    first_bad = int(line.split("since optimizer step ")[1].split()[0])
    assert state["extra"]["counters"]["step"] <= first_bad
    # none after the windows went non-finite (one taken just before them may stay, not named)
    assert all(int(p.name.split("_")[1]) <= first_bad for p in (out / "checkpoints").iterdir() if p.is_dir())


def test_the_watch_names_a_checkpoint_good_once_a_window_stepped_from_it():
    from gqc_dist.train.health import DivergenceWatch

    watch = DivergenceWatch(25)
    watch.saved("step_000001")
    assert watch.last_good is None  # nothing has stepped from it yet
    watch.window(False, 5.5, 2, 2)
    watch.saved("step_000002")
    watch.window(True, 5.4, 2, 3)  # a dropped window (a fp16 overflow, or the start of a divergence) proves nothing
    assert watch.last_good == "step_000001"
    watch.window(False, 5.3, 3, 4)
    assert watch.last_good == "step_000002"
    watch.saved("step_000003")
    watch.window(False, math.nan, 4, 5)  # stepped from step 3 with a NaN loss: step 3 is not good
    watch.window(False, 5.0, 5, 6)
    assert watch.last_good == "step_000002"
    resumed = DivergenceWatch(25, last_good="step_000002", unproven="step_000003")
    assert resumed.last_good == "step_000002"
    resumed.window(False, 5.0, 4, 5)
    assert resumed.last_good == "step_000003"


def test_a_diverged_run_names_a_checkpoint_to_resume_from_and_a_fix_that_trains(tmp_path):
    """optimizer.lr=100, a checkpoint every step (measured: steps 1-5 stepped with finite losses up
    to 1.6e10; step 5's parameters are finite, but every window after it has a non-finite gradient)."""
    out = tmp_path / "run"
    failed = run(*QUICK, "--out-dir", out, "--set", "optimizer.lr=100", "--set", "train.checkpoint_interval=1")
    line = one_line(failed.stderr)
    assert failed.returncode == 4
    named = Path(re.search(r"the last good checkpoint is ([^\s;]+)", line)[1])
    first_bad = int(line.split("since optimizer step ")[1].split()[0])
    good_step = int(named.name.split("_")[1])
    # the checkpoint the non-finite windows started from was written, and is not the one named
    assert (out / "checkpoints" / f"step_{first_bad:06d}").is_dir() and good_step < first_bad
    assert named.parent == out / "checkpoints" and (named / "rank0.pt").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == named.name == summary(out)["last_good_checkpoint"]
    fix = re.search(r"likely fix: a lower optimizer.lr \(now 100\): (--resume --out-dir \S+ --set \S+) continues "
                    r"from that checkpoint", line)[1]
    assert fix == f"--resume --out-dir {out} --set optimizer.lr=10"

    # --resume alone continues from the named checkpoint, whose next window steps with a finite loss
    # (this optimizer.lr then diverges again at the same step, and says so)
    resumed = run("--no-progress", "--resume", "--out-dir", out)
    assert resumed.returncode == 4, resumed.stderr[-3000:]
    assert f"resuming {out} from {named}: optimizer step {good_step}," in resumed.stderr
    after = [r for r in records(out) if r["step"] > good_step]
    assert after and after[0]["step"] == good_step + 1 and math.isfinite(after[0]["loss"])
    assert f"the last good checkpoint is {named};" in resumed.stderr.splitlines()[-1]
    lr_at_100 = after[0]["lr"]

    # the fix exactly as the line writes it: the same checkpoint, a lower peak rate, trained to the end
    done = run("--no-progress", *fix.split())
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {out} from {named}: optimizer step {good_step}," in done.stderr
    assert "optimizer.lr 10\n" in done.stderr
    after = [r for r in records(out) if r["step"] > good_step]
    assert after[0]["step"] == good_step + 1 and all(math.isfinite(r["loss"]) for r in after)
    assert after[0]["lr"] == pytest.approx(lr_at_100 / 10, rel=1e-9) and json.loads((out / "config.json").read_text())["optimizer"]["lr"] == 10
    assert summary(out)["status"] == "finished" and math.isfinite(summary(out)["val_loss"])

    # anything else of the optimizer stays the run's own
    refused = run("--no-progress", "--resume", "--out-dir", out, "--set", "optimizer.weight_decay=0")
    assert refused.returncode == 2 and "optimizer.weight_decay" in one_line(refused.stderr)
    assert "another --out-dir" in refused.stderr


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tmp_path, quick_run):
    out = tmp_path / "run"
    shutil.copytree(quick_run[0], out)
    before = _snapshot(out)
    again = run("--no-progress", "--resume", "--out-dir", out)
    assert again.returncode == 0, again.stderr[-3000:]
    steps, loss = summary(out)["optimizer_steps"], summary(out)["val_loss"]
    assert one_line(again.stderr) == (f"gqc-train: {out} finished at optimizer step {steps} (validation loss {loss:.4f}): "
                                      "nothing to resume, no file changed; raise its budget (--set train.tokens=... or "
                                      "train.optimizer_steps=...) to train on")
    assert f"validation loss {loss:.4f} nats/token" in again.stdout
    assert _snapshot(out) == before


# ------------------------------------------------------------------ launcher death, stop signals

def _alive(pid) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _snapshot(out: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


def test_ranks_die_with_their_launcher(tmp_path):
    out = tmp_path / "run"
    with open(tmp_path / "job.log", "w") as log, \
            launched(command(*LONG, "--engine", "ddp", "--out-dir", out, nproc=2), env=ENV, stdout=log,
                     stderr=subprocess.STDOUT) as launcher:
        wait_for(lambda: step_records(out) >= 3, launcher, what="3 steps")
        ranks = children(launcher.pid)
        assert len(ranks) == 2
        os.kill(launcher.pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            while any(_alive(pid) for pid in ranks):
                assert time.monotonic() - killed < 5, f"ranks still alive 5 s after their launcher died: {ranks}"
                time.sleep(0.02)
        finally:  # ranks in sessions of their own: the launcher's process group does not reach them
            for pid in filter(_alive, ranks):
                os.kill(pid, signal.SIGKILL)
        print(f"both ranks gone {time.monotonic() - killed:.2f} s after the launcher was killed")
        after = _snapshot(out)
        time.sleep(1.0)
        assert _snapshot(out) == after  # nothing writes any more
    from gqc_dist.train.run_lock import RunLock

    lock = RunLock(out)
    lock.acquire_owner()  # free: no survivor holds the directory
    lock.release()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The runs a stopped and resumed run must equal: one process and 2 DDP ranks, 150 steps."""
    runs = {}
    for name, extra, nproc in (("single", [], None), ("ddp", ["--engine", "ddp"], 2)):
        out = tmp_path_factory.mktemp("uninterrupted") / name
        finished = run(*STOPPABLE, *extra, "--out-dir", out, nproc=nproc)
        assert finished.returncode == 0, finished.stderr[-3000:]
        runs[name] = out
    return runs


STEPS = 150
STOPPABLE = [*QUICK, "--set", f"train.optimizer_steps={STEPS}", "--set", "train.max_micro_steps=100000",
             "--set", f"train.checkpoint_interval={STEPS}", "--set", "train.eval_interval=50"]


def _stop_and_resume(tmp_path, uninterrupted, name, extra, nproc, pick, signum):
    out = tmp_path / "run"
    log_path = tmp_path / "stopped.log"
    with open(log_path, "w") as log, launched(command(*STOPPABLE, *extra, "--out-dir", out, nproc=nproc), env=ENV,
                                              stdout=log, stderr=subprocess.STDOUT) as process:
        wait_for(lambda: step_records(out) >= 10, process, what="10 steps")
        os.kill(pick(process), signum)
        returncode = process.wait(timeout=120)
    output = log_path.read_text()
    assert returncode != 0, output[-3000:]
    [line] = [text for text in output.splitlines() if "gqc-train: stopped by" in text]
    assert f"stopped by {signal.Signals(signum).name} at optimizer step" in line and "--resume" in line
    # (torchrun itself reports its workers' non-zero exit with a traceback of its own)
    assert not any(f"[rank{r}]: Traceback" in output for r in range(2)), output[-3000:]
    if not nproc:
        assert "Traceback" not in output, output[-3000:]
    # the checkpoint is at the micro-step the ranks stopped at, and every rank wrote its part
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped_step = int(line.split("optimizer step ")[1].split()[0])
    assert latest.startswith(f"step_{stopped_step:06d}") and f"{out}/checkpoints/{latest}" in line
    for rank in range(nproc or 1):
        state = torch.load(out / "checkpoints" / latest / f"rank{rank}.pt", weights_only=True)
        assert state["extra"]["counters"]["step"] == stopped_step
    assert 10 <= stopped_step < STEPS and records(out)[-1]["step"] == stopped_step
    assert not (out / "summary.json").exists()
    resumed = run(*STOPPABLE, *extra, "--out-dir", out, "--resume", nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from {out}/checkpoints/{latest}: optimizer step {stopped_step}" in resumed.stderr
    assert_bitwise_equal_runs(uninterrupted[name], out)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_checkpoints_and_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted, signum):
    _stop_and_resume(tmp_path, uninterrupted, "single", [], None, lambda process: process.pid, signum)


def test_sigterm_to_one_rank_stops_both_and_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    def rank_one(launcher):
        environ = {pid: Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in children(launcher.pid)}
        return next(pid for pid, env in environ.items() if b"RANK=1" in env)

    _stop_and_resume(tmp_path, uninterrupted, "ddp", ["--engine", "ddp"], 2, rank_one, signal.SIGTERM)


def test_max_nonfinite_windows_is_validated():
    from gqc_dist.errors import GQCConfigError
    from gqc_dist.train.settings import validate

    assert validate({})["train"]["max_nonfinite_windows"] == 25
    for bad, wanted in ((0, ">= 1"), (-1, ">= 1"), (2.5, "an integer"), ("10", "an integer"), (True, "an integer"),
                        (None, "an integer")):
        with pytest.raises(GQCConfigError, match=f"^train.max_nonfinite_windows must be {wanted}, got {bad!r}$"):
            validate({"train": {"max_nonfinite_windows": bad}})
    assert validate({"train": {"max_nonfinite_windows": 3}})["train"]["max_nonfinite_windows"] == 3


def test_file_errors_are_named_in_words(tmp_path):
    import errno

    from gqc_dist.train.storage import RunFileError, cause_of, write_atomic

    assert cause_of(OSError(errno.ENOSPC, "No space left on device")) == "no space left on device"
    assert cause_of(OSError(errno.EROFS, "Read-only file system")) == "read-only file system"
    assert cause_of(PermissionError(errno.EACCES, "Permission denied")) == "permission denied"
    assert cause_of(OSError(errno.EDQUOT, "Disk quota exceeded")) == "disk quota exceeded"
    gone = tmp_path / "gone" / "config.json"  # a run directory that vanished
    with pytest.raises(RunFileError, match=rf"cannot write config {gone}: no such file or directory"):
        write_atomic(gone, "{}", "config")
    kept = tmp_path / "kept.json"
    kept.write_text("old")
    with pytest.raises(AttributeError):
        write_atomic(kept, object(), "config")  # a failure while writing: the old file stays, no temporary
    assert kept.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]
