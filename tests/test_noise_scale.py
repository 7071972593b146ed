"""Gradient-noise statistics against a closed form (1 process, DDP, FSDP2 and ZeRO-2 on 2 real
ranks), and the CBC controller against a hand-written single-process reference.

Closed form: linear regression ``y = x W*^T + eps`` (``x ~ N(0, I_P)``, ``eps ~ N(0, s^2)``) with
loss ``0.5 * mean_batch ||x W^T - y||^2``, held at ``W = 0`` (learning rate 0). The per-sample
gradient of output ``j`` is ``-(x.w*_j + eps_j) x``, so ``|G|^2 = ||W*||_F^2`` and
``tr(Sigma) = sum_j ((P + 1) |w*_j|^2 + P s^2)``.
"""

import math
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import gqc_dist  # noqa: E402
import gqc_dist.deepspeed as gqc_deepspeed  # noqa: E402
from distributed_harness import run_distributed  # noqa: E402
from reference import adamw, loss_of, make_mlp, micro_batches  # noqa: E402

P, OUT, BATCH, DRAWS, WINDOWS, SIGMA = 16, 2, 16, 4, 150, 0.5


def _target():
    return torch.randn(OUT, P, generator=torch.Generator().manual_seed(7))


def closed_form():
    w = _target()
    signal = float((w * w).sum())
    trace = float(sum((P + 1) * (row @ row) + P * SIGMA**2 for row in w))
    return signal, trace


def _regression_batch(step):
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, P, generator=generator)
    y = x @ _target().T + SIGMA * torch.randn(BATCH, OUT, generator=generator)
    return x, y


def _regression_loss(model, x, y):
    return 0.5 * ((model(x).float() - y) ** 2).sum(dim=1).mean()


def _zero_linear():
    model = torch.nn.Linear(P, OUT, bias=False)
    torch.nn.init.zeros_(model.weight)
    return model


def _drive(step_fn, rank, world_size):
    """Feed WINDOWS * DRAWS global micro-batches (this rank's rows) to ``step_fn(x, y)``."""
    rows = BATCH // world_size
    for step in range(WINDOWS * DRAWS):
        x, y = _regression_batch(step)
        step_fn(x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows])


def _torch_run(rank, world_size, layout):
    model = _zero_linear()
    forward = model
    if layout == "ddp":
        forward = torch.nn.parallel.DistributedDataParallel(model)
    elif layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    wrapper = gqc_dist.OptimizerWrapperFixed(torch.optim.SGD(model.parameters(), lr=0.0), DRAWS,
                                             micro_batch_size=BATCH, noise_beta=0.995)

    def step(x, y):
        _regression_loss(forward, x, y).backward()
        wrapper.step()

    _drive(step, rank, world_size)
    return wrapper.statistics()


def _zero2_run(rank, world_size):
    model = _zero_linear()
    config = {"train_micro_batch_size_per_gpu": BATCH // world_size, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "gradient_quality_control": {"algorithm": "fixed", "accumulation_steps": DRAWS, "noise_beta": 0.995}}
    engine, _, _, _ = gqc_deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config)

    def step(x, y):
        engine.backward(_regression_loss(engine, x, y))
        engine.step()

    _drive(step, rank, world_size)
    return engine.gqc.statistics()


def _assert_close_form(stats):
    signal, trace = closed_form()
    assert stats["gradient_signal_sq"] == pytest.approx(signal, rel=0.15)
    assert stats["gradient_noise_trace"] == pytest.approx(trace, rel=0.15)
    assert stats["gradient_noise_scale"] == pytest.approx(trace / signal, rel=0.15)
    assert stats["gradient_noise_scale_micro_batches"] == pytest.approx(trace / signal / BATCH, rel=0.15)


def test_noise_statistics_match_the_closed_form_on_one_process():
    _assert_close_form(_torch_run(0, 1, "single"))


@pytest.mark.parametrize("layout", ["ddp", "fsdp2"])
def test_noise_statistics_match_the_closed_form_on_two_ranks(layout):
    results = run_distributed(_torch_run, 2, layout, timeout=240)
    assert results[0] == results[1]  # every rank holds the same estimate
    _assert_close_form(results[0])


def test_noise_statistics_match_the_closed_form_on_zero2():
    results = run_distributed(_zero2_run, world_size=2, timeout=300)
    assert results[0]["gradient_noise_scale"] == results[1]["gradient_noise_scale"]
    _assert_close_form(results[0])


def test_statistics_before_an_estimate_and_forced_steps():
    model = _zero_linear()
    wrapper = gqc_dist.OptimizerWrapperFixed(torch.optim.SGD(model.parameters(), lr=0.0), 1)
    x, y = _regression_batch(0)
    _regression_loss(model, x, y).backward()
    wrapper.step()
    stats = wrapper.statistics()
    assert "gradient_noise_scale_micro_batches" not in stats  # windows of one carry no information
    assert stats["forced_steps"] == 1


