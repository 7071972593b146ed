"""Split micro-batches (``after_part``) and CBC's split probes (``probe="split"``).

Oracles: the two-batch-size closed form of one split window; the linear-regression closed form
of ``test_noise_scale`` (B_simple about 1.3 micro-batches here: the regime where probes run);
a run that takes every micro-batch whole (a split must not change a step); CBC with
``probe="extra"`` on the same gradients (a host that does not split must get exactly those
windows); and gqc-train's fixed k = 1 baseline.
"""

import math

import pytest
import torch

import gqc_dist
from gqc_dist.core.noise_scale import NoiseScaleEstimator
from distributed_harness import run_distributed
from reference import adamw, make_mlp, micro_batches
import test_noise_scale as regression
from test_noise_scale import synthetic_gradients
from train_runs import gqc_train, records, summary

ROWS = 64  # samples per micro-batch in the regression: B_simple about 1.3 micro-batches


def test_a_split_window_is_the_two_batch_size_closed_form():
    """One window of one micro-batch, its first half observed: ``E s_b = |G|^2 + T / b`` at
    ``b = 1/2`` and ``1`` gives ``T`` and ``|G|^2`` in closed form."""
    half_sq, whole_sq = 3.0, 2.0  # ||g_half / 2||^2 (the part, scaled by its fraction) and ||g||^2
    estimator = NoiseScaleEstimator()
    estimator.observe(0.5, half_sq)
    estimator.observe(1, whole_sq)
    estimator.close_window(1, whole_sq, position=1)
    s_small = half_sq / 0.25  # the half's own mean gradient
    noise = (s_small - whole_sq) / (1 / 0.5 - 1)
    assert estimator.noise_per_micro_batch() == pytest.approx(noise)
    assert estimator.signal_sq() == pytest.approx(whole_sq - noise)
    unsplit = NoiseScaleEstimator()  # a window of one taken whole says nothing
    unsplit.observe(1, whole_sq)
    unsplit.close_window(1, whole_sq, position=1)
    assert not unsplit.estimable


def _split_regression(rank, world_size, layout, seed, windows):
    """Windows of one micro-batch, each taken in two halves with ``after_part`` between; the
    statistics at the end."""
    model = regression._zero_linear()
    forward = torch.nn.parallel.DistributedDataParallel(model) if layout == "ddp" else model
    wrapper = gqc_dist.OptimizerWrapperFixed(torch.optim.SGD(model.parameters(), lr=0.0), 1, micro_batch_size=ROWS)
    rows = ROWS // world_size
    for window in range(windows):
        x, y = (t[rank * rows:(rank + 1) * rows] for t in regression._regression_batch(seed, window, rows=ROWS))
        half = rows // 2
        (0.5 * regression._regression_loss(forward, x[:half], y[:half])).backward()
        wrapper.after_part(0.5)
        (0.5 * regression._regression_loss(forward, x[half:], y[half:])).backward()
        wrapper.step()
    return wrapper.statistics()


def _noise_scale_error(stats, seed):
    signal, trace = regression.closed_form(seed)
    return stats["gradient_noise_scale"] / (trace / signal) - 1


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_split_windows_of_one_measure_the_closed_form(seed):
    """Measured over seeds 0-7: within 3% after 800 windows, 11% after 400."""
    error = _noise_scale_error(_split_regression(0, 1, "single", seed, 800), seed)
    assert abs(error) <= 0.10, error


def test_split_windows_on_ddp_measure_the_closed_form_on_every_rank():
    results = run_distributed(_split_regression, 2, "ddp", 0, 800, timeout=300)
    assert results[0] == results[1]
    assert abs(_noise_scale_error(results[0], 0)) <= 0.10


