"""The launch scripts across two hosts (network namespaces, see virtual_cluster.py): a real Slurm
cluster running launch/slurm.sbatch (srun torchrun) and launch/srun.sbatch (plain srun, ranks from
SLURM_*) on 2 nodes, and launch/torchrun.sh's static multi-node rendezvous. Each run's rank-0 metrics must match the single-process run on the same data."""

import contextlib
import subprocess
import time

import pytest

from distributed_harness import launched
from train_runs import ENV, REPO, assert_same_run, summary
from virtual_cluster import SlurmCluster, VirtualHosts, missing

pytestmark = pytest.mark.skipif(bool(missing()), reason=missing() or "runs")


@pytest.fixture(scope="module")
def hosts():
    virtual = VirtualHosts(2)
    try:
        yield virtual.start()
    finally:
        virtual.stop()


def test_torchrun_static_rendezvous_across_two_hosts(tmp_path, hosts, quick_run):
    out = tmp_path / "run"
    with contextlib.ExitStack() as stack:
        launchers = []
        for node in range(2):
            env = {**ENV, "NNODES": "2", "NODE_RANK": str(node), "NPROC": "1",
                   "MASTER_ADDR": hosts.addresses[0], "MASTER_PORT": "29500"}
            command = hosts.command(node, ["bash", REPO / "launch" / "torchrun.sh", "--quick", "--engine", "ddp",
                                           "--no-progress", "--out-dir", out])
            launchers.append(stack.enter_context(
                launched(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        deadline = time.monotonic() + 300
        outputs = [launcher.communicate(timeout=max(1, deadline - time.monotonic())) for launcher in launchers]
    for launcher, (_, stderr) in zip(launchers, outputs):
        assert launcher.returncode == 0, stderr[-3000:]
    assert summary(out)["world_size"] == 2
    assert_same_run(quick_run[0], out)


@pytest.mark.skipif(bool(missing("slurmctld", "slurmd", "sbatch", "munged")),
                    reason=missing("slurmctld", "slurmd", "sbatch", "munged") or "runs")
def test_slurm_sbatch_on_two_nodes(tmp_path, hosts, quick_run):
    env = {**ENV, "NPROC": "1", "MASTER_PORT": "29500"}
    _batch_run_matches_single_process(hosts, tmp_path, quick_run, ["--nodes", "2"], "slurm.sbatch", "fsdp2", env)


@pytest.mark.skipif(bool(missing("slurmctld", "slurmd", "sbatch", "srun", "munged")),
                    reason=missing("slurmctld", "slurmd", "sbatch", "srun", "munged") or "runs")
def test_plain_srun_on_two_nodes(tmp_path, hosts, quick_run):
    """launch/srun.sbatch: Slurm starts both ranks (no torchrun); gqc-train takes its rank from
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and its rendezvous from the job's first node name
    (gqchost0, resolved by each host's /etc/hosts) on port 15000 + job id mod 5000."""
    launcher_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in ENV.items()  # everything the ranks need must come from Slurm
           if k not in launcher_keys and not k.startswith(("PMI_", "OMPI_", "SLURM_", "TORCHELASTIC_"))}
    _batch_run_matches_single_process(hosts, tmp_path, quick_run, [], "srun.sbatch", "ddp", env)


def _batch_run_matches_single_process(hosts, tmp_path, quick_run, sbatch_args, script, engine, env):
    """sbatch ``launch/<script> --quick --engine <engine>`` on a fresh two-node cluster: the job
    completes, runs on 2 ranks, and its metrics match the single-process run's."""
    cluster = SlurmCluster(hosts)
    out = tmp_path / "run"
    try:
        cluster.start()
        state, exit_code = cluster.run_batch(
            [*sbatch_args, "--output", tmp_path / "job-%j.out", REPO / "launch" / script,
             "--quick", "--engine", engine, "--no-progress", "--out-dir", out], env=env, cwd=tmp_path)
        job_output = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
        assert (state, exit_code) == ("COMPLETED", 0), f"{job_output[-3000:]}\n{cluster.logs()}"
    finally:
        cluster.stop()
    assert "validation loss" in job_output
    result = summary(out)
    assert result["world_size"] == 2 and result["engine"] == engine
    assert_same_run(quick_run[0], out)
