"""On a CUDA device only (skipped elsewhere; ``benchmarks/gpu_check.sh`` runs them on one GPU):

* the wrapper on CUDA takes the decisions it takes on the CPU, with the same norms (fp32);
* gqc-train's loop on CUDA synchronises the host once per micro-step, as counted by CUDA's own
  sync debug mode (the CPU suite counts tensor reads with ``device_tracer`` instead), and so does
  every algorithm's wrapper from its first micro-step on (a pageable host-to-device copy syncs too);
* the collectives' device check sees real CUDA tensors: a host tensor is refused, the device's
  own passes;
* two ranks on one GPU under NCCL end in one gqc-train line before NCCL starts.
"""

import os
import warnings

import pytest
import torch
from distributed_harness import run_launcher, torchrun_command

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _decisions(device):
    import gqc_dist

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gqc = gqc_dist.OptimizerWrapperGNTS(optimizer, max_batch_draws=8)
    for group in gqc.param_groups:
        group["gradient_norm_threshold"] = 0.05
    data = torch.Generator().manual_seed(1)
    decisions, norms = [], []
    for _ in range(60):
        x = torch.randn(16, 32, generator=data).to(device)
        y = torch.randn(16, 1, generator=data).to(device)
        torch.nn.functional.mse_loss(model(x), y).backward()
        decisions.append(gqc.step())
        norms.append(gqc.statistics()["mean_grad_norm"])
    return decisions, norms, [p.detach().cpu() for p in model.parameters()]


def test_gpu_wrapper_decides_as_on_the_cpu():
    cpu, cuda = _decisions(torch.device("cpu")), _decisions(torch.device("cuda"))
    assert cpu[0] == cuda[0]
    assert cuda[1] == pytest.approx(cpu[1], rel=1e-4)
    for a, b in zip(cpu[2], cuda[2]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_gpu_loop_syncs_once_per_micro_step(tmp_path, monkeypatch):
    import gqc_dist.train.run as run
    from gqc_dist.train.cli import QUICK
    from gqc_dist.train.corpus import ByteBatches
    from gqc_dist.train.settings import merge, validate
    from gqc_dist.train.throughput import Throughput

    class Unsampled(Throughput):  # its sampled timing fences with cuda.synchronize: not the loop's
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "sample_every": 10**9})

    monkeypatch.setattr(run, "Throughput", Unsampled)
    marks, record = [], {}
    draw = ByteBatches.next

    def syncs():
        return sum(1 for w in record["caught"] if "synchroniz" in str(w.message))

    def next_batch(self):  # a micro-step begins: how many syncs so far
        marks.append(syncs())
        return draw(self)

    monkeypatch.setattr(ByteBatches, "next", next_batch)
    config = validate(merge(QUICK, {"device": "cuda", "out_dir": str(tmp_path / "run"),
                                    "train": {"optimizer_steps": 10, "eval_interval": 1000, "checkpoint_interval": 1000}}))
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:  # the list grows as warnings are raised
            warnings.simplefilter("always")
            record["caught"] = caught
            run.train(config, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    per_micro_step = [b - a for a, b in zip(marks, marks[1:])]  # the last one (then the final eval) left out
    assert len(per_micro_step) >= 10 and all(n == 1 for n in per_micro_step), per_micro_step


# a section per algorithm under which it steps several times in 40 micro-steps
SECTIONS = {"cbc": {"kappa": 0.25, "window_gradient": "sqrt"}, "fixed": {"accumulation_steps": 3},
            "gnr": {"target_norm": 0.5}, "gns": {"tolerance": 0.5}, "gnts": {"threshold": 2.0},
            "goodput": {}, "mht": {"confidence_level": 0.9, "percent_error_threshold": 0.5},
            "sbc": {"logical_batch_size": 40}}


@pytest.mark.parametrize("algorithm, fp16", [(name, False) for name in sorted(SECTIONS)] + [("cbc", True)])
def test_gpu_every_algorithm_syncs_once_per_micro_step(algorithm, fp16):
    """fp16: under a GradScaler, whose scale rides in the packet and whose update stays on the device."""
    from gqc_dist.config import algorithms, build_controller

    assert set(SECTIONS) == set(algorithms()), "an algorithm without a section here"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10) if fp16 else None
    wrapper, _ = build_controller({"algorithm": algorithm, **SECTIONS[algorithm]}, optimizer, physical_batch_size=16,
                                  grad_scaler=scaler)
    data = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 32, generator=data).cuda(), torch.randn(16, 1, generator=data).cuda())
               for _ in range(40)]
    torch.cuda.synchronize()
    per_micro_step, steps = [], 0
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for x, y in batches:
                before = len(caught)
                with torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                    loss = torch.nn.functional.mse_loss(model(x).float(), y)
                (scaler.scale(loss) if fp16 else loss).backward()
                steps += bool(wrapper.step(loss.detach()) if algorithm == "mht" else wrapper.step())
                per_micro_step.append(sum(1 for w in caught[before:] if "synchroniz" in str(w.message)))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert steps >= 2, f"{algorithm} stepped {steps} times: the stepping micro-steps were not covered"
    assert all(n == 1 for n in per_micro_step), per_micro_step


def test_gpu_collective_device_check():
    from gqc_dist.core import collectives

    with pytest.raises(collectives.DeviceMismatchError):
        collectives.check_device("all_reduce", torch.device("cuda", torch.cuda.current_device()), torch.zeros(1))
    collectives.check_device("all_reduce", torch.device("cuda", torch.cuda.current_device()),
                             torch.zeros(1, device="cuda"))


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="needs two ranks on one GPU")
def test_gpu_two_ranks_on_one_gpu_under_nccl_is_refused_in_one_line(tmp_path):
    command = torchrun_command(2, "-m", "gqc_dist.train", "--engine", "ddp", "--device", "cuda", "--quick",
                               "--no-progress", "--out-dir", tmp_path / "run")
    env = {**os.environ, "GQC_TRAIN_SHARE_GPUS": "1"}
    env.pop("GQC_TRAIN_BACKEND", None)
    finished = run_launcher(command, env=env, timeout=120)
    assert finished.returncode != 0
    assert ("gqc-train: 2 ranks on this node's 1 GPU(s), and NCCL refuses two ranks on one GPU: "
            "set GQC_TRAIN_BACKEND=gloo as well") in finished.stderr, finished.stderr[-3000:]