# ---------------------------------------------------------------- a split does not change a step
def _train(rank, world_size, split_every, steps=12):
    """AdamW on the MLP, windows of one micro-batch; every ``split_every``-th micro-batch (0:
    none) taken in two halves. Returns the parameters and whether a noise estimate exists."""
    model = make_mlp()
    forward = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    wrapper = gqc_dist.OptimizerWrapperFixed(adamw(model.parameters()), 1)
    rows = 8 // world_size
    for index, (x, y) in enumerate(micro_batches(steps, batch=8)):
        x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        if split_every and index % split_every == 0:
            half = rows // 2
            (0.5 * torch.nn.functional.mse_loss(forward(x[:half]), y[:half])).backward()
            wrapper.after_part(0.5)
            (0.5 * torch.nn.functional.mse_loss(forward(x[half:]), y[half:])).backward()
        else:
            torch.nn.functional.mse_loss(forward(x), y).backward()
        assert wrapper.step()
    return [p.detach().clone() for p in model.parameters()], wrapper.statistics()


def test_a_split_micro_batch_steps_as_the_whole_one_on_one_process_and_ddp():
    whole, whole_stats = _train(0, 1, 0)
    split, split_stats = _train(0, 1, 3)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(whole, split))
    assert "gradient_noise_scale_micro_batches" not in whole_stats
    assert math.isfinite(split_stats["gradient_noise_scale_micro_batches"])
    ranks = run_distributed(_train, 2, 3, timeout=240)
    for params, stats in ranks:
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(whole, params))
    assert ranks[0][1]["gradient_noise_scale_micro_batches"] == ranks[1][1]["gradient_noise_scale_micro_batches"]


# ---------------------------------------------------------------- CBC's split probes
def _cbc_windows(grads, noise_scale, kappa, probe, split, seed=0, offset=None):
    """CBC's windows when micro-batch ``i``'s gradient is ``grads[i]`` (``synthetic_gradients``
    of ``noise_scale``); where ``split`` and the wrapper asks (``split_next``), the micro-batch
    comes in two halves ``g + d`` and ``g - d`` with ``d`` distributed as the noise (each half
    has twice a micro-batch's noise, and they average to the micro-batch's gradient), or ``d``
    the given ``offset``."""
    param = torch.nn.Parameter(torch.zeros(grads[0].numel()))
    wrapper = gqc_dist.OptimizerWrapperCBC(torch.optim.SGD([param], lr=0.0), 16, probe=probe, rounding="dither")
    for group in wrapper.param_groups:
        group["critical_batch_fraction"] = kappa
    generator = torch.Generator().manual_seed(seed)
    lengths, n, splits = [], 0, 0
    for g in grads:
        base = torch.zeros_like(g) if param.grad is None else param.grad
        if split and wrapper.split_next:
            d = torch.randn(g.shape, generator=generator) * math.sqrt(noise_scale / g.numel()) \
                if offset is None else offset
            param.grad = base + 0.5 * (g + d)
            wrapper.after_part(0.5)
            param.grad = base + g  # the halves average to the micro-batch's gradient
            splits += 1
        else:
            param.grad = base + g
        n += 1
        if wrapper.step():
            lengths.append(n)
            n = 0
    return lengths, splits, wrapper.statistics()


def test_split_probes_keep_every_window_at_one_where_the_target_is_one():
    """B_simple 0.3 micro-batches, kappa 0.25: with extra probes 1 window in 24 takes two; split,
    every window takes one and the estimate is still there."""
    grads = synthetic_gradients(3000, 256, 0.3)
    extra, _, _ = _cbc_windows(grads, 0.3, 0.25, "extra", split=False)
    split, splits, stats = _cbc_windows(grads, 0.3, 0.25, "split", split=True)
    assert extra.count(2) >= len(extra) / 25
    assert set(split) == {1} and len(split) == 3000
    assert splits == len(range(0, 3000, 24))  # every 24th window, the first included (no estimate yet)
    assert 0 < stats["gradient_noise_scale_micro_batches"] < 1


