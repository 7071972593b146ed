"""Bugs only a GPU would show, found on the CPU: collectives on the host, host syncs in the loop.

``device_tracer.DeviceTracer`` tells apart, on a CPU run, the tensors that would live on the
rank's accelerator from those made on the host (see its docstring). With it:

* every collective gqc_dist issues in gqc-train's loop (2 ranks, gloo, real collectives) and in
  the expert-parallel MoE layer gets a tensor on the run's device: NCCL would take it;
* gqc-train's loop reads the device once per micro-step (the controller's packet), not once more
  for the loss;
* the one place (``gqc_dist.core.collectives``) refuses a host tensor when the run is on another
  device, and no module of gqc_dist calls torch.distributed's tensor collectives around it.
"""

import ast
from pathlib import Path

import pytest
import torch

from distributed_harness import run_distributed
from device_tracer import RUN, DeviceTracer

import gqc_dist

STEPS = 8


def _config(out_dir, engine, **model):
    from gqc_dist.train.cli import QUICK
    from gqc_dist.train.settings import merge, validate

    return validate(merge(QUICK, {"engine": engine, "out_dir": str(out_dir), "model": model,
                                  "train": {"optimizer_steps": STEPS, "eval_interval": 1000,
                                            "checkpoint_interval": 1000}}))


def _traced_train(rank, world, out_dir, engine, model):
    """gqc-train's train() on ``cpu:0`` under the tracer; returns what it saw. The micro-steps are
    marked where the loop draws its batch, so host syncs are counted per micro-step."""
    import gqc_dist.train.run as run
    from gqc_dist.train.corpus import ByteBatches

    tracer = DeviceTracer()
    marks = []
    draw = ByteBatches.next

    def next_batch(self):
        marks.append(list(tracer.syncs))
        tracer.syncs.clear()
        return draw(self)

    init = run.init_distributed
    run.init_distributed = lambda *args, **kwargs: RUN  # the run's device: cpu:0 (the tracer's "accelerator")
    ByteBatches.next = next_batch
    try:
        with tracer.active():
            summary = run.train(_config(out_dir, engine, **model), progress=False)
    finally:  # the single-process case runs in the test process itself: leave nothing patched
        ByteBatches.next, run.init_distributed = draw, init
    return {"violations": tracer.violations, "checked": tracer.checked, "per_micro_step": marks[1:],
            "micro_steps": summary["micro_steps"], "device": summary["device"]}


def test_every_collective_of_the_loop_is_on_the_run_device(tmp_path):
    """2 DDP ranks of gqc-train (gloo; the collectives run): the GQC statistics all-reduce of
    every micro-step, the run directory's agreement, the evaluation's mean, the checkpoint's."""
    results = run_distributed(_traced_train, 2, str(tmp_path / "run"), "ddp", {}, timeout=300)
    for rank, seen in enumerate(results):
        assert seen["checked"] >= seen["micro_steps"], seen  # at least the statistics all-reduce, every micro-step
        assert seen["violations"] == [], f"rank {rank}: host tensors handed to collectives: {seen['violations']}"


def _traced_moe(rank, world):
    """An expert-parallel MoE layer (EP 2 x EDP 2) forward and backward on ``cpu:0`` under the
    tracer: the token and index exchange (all_to_all) and the experts' gradient all-reduce."""
    from gqc_dist.engines.moe import ExpertParallelMoE, expert_parallel_groups, reduce_expert_grads

    tracer = DeviceTracer()
    with tracer.active():
        ep_group, edp_group = expert_parallel_groups(2)
        layer = ExpertParallelMoE(8, 16, 4, ep_group=ep_group).to(RUN)
        reduce_expert_grads(layer, edp_group, world)
        x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(rank)).to(RUN)
        layer(x).square().mean().backward()
    return tracer.violations, tracer.checked


def test_expert_parallel_collectives_are_on_the_run_device():
    for violations, checked in run_distributed(_traced_moe, 4, timeout=120):
        assert checked >= 2 and violations == [], violations


def test_the_loop_takes_one_host_sync_per_micro_step(tmp_path):
    seen = _traced_train(0, 1, str(tmp_path / "run"), "single", {})
    counts = [len(syncs) for syncs in seen["per_micro_step"]]
    # each micro-step's syncs are read at the next draw: every micro-step but the last (at least
    # STEPS in all, one window of one micro-batch per step; the first is split, a noise probe)
    assert len(counts) == seen["micro_steps"] - 1 >= STEPS - 1, seen
    assert all(count == 1 for count in counts), [syncs for syncs in seen["per_micro_step"] if len(syncs) != 1][:3]


def test_a_collective_refuses_a_tensor_off_the_run_device():
    from gqc_dist.core import collectives

    host = torch.zeros(2)
    for device in (torch.device("cuda", 0), torch.device("meta")):
        with pytest.raises(collectives.DeviceMismatchError, match=r"all_reduce .*a tensor on cpu, the run computes on"):
            collectives.all_reduce(host, device)
        with pytest.raises(collectives.DeviceMismatchError, match="all_to_all_single"):
            collectives.all_to_all_single(host, host, device)
    collectives.check_device("all_reduce", torch.device("cpu"), host)  # the run's own device passes


def test_no_module_calls_torch_distributed_collectives_around_the_one_place():
    package = Path(gqc_dist.__file__).parent
    names = {"all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast",
             "all_gather", "reduce_scatter", "barrier", "all_gather_object", "all_to_all", "reduce"}
    found = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "core" / "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "dist"):
                found.append(f"{path.relative_to(package)}:{node.lineno} dist.{node.func.attr}")
    assert found == [], found


def test_gpu_check_script_is_clean_and_says_when_there_is_no_gpu():
    """benchmarks/gpu_check.sh (the GPU half of these checks): executable, parses, shellcheck-clean,
    and on a machine without an NVIDIA GPU it stops at once, saying so (exit 2)."""
    import shutil
    import subprocess

    from test_packaging import REPO, git_mode, shellcheck

    script = REPO / "benchmarks" / "gpu_check.sh"
    assert git_mode(script) & 0o111
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    binary = shellcheck()
    if binary is not None:
        checked = subprocess.run([binary, "--shell=bash", str(script)], capture_output=True, text=True, timeout=120)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    if shutil.which("nvidia-smi") and torch.cuda.is_available():
        pytest.skip("a GPU is here: run the script itself")
    finished = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 2 and finished.stderr.startswith("gpu_check: no NVIDIA GPU here"), finished
