"""Gradient-noise statistics against a closed form (1 process, DDP, FSDP2 and ZeRO-2 on 2 real
ranks), how fast the estimate follows a change, and the CBC controller against a hand-written
single-process reference on fixed gradient sequences.

Closed form: linear regression ``y = x W*^T + eps`` (``x ~ N(0, I_P)``, ``eps ~ N(0, s^2)``) with
loss ``0.5 * mean_batch ||x W^T - y||^2``, held at ``W = 0`` (learning rate 0). The per-sample
gradient of output ``j`` is ``-(x.w*_j + eps_j) x``, so ``|G|^2 = ||W*||_F^2`` and
``tr(Sigma) = sum_j ((P + 1) |w*_j|^2 + P s^2)``.

The geometry is 64 inputs x 4 outputs (256 parameters), 16 samples per micro-batch, windows of
8. With 64 parameters the estimate's own statistical spread is larger: even a plain average of
400 windows misses the closed form by more than 10% on about 1 seed in 40 there (measured), so
"within 10% for any seed" needs the information a real model's gradient carries.
"""

import math
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import gqc_dist  # noqa: E402
import gqc_dist.frontends.deepspeed as gqc_deepspeed  # noqa: E402
from distributed_harness import run_distributed  # noqa: E402
from reference import reference_windows  # noqa: E402

P, OUT, BATCH, DRAWS, SIGMA = 64, 4, 16, 8, 0.5


def _target(seed):
    return torch.randn(OUT, P, generator=torch.Generator().manual_seed(7 + seed))


def closed_form(seed, sigma=SIGMA):
    """``(|G|^2, tr(Sigma))`` of the regression for data seed ``seed``."""
    w = _target(seed)
    signal = float((w * w).sum())
    trace = float(sum((P + 1) * (row @ row) + P * sigma**2 for row in w))
    return signal, trace


def _regression_batch(seed, step, sigma=SIGMA, rows=BATCH):
    generator = torch.Generator().manual_seed(100_000 * seed + step)
    x = torch.randn(rows, P, generator=generator)
    y = x @ _target(seed).T + sigma * torch.randn(rows, OUT, generator=generator)
    return x, y


def _regression_loss(model, x, y):
    return 0.5 * ((model(x).float() - y) ** 2).sum(dim=1).mean()


def _zero_linear():
    model = torch.nn.Linear(P, OUT, bias=False)
    torch.nn.init.zeros_(model.weight)
    return model


def _torch_run(rank, world_size, layout, seed, windows, checkpoints=(), sigma_after=None):
    """Fixed windows of DRAWS on the regression; the statistics after each window in
    ``checkpoints``. ``sigma_after``: ``(window, sigma)`` switches the label noise there."""
    model = _zero_linear()
    forward = model
    if layout == "ddp":
        forward = torch.nn.parallel.DistributedDataParallel(model)
    elif layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    wrapper = gqc_dist.OptimizerWrapperFixed(torch.optim.SGD(model.parameters(), lr=0.0), DRAWS,
                                             micro_batch_size=BATCH)
    rows = BATCH // world_size
    seen = {}
    for window in range(windows):
        sigma = sigma_after[1] if sigma_after and window >= sigma_after[0] else SIGMA
        for draw in range(DRAWS):
            x, y = _regression_batch(seed, window * DRAWS + draw, sigma)
            _regression_loss(forward, x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]).backward()
            wrapper.step()
        if window + 1 in checkpoints:
            seen[window + 1] = wrapper.statistics()
    return seen


def _zero2_run(rank, world_size, seed, windows):
    model = _zero_linear()
    config = {"train_micro_batch_size_per_gpu": BATCH // world_size, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "gradient_quality_control": {"algorithm": "fixed", "accumulation_steps": DRAWS}}
    engine, _, _, _ = gqc_deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config)
    rows = BATCH // world_size
    for step in range(windows * DRAWS):
        x, y = _regression_batch(seed, step)
        engine.backward(_regression_loss(engine, x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]))
        engine.step()
    return engine.gqc.statistics()


def _relative_errors(stats, seed):
    signal, trace = closed_form(seed)
    return {"signal": stats["gradient_signal_sq"] / signal - 1,
            "trace": stats["gradient_noise_trace"] / trace - 1,
            "noise_scale": stats["gradient_noise_scale"] / (trace / signal) - 1,
            "micro_batches": stats["gradient_noise_scale_micro_batches"] / (trace / signal / BATCH) - 1}


def _assert_within(stats, seed, tolerance):
    errors = _relative_errors(stats, seed)
    assert all(abs(e) <= tolerance for e in errors.values()), (seed, errors)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_noise_statistics_match_the_closed_form_on_one_process(seed):
    seen = _torch_run(0, 1, "single", seed, 400, checkpoints=(100, 400))
    _assert_within(seen[100], seed, 0.15)
    _assert_within(seen[400], seed, 0.10)