# ---------------------------------------------------------------- CBC against a hand-written rule
KAPPA, MAX_DRAWS, BETA, PROBE, CBC_STEPS = 1.0, 6, 0.8, 3, 60


def reference_cbc(model, optimizer, batches):
    """CBC by hand: accumulate; ||G_n||^2 from the gradients themselves; at a step with N >= 2
    draws fold N(s1 - sN)/(N-1) and (N sN - s1)/(N-1) into EMAs; target ceil(kappa * noise/signal)
    in [1, MAX_DRAWS], 2 before an estimate and on every PROBE-th window while the target is 1."""
    decisions = []
    draws, steps, first = 0, 0, None
    ema_noise = ema_signal = 0.0
    informative = 0
    for batch in batches:
        loss_of(model, batch).backward()
        draws += 1
        sq = sum(float((p.grad.double() ** 2).sum()) for p in model.parameters())
        if draws == 1:
            first = sq
        if informative == 0:
            target = 2
        elif ema_signal <= 0:
            target = MAX_DRAWS
        else:
            target = math.ceil(KAPPA * max(0.0, ema_noise) / ema_signal - 1e-9)
        target = min(max(target, 1), MAX_DRAWS)
        if target < 2 and steps % PROBE == 0:
            target = 2
        stepped = draws >= min(target, MAX_DRAWS)
        decisions.append(stepped)
        if stepped:
            if draws >= 2:
                mean_sq = sq / draws**2
                ema_noise = BETA * ema_noise + (1 - BETA) * draws * (first - mean_sq) / (draws - 1)
                ema_signal = BETA * ema_signal + (1 - BETA) * (draws * mean_sq - first) / (draws - 1)
                informative += 1
            for p in model.parameters():
                p.grad /= draws
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            draws, steps = 0, steps + 1
    return decisions


def _cbc(model):
    wrapper = gqc_dist.OptimizerWrapperCBC(adamw(model.parameters()), MAX_DRAWS, probe_interval=PROBE,
                                           noise_beta=BETA)
    for group in wrapper.param_groups:
        group["critical_batch_fraction"] = KAPPA
    return wrapper


def _cbc_ddp_run(rank, world_size):
    model = make_mlp()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    wrapper = _cbc(model)
    decisions = []
    for x, y in micro_batches(CBC_STEPS, batch=4 * world_size):
        loss_of(ddp, (x.chunk(world_size)[rank], y.chunk(world_size)[rank])).backward()
        decisions.append(wrapper.step())
    return decisions


def test_cbc_decisions_match_the_hand_written_rule():
    model = make_mlp()
    want = reference_cbc(model, adamw(model.parameters()), micro_batches(CBC_STEPS, batch=8))
    model = make_mlp()
    wrapper = _cbc(model)
    got = []
    for batch in micro_batches(CBC_STEPS, batch=8):
        loss_of(model, batch).backward()
        got.append(wrapper.step())
    assert got == want
    lengths = {n for n in _window_lengths(got)}
    assert len(lengths) > 1  # the rule adapted: windows of different lengths


def test_cbc_on_ddp_takes_the_single_process_decisions_on_every_rank():
    model = make_mlp()
    want = reference_cbc(model, adamw(model.parameters()), micro_batches(CBC_STEPS, batch=8))
    results = run_distributed(_cbc_ddp_run, world_size=2, timeout=240)
    assert results[0] == results[1] == want


def _window_lengths(decisions):
    lengths, run = [], 0
    for stepped in decisions:
        run += 1
        if stepped:
            lengths.append(run)
            run = 0
    return lengths


def test_cbc_factory_sets_kappa_and_anneals_the_learning_rate():
    model = make_mlp()
    wrapper, schedule = gqc_dist.make_cbc_with_cosine_annealing_schedule(
        adamw(model.parameters()), num_training_steps=10, num_warmup_steps=2, kappa=0.25, max_batch_draws=4)
    assert wrapper.param_groups[0]["critical_batch_fraction"] == 0.25 and wrapper.max_draws == 4
    lrs = []
    for _ in range(10):
        lrs.append(wrapper.param_groups[0]["lr"])
        schedule.step()
    peak = 1e-2  # reference.adamw's lr
    assert lrs[0] < lrs[2] == pytest.approx(peak) and wrapper.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)
    with pytest.raises(gqc_dist.GQCConfigError, match="kappa"):
        gqc_dist.make_cbc_with_cosine_annealing_schedule(adamw(make_mlp().parameters()), 10, 2, kappa=-1)