def test_split_probes_follow_a_large_noise_scale_as_extra_ones_do():
    """B_simple 24, kappa 0.25: the windows settle at the rule's 6 either way, and windows
    that take more than one micro-batch are not split."""
    grads = synthetic_gradients(6000, 256, 24.0)
    for probe in ("extra", "split"):
        lengths, splits, _ = _cbc_windows(grads, 24.0, 0.25, probe, split=probe == "split")
        late = lengths[len(lengths) // 2:]
        assert sum(late) / len(late) == pytest.approx(6, rel=0.3) and max(late) < 16
    # split: the first window, then only probe windows after a window of one (longer ones inform)
    assert splits == 1 + sum(1 for i in range(24, len(lengths), 24) if lengths[i - 1] == 1)


def test_a_host_that_does_not_split_gets_the_extra_probes():
    grads = synthetic_gradients(1500, 256, 0.3)
    not_split = _cbc_windows(grads, 0.3, 0.25, "split", split=False)[0]
    assert not_split == _cbc_windows(grads, 0.3, 0.25, "extra", split=False)[0] and 2 in not_split


def _cbc_split_on_ranks(rank, world_size):
    return _cbc_windows(synthetic_gradients(1500, 256, 3.0), 3.0, 0.25, "split", split=True)[:2]


def test_split_probes_on_ddp_take_the_single_process_windows_on_every_rank():
    want = _cbc_windows(synthetic_gradients(1500, 256, 3.0), 3.0, 0.25, "split", split=True)[:2]
    assert run_distributed(_cbc_split_on_ranks, 2, timeout=240) == [want, want]


def _local_unmeasured(rank, world_size, probe):
    """Rank-local accumulation where the ranks' gradients cancel (rank ``r``: ``g + (-1)^r e``,
    ``e`` far above ``g``): the signal estimate from local against reduced norms stays negative."""
    param = torch.nn.Parameter(torch.zeros(4))
    wrapper = gqc_dist.OptimizerWrapperCBC(torch.optim.SGD([param], lr=0.0), 16, probe=probe, rounding="dither",
                                           local_accumulation=True)
    g, e = torch.ones(4), 10 * torch.tensor([1.0, -1.0, 1.0, -1.0])
    lengths, n, targets = [], 0, []
    for _ in range(40):
        if n == 0:
            targets.append(wrapper.target_draws())
        param.grad = (torch.zeros(4) if param.grad is None else param.grad) + g + (-1) ** rank * e
        n += 1
        if wrapper.step():
            lengths.append(n)
            n = 0
    return lengths, targets[:len(lengths)], wrapper.statistics()["gradient_noise_scale_micro_batches"]


@pytest.mark.parametrize("probe", ["split", "extra"])
def test_rank_local_windows_hold_while_the_signal_is_unknown_as_logged(probe):
    """Under rank-local accumulation on 2 ranks every window informs the estimate: with split
    probes an unmeasured signal holds the window at one, as the target logged at each window's
    start says (extra probes creep, as they do everywhere)."""
    results = run_distributed(_local_unmeasured, 2, probe)
    lengths, targets, noise = results[0]
    assert results[1] == results[0] and noise == math.inf
    assert lengths == targets  # each window took what its start said
    assert lengths == ([1] * 40 if probe == "split" else [1, 2, 3, 4, 5, 6, 7, 8])  # 36 of the 40 micro-batches


# ---------------------------------------------------------------- misuse
def test_after_part_misuse_is_one_clear_line():
    param = torch.nn.Parameter(torch.zeros(4))
    wrapper = gqc_dist.OptimizerWrapperCBC(torch.optim.SGD([param], lr=0.1), 4, probe="split")
    for bad in (0, 1, 1.5, True, "half"):
        with pytest.raises(gqc_dist.GQCConfigError, match="after_part: fraction must be a number strictly between 0 and 1"):
            wrapper.after_part(bad)
    param.grad = torch.full((4,), 0.5)  # half of a noiseless micro-batch: B_simple measures 0
    wrapper.after_part(0.5)
    with pytest.raises(gqc_dist.GQCUsageError, match="state_dict\\(\\) between after_part\\(\\) and after_backward"):
        wrapper.state_dict()
    with pytest.raises(gqc_dist.GQCUsageError, match="after_part\\(\\) was already called"):
        wrapper.after_part(0.5)
    param.grad = torch.ones(4)
    wrapper.step()
    wrapper.state_dict()  # fine once the micro-batch is in
    local = gqc_dist.OptimizerWrapperCBC(torch.optim.SGD([param], lr=0.1), 4, probe="split", local_accumulation=True)
    # the next probe is the 24th window; local mode splits nothing (after_part observes nothing there)
    assert wrapper.split_next is False and local.split_next is False
    assert gqc_dist.OptimizerWrapperCBC(torch.optim.SGD([param], lr=0.1), 4, probe="split").split_next
    with pytest.raises(gqc_dist.GQCConfigError, match="probe must be one of extra, split, got 'half'"):
        gqc_dist.OptimizerWrapperCBC(torch.optim.SGD([param], lr=0.1), 4, probe="half")


# ---------------------------------------------------------------- gqc-train
def test_gqc_train_with_split_probes_runs_as_fixed_k1_where_the_target_is_one(tmp_path):
    """kappa 0.01 keeps CBC's target at one micro-batch: with split probes its run is fixed
    k = 1's up to the float summation order of the split micro-batches, with a noise estimate."""
    common = ["--quick", "--no-progress", "--set", "train.tokens=24576", "--set", "train.eval_interval=1000"]
    gqc_train(*common, "--out-dir", str(tmp_path / "fixed"), "--baseline", "1")
    gqc_train(*common, "--out-dir", str(tmp_path / "cbc"), "--set", "gqc.kappa=0.01", "--set", "gqc.probe=split")
    fixed, cbc = records(tmp_path / "fixed"), records(tmp_path / "cbc")
    assert [r["draws"] for r in cbc] == [r["draws"] for r in fixed] == [1] * len(fixed)
    assert all(r["noise_scale"] is not None for r in cbc)
    assert summary(tmp_path / "cbc")["val_loss"] == pytest.approx(summary(tmp_path / "fixed")["val_loss"], rel=1e-4)
    for a, b in zip(fixed, cbc):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["lr"] == pytest.approx(b["lr"], rel=1e-9)


def test_while_the_signal_is_unknown_split_probes_hold_the_window_and_split_it():
    """A signal estimate that is not positive (``B_simple`` reads infinite) means the noise is not
    measured yet. Hand-made gradients keep it so: micro-batch ``i`` is ``g + (-1)^i e`` and a split
    one comes as halves ``g_i + d`` and ``g_i - d``, with ``e`` and ``d`` far above ``g``. Extra
    probes creep up one micro-batch a window (the oracle: ``bounded_draws`` on an infinite
    target); split probes keep every window at one and split each of them, and a host that does
    not split gets the extra micro-batch each time instead."""
    g, e, d = torch.ones(4), 10 * torch.tensor([1.0, -1.0, 1.0, -1.0]), 30 * torch.tensor([1.0, 1.0, -1.0, -1.0])
    grads = [g + (-1) ** i * e for i in range(60)]

    def run(probe, split=True):
        lengths, splits, stats = _cbc_windows(grads, None, 0.25, probe, split, offset=d)
        assert stats["gradient_noise_scale_micro_batches"] == math.inf
        return lengths, splits

    extra, _ = run("extra")
    assert extra[:5] == [2, 3, 4, 5, 6]  # no estimate: 2; then one more than the last each window
    split, splits = run("split")
    assert split == [1] * 60 and splits == 60
    assert run("split", split=False) == ([2] * 30, 0)