def test_noise_statistics_match_the_closed_form_on_ddp():
    """Seed 1 (FSDP2 and ZeRO-2 run seed 0; one process runs five seeds)."""
    results = run_distributed(_torch_run, 2, "ddp", 1, 400, (100, 400), timeout=300)
    assert results[0] == results[1]  # every rank holds the same estimate
    _assert_within(results[0][100], 1, 0.15)
    _assert_within(results[0][400], 1, 0.10)


def test_noise_statistics_match_the_closed_form_on_fsdp2():
    results = run_distributed(_torch_run, 2, "fsdp2", 0, 100, (100,), timeout=300)
    assert results[0] == results[1]
    _assert_within(results[0][100], 0, 0.15)


def test_noise_statistics_match_the_closed_form_on_zero2():
    results = run_distributed(_zero2_run, 2, 0, 100, timeout=300)
    assert results[0]["gradient_noise_scale"] == results[1]["gradient_noise_scale"]
    _assert_within(results[0], 0, 0.15)


def test_the_estimate_follows_a_doubling_noise_scale():
    """Label noise switched at window 200 so that ``B_simple`` doubles: the lag, in windows,
    until the estimate reaches the geometric midpoint and then stays within 15% of the new value."""
    signal, trace = closed_form(0)
    old = trace / signal
    sigma = math.sqrt(SIGMA**2 + old * signal / (P * OUT))  # tr(Sigma) grows by old * |G|^2
    new = closed_form(0, sigma)[1] / signal
    assert new == pytest.approx(2 * old)
    marks = tuple(range(201, 601))
    seen = _torch_run(0, 1, "single", 0, 600, checkpoints=(200, *marks), sigma_after=(200, sigma))
    assert seen[200]["gradient_noise_scale"] == pytest.approx(old, rel=0.10)
    estimates = {w: seen[w]["gradient_noise_scale"] for w in marks}
    halfway = next(w for w in marks if estimates[w] >= old * math.sqrt(2)) - 200
    close = next(w for w in marks if all(abs(estimates[v] / new - 1) <= 0.15 for v in marks if v >= w)) - 200
    print(f"lag: geometric midpoint after {halfway} windows, within 15% of the doubled value after {close}")
    assert halfway <= 80 and close <= 200  # measured: 54 and 119 (it remembers about half the run)


def test_statistics_before_an_estimate_and_forced_steps():
    model = _zero_linear()
    wrapper = gqc_dist.OptimizerWrapperFixed(torch.optim.SGD(model.parameters(), lr=0.0), 1)
    x, y = _regression_batch(0, 0)
    _regression_loss(model, x, y).backward()
    wrapper.step()
    stats = wrapper.statistics()
    assert "gradient_noise_scale_micro_batches" not in stats  # windows of one carry no information
    assert stats["forced_steps"] == 1


# ---------------------------------------------------------------- CBC against a hand-written rule
def synthetic_gradients(count, dim, noise_scale, seed=0, drift=None):
    """``count`` micro-batch gradients ``G + e_i`` with ``|G| = 1`` and ``E|e_i|^2 =
    noise_scale``: a gradient noise scale of ``noise_scale`` micro-batches. ``drift(i)``
    multiplies the noise of gradient ``i``."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=generator, dtype=torch.float64)
    mean /= mean.norm()
    out = []
    for i in range(count):
        scale = math.sqrt(noise_scale / dim) * (drift(i) if drift else 1.0)
        out.append((mean + scale * torch.randn(dim, generator=generator, dtype=torch.float64)).float())
    return out


def reference_cbc(grads, kappa, max_draws, probe, growth=2.0, min_draws=1, rounding="ceil"):
    """Hand-written CBC: ``kappa * T / S`` from the hand-written estimate, rounded up or dithered."""
    return reference_windows(grads, lambda noise, signal: kappa * max(0.0, noise) / signal if signal > 0 else math.inf,
                             max_draws, probe, growth, min_draws, dither=rounding == "dither")


def _cbc_lengths(grads, kappa, max_draws, probe, world=1, rank=0, **kwargs):
    """The window lengths gqc_dist's CBC takes on ``grads`` (set as each micro-batch's gradient of
    one parameter; under DDP-like replication every rank adds the same)."""
    param = torch.nn.Parameter(torch.zeros(grads[0].numel()))
    wrapper = gqc_dist.OptimizerWrapperCBC(torch.optim.SGD([param], lr=0.0), max_draws, probe_interval=probe,
                                           **kwargs)
    for group in wrapper.param_groups:
        group["critical_batch_fraction"] = kappa
    return window_lengths(wrapper, param, grads)


def window_lengths(wrapper, param, grads):
    """The window lengths ``wrapper`` takes when each of ``grads`` in turn is added to ``param``'s
    gradient as one micro-batch's."""
    lengths, n = [], 0
    for g in grads:
        param.grad = g.clone() if param.grad is None else param.grad + g
        n += 1
        if wrapper.step():
            lengths.append(n)
            n = 0
    return lengths


