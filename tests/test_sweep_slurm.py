"""``gqc-train sweep SPEC --slurm`` on a real two-node Slurm cluster (virtual_cluster.py): the job
arrays, the second array of controllers at lr "k1" (``--dependency=afterany``), a cancelled task
and its resubmission. The oracle is the local path (``gqc-train sweep SPEC --jobs 2``): every run
must give exactly the same validation loss, learning-rate multiplier and command line there."""

import json
import re
import subprocess
import sys
import time

import pytest

from train_runs import ENV
from virtual_cluster import SlurmCluster, VirtualHosts, missing

NEEDS = ("slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "munged")
pytestmark = pytest.mark.skipif(bool(missing(*NEEDS)), reason=missing(*NEEDS) or "runs")

BASE = {"model.seq_len": 32, "model.dim": 32, "model.layers": 1, "model.heads": 2, "data.max_bytes": 300000,
        "data.micro_batch_size": 4, "optimizer.warmup_steps": 2, "train.tokens": 20000,
        "train.optimizer_steps": 100000, "train.max_micro_steps": 100000, "train.eval_interval": 20,
        "train.eval_batches": 2, "train.final_eval_batches": 4, "train.checkpoint_interval": 100000}
# 4 runs: fixed k = 1 at two rates, a controller at lr "k1" (fixed k = 1's best) and its twin
SPEC = {"base": {"set": BASE}, "arms": [{"fixed": 1, "lr": [1, 2]}, {"name": "default", "gqc": None}],
        "seeds": [0], "twins": ["default"]}
# one short run (the same command as SPEC's fixed1@1@s0) and one long enough to cancel
SPEC_CANCEL = {"base": {"set": BASE}, "seeds": [0],
               "arms": [{"fixed": 1, "lr": [1]}, {"name": "long", "fixed": 2, "lr": [1],
                                                   "set": {"train.tokens": 100000}}]}
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING"}


@pytest.fixture(scope="module")
def cluster():
    hosts, slurm = VirtualHosts(2), None
    try:
        hosts.start()
        slurm = SlurmCluster(hosts, cpus_per_node=1)  # one task per node: an array's 2 tasks use both
        yield slurm.start()
    finally:
        if slurm is not None:
            slurm.stop()
        hosts.stop()


def _write_spec(folder, spec) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def _sweep_command(*args):
    return [sys.executable, "-m", "gqc_dist.train", "sweep", *map(str, args)]


def sweep(*args, env=ENV, cwd=None, timeout=300) -> str:
    """``gqc-train sweep *args``; returns its stdout (it must succeed)."""
    done = subprocess.run(_sweep_command(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def results_of(folder) -> dict:
    """``{run name: record}`` of every finished run in a results folder."""
    return {p.name[:-len(".json")]: json.loads(p.read_text()) for p in folder.glob("*@s*.json")
            if not p.name.endswith(".failed.json")}


def same_runs(slurm_folder, local_folder, names):
    """The runs ``names`` finished in both folders with equal losses, rates, steps and commands."""
    slurm, local = results_of(slurm_folder), results_of(local_folder)
    for name in names:
        a, b = slurm[name], local[name]
        assert a["val_loss"] == b["val_loss"], name
        assert (a["lr_multiplier"], a["optimizer_steps"], a["tokens"], a["windows"]) == \
            (b["lr_multiplier"], b["optimizer_steps"], b["tokens"], b["windows"]), name
        assert a["command"].replace(str(slurm_folder), "R") == b["command"].replace(str(local_folder), "R"), name


@pytest.fixture(scope="module")
def local_results(tmp_path_factory):
    """The oracle: SPEC run by the local path, 2 at a time; started first, so that it works
    while the cluster starts and the arrays wait for Slurm. Returns what waits for its folder."""
    folder = tmp_path_factory.mktemp("local")
    sweep_process = subprocess.Popen(_sweep_command(_write_spec(folder, SPEC), "--jobs", "2", "--results",
                                                    folder / "results"),
                                     env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    output = []

    def finished():
        if not output:
            output.append(sweep_process.communicate(timeout=300)[0])
        assert sweep_process.returncode == 0, output[0][-3000:]
        return folder / "results"

    try:
        yield finished
    finally:
        if sweep_process.poll() is None:
            sweep_process.kill()
            sweep_process.communicate()


def job_tasks(cluster, job) -> list:
    """``scontrol show job`` of a job array: one dict per task (pending ones in one entry)."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env={**ENV, **cluster.env},
                           capture_output=True, text=True)
    return [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in shown.stdout.splitlines()
            if line.strip()]


def wait_jobs(cluster, jobs, timeout=240, until=lambda: False) -> list:
    """Poll (every 0.2 s) until every task of ``jobs`` has ended or ``until()`` holds; returns
    the tasks' ``scontrol`` records."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = [t for job in jobs for t in job_tasks(cluster, job)]
        if until() or (tasks and not any(t.get("JobState") in ACTIVE for t in tasks)):
            return tasks
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs {jobs} not done in {timeout} s: {tasks}\n{cluster.logs()}")
        time.sleep(0.2)


def task_outputs(results) -> str:
    return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                   for p in sorted((results / "slurm").glob("*.out")))


def submitted(stdout) -> list:
    return re.findall(r"submitted job array (\d+)", stdout)


def task_list(results, job_index) -> list:
    """The runs of the ``job_index``-th array of the latest submission (``tasks-<stamp>-<i>.json``)."""
    latest = max((results / "slurm").glob(f"tasks-*-{job_index}.json"), key=lambda p: p.stat().st_mtime_ns)
    return [tuple(run) for run in json.loads(latest.read_text())["runs"]]


def test_job_arrays_on_two_nodes_match_the_local_sweep(local_results, cluster, tmp_path):
    spec = _write_spec(tmp_path, SPEC)
    results = tmp_path / "sweep results"  # a space: the task logs' path is an sbatch argument, not a directive
    env = {**ENV, **cluster.env}
    out = sweep(spec, "--slurm", "--results", results, env=env, cwd=tmp_path)
    jobs = submitted(out)
    assert len(jobs) == 2, out
    # the controllers at lr "k1" (and the twin) wait in a second array for fixed k = 1's runs
    assert task_list(results, 0) == [("fixed1@1", 0), ("fixed1@2", 0)]
    assert task_list(results, 1) == [("default", 0), ("default-twin", 0)]
    assert f"after {jobs[0]}" in out, out
    dependency = job_tasks(cluster, jobs[1])[0].get("Dependency", "")
    assert dependency.startswith(f"afterany:{jobs[0]}"), dependency

    tasks = wait_jobs(cluster, jobs)
    assert len(tasks) == 4 and all((t["JobState"], t["ExitCode"]) == ("COMPLETED", "0:0") for t in tasks), \
        f"{tasks}\n{task_outputs(results)}"
    assert {t["NodeList"] for t in tasks} == set(cluster.hosts.hostnames)  # both nodes ran tasks
    first = [t for t in tasks if t["ArrayJobId"] == jobs[0]]
    second = [t for t in tasks if t["ArrayJobId"] == jobs[1]]
    assert min(t["StartTime"] for t in second) >= max(t["EndTime"] for t in first)  # ISO times sort as text

    names = [f"{arm}@s0" for arm in ("fixed1@1", "fixed1@2", "default", "default-twin")]
    assert sorted(results_of(results)) == sorted(names)
    assert not list(results.glob("*.failed.json"))
    same_runs(results, local_results(), names)

    report = sweep(spec, "--report-only", "--results", results)
    assert "4 of 4 runs finished, 0 failed, 0 missing" in report, report


def test_cancelled_task_leaves_no_record_and_only_it_reruns(local_results, cluster, tmp_path):
    spec = _write_spec(tmp_path, SPEC_CANCEL)
    results = tmp_path / "results"
    env = {**ENV, **cluster.env}
    # the oracle for the long run, on this machine while the cluster works
    oracle = subprocess.Popen(_sweep_command(spec, "--results", tmp_path / "local", "--only", "long@s0"), env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        jobs = submitted(sweep(spec, "--slurm", "--results", results, env=env, cwd=tmp_path))
        assert len(jobs) == 1
        index = task_list(results, 0).index(("long", 0))
        metrics = results / "runs" / "long@s0" / "metrics.jsonl"
        tasks = wait_jobs(cluster, jobs, timeout=120, until=lambda: metrics.exists() and metrics.stat().st_size > 0)
        assert not (results / "long@s0.json").exists(), f"not cancelled in time: {tasks}"  # still training
        subprocess.run(["scancel", f"{jobs[0]}_{index}"], env=env, check=True)
        tasks = wait_jobs(cluster, jobs)
        states = {int(t["ArrayTaskId"]): t["JobState"] for t in tasks}
        assert states == {index: "CANCELLED", 1 - index: "COMPLETED"}, f"{tasks}\n{task_outputs(results)}"
        assert "long@s0 stopped by SIGTERM" in task_outputs(results)
        assert not (results / "long@s0.json").exists() and not (results / "long@s0.failed.json").exists()
        same_runs(results, local_results(), ["fixed1@1@s0"])  # the other run's result is intact
        kept, log = results / "fixed1@1@s0.json", results / "runs" / "fixed1@1@s0.log"
        before = (kept.read_bytes(), kept.stat().st_mtime_ns, log.stat().st_mtime_ns)

        report = sweep(spec, "--report-only", "--results", results)
        assert "1 of 2 runs finished, 0 failed, 1 missing" in report, report
        assert "missing (1): long@s0." in report and "resubmit with --slurm" in report, report

        out = sweep(spec, "--slurm", "--results", results, env=env, cwd=tmp_path)
        again = submitted(out)
        assert len(again) == 1 and "(1 runs)" in out, out
        assert task_list(results, 0) == [("long", 0)]  # only the missing run
        tasks = wait_jobs(cluster, again)
        assert [(t["JobState"], t["ExitCode"]) for t in tasks] == [("COMPLETED", "0:0")], \
            f"{tasks}\n{task_outputs(results)}"
        assert (kept.read_bytes(), kept.stat().st_mtime_ns, log.stat().st_mtime_ns) == before  # not run again
        oracle_out, _ = oracle.communicate(timeout=240)
        assert oracle.returncode == 0, oracle_out[-3000:]
    finally:
        if oracle.poll() is None:
            oracle.kill()
            oracle.wait()
    same_runs(results, tmp_path / "local", ["long@s0"])
    assert sorted(results_of(results)) == ["fixed1@1@s0", "long@s0"]
    assert not list(results.glob("*.failed.json"))