def _cbc_on_ranks(rank, world_size, count, noise_scale, kappa, max_draws, probe):
    # the gradients are made here: a list of tensors passed to the ranks would cost a file
    # descriptor per tensor
    return _cbc_lengths(synthetic_gradients(count, 256, noise_scale), kappa, max_draws, probe)


@pytest.mark.parametrize("noise_scale, kappa, rounding", [(0.3, 0.25, "ceil"), (24.0, 0.25, "ceil"), (24.0, 1.0, "ceil"),
                                                      (0.3, 0.25, "dither"), (10.0, 0.25, "dither")])
def test_cbc_windows_match_the_hand_written_rule(noise_scale, kappa, rounding):
    grads = synthetic_gradients(3000, 256, noise_scale)
    want = reference_cbc(grads, kappa, max_draws=16, probe=24, rounding=rounding)
    assert _cbc_lengths(grads, kappa, 16, 24, rounding=rounding) == want
    assert len(set(want)) > 1  # the rule adapted: windows of different lengths


def test_dithered_windows_average_the_rule_where_ceil_overshoots():
    """B_simple 24 micro-batches, kappa 0.1: the rule asks for 2.4. Rounded up, every settled
    window takes 3 (25% over); dithered, the windows take 2 and 3 and average 2.4 (within the
    estimate's own spread)."""
    grads = synthetic_gradients(6000, 256, 24.0)
    late = {}
    for rounding in ("ceil", "dither"):
        lengths = _cbc_lengths(grads, 0.1, 16, 24, rounding=rounding)
        late[rounding] = lengths[len(lengths) // 2:]
    assert sum(late["ceil"]) / len(late["ceil"]) >= 2.9
    assert sum(late["dither"]) / len(late["dither"]) == pytest.approx(2.4, rel=0.1)
    assert {2, 3} <= set(late["dither"]) and max(late["dither"]) <= 4
    with pytest.raises(gqc_dist.GQCConfigError, match="rounding must be one of ceil, dither, got 'round'"):
        gqc_dist.OptimizerWrapperCBC(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0), 4, rounding="round")


def test_cbc_settles_where_the_noise_scale_is_constant():
    """B_simple 24 micro-batches, kappa 0.25: the windows settle at the target 6, they do not
    run away to max_draws; where B_simple is 0.3, 95% of windows take one micro-batch."""
    lengths = _cbc_lengths(synthetic_gradients(6000, 256, 24.0), 0.25, 16, 24)
    late = lengths[len(lengths) // 2:]
    assert sum(late) / len(late) == pytest.approx(6, rel=0.3) and max(late) < 16
    small = _cbc_lengths(synthetic_gradients(3000, 256, 0.3), 0.25, 16, 24)
    assert small.count(1) / len(small) >= 0.95


def test_cbc_follows_a_rising_noise_scale_without_bursts():
    """The noise scale rises 4x over the run: the windows rise with it, a window is at most
    twice the previous one (or 2), and they never reach max_draws."""
    grads = synthetic_gradients(8000, 256, 8.0, drift=lambda i: 1 + i / 8000)  # noise power x4
    lengths = _cbc_lengths(grads, 0.5, 32, 24)
    assert lengths == reference_cbc(grads, 0.5, 32, 24)
    assert all(b <= max(2, 2 * a) for a, b in zip(lengths, lengths[1:]))
    early, late = lengths[10:60], lengths[-50:]
    assert sum(late) / len(late) > 2.5 * sum(early) / len(early) and max(lengths) < 32


def test_cbc_on_ddp_takes_the_single_process_windows_on_every_rank():
    want = reference_cbc(synthetic_gradients(1500, 256, 24.0), 0.25, 16, 24)
    results = run_distributed(_cbc_on_ranks, 2, 1500, 24.0, 0.25, 16, 24, timeout=240)
    assert results[0] == results[1] == want


def test_cbc_min_draws_is_rank_zeros_param_group_value():
    """``min_draws`` is a schedulable param-group key; the decision uses it (here set from
    outside, as a schedule or the Seesaw hook would)."""
    param = torch.nn.Parameter(torch.zeros(4))
    wrapper = gqc_dist.OptimizerWrapperCBC(torch.optim.SGD([param], lr=0.0), 16, min_draws=3)
    assert wrapper.param_groups[0]["min_draws"] == 3
    lengths, n = [], 0
    for step, g in enumerate(synthetic_gradients(60, 4, 0.01)):
        if step == 30:
            wrapper.param_groups[0]["min_draws"] = 5.0
        param.grad = g.clone() if param.grad is None else param.grad + g
        n += 1
        if wrapper.step():
            lengths.append(n)
            n = 0
    assert lengths[:3] == [3, 3, 3] and all(n >= 3 for n in lengths) and lengths[-1] == 5
    with pytest.raises(gqc_dist.GQCConfigError, match="min_draws"):
        gqc_dist.OptimizerWrapperCBC(torch.optim.SGD([param], lr=0.0), 4, min_draws=5)


def test_cbc_factory_sets_kappa_and_anneals_the_learning_rate():
    from reference import adamw, make_mlp

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
