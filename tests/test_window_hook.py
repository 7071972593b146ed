"""The window hook: the learning rate (and weight decay) applied at a step that used ``n``
micro-batches is the rule's value, identical on every rank, on DDP, FSDP2 and DeepSpeed ZeRO-2,
while the engine's own scheduler keeps its values; the Seesaw floor; gqc-train's schedule. With
``window_gradient="sqrt"`` the optimizer steps on the window's sum over ``sqrt(n)``.

Oracle: a single-process replay on the same global micro-batches that sums each window's
gradients, divides by ``n`` (or ``sqrt(n)``) and takes SGD's step by hand with
``lr = base * schedule(step) * sqrt(n)`` and weight decay ``wd * sqrt(n)``.
"""

import math
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import gqc_dist  # noqa: E402
import gqc_dist.frontends.deepspeed as gqc_deepspeed  # noqa: E402
from distributed_harness import run_distributed  # noqa: E402
from gqc_dist.core.window import LRCoupling, Window  # noqa: E402
from reference import loss_of, make_mlp, micro_batches  # noqa: E402

LR, WD, K, MICRO_STEPS, ROWS = 0.1, 0.01, 1.5, 12, 4  # K 1.5: windows of 1, 2, 1, 2, ...


def schedule(step):
    return 1.0 / (1.0 + 0.5 * step)


def oracle(world_size, gradient="mean"):
    """Parameters after the replay, and the (n, lr) of every step."""
    model = make_mlp()
    batches = micro_batches(MICRO_STEPS, batch=ROWS * world_size)
    steps, index, step = [], 0, 0
    while index < len(batches):
        n = 1 if step % 2 == 0 else 2
        window = batches[index:index + n]
        model.zero_grad()
        for batch in window:
            loss_of(model, batch).backward()
        lr, wd = LR * schedule(step) * math.sqrt(n), WD * math.sqrt(n)
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * (p.grad / (len(window) if gradient == "mean" else math.sqrt(len(window))) + wd * p)
        steps.append((n, lr))
        index, step = index + n, step + 1
    return [p.detach().clone() for p in model.parameters()], steps


def _torch_run(rank, world_size, layout, gradient="mean"):
    model = make_mlp()
    forward = model
    if layout == "ddp":
        forward = torch.nn.parallel.DistributedDataParallel(model)
    elif layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=WD)
    wrapper = gqc_dist.OptimizerWrapperFixed(optimizer, K, window_hook=LRCoupling("sqrt"), window_gradient=gradient)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    steps = []
    for x, y in micro_batches(MICRO_STEPS, batch=ROWS * world_size):
        loss_of(forward, (x.chunk(world_size)[rank], y.chunk(world_size)[rank])).backward()
        if wrapper.step():
            scheduler.step()
            window = wrapper.last_window
            steps.append((window.num_draws, window.lr, optimizer.param_groups[0]["lr"],
                          optimizer.param_groups[0]["weight_decay"]))
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]
    return params, steps


def _zero2_run(rank, world_size, gradient="mean"):
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=WD)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    config = {"train_micro_batch_size_per_gpu": ROWS, "gradient_clipping": 0.0, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "gradient_quality_control": {"algorithm": "fixed", "accumulation_steps": K, "lr_coupling": "sqrt",
                                           "window_gradient": gradient}}
    engine, _, _, _ = gqc_deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config)
    steps = []
    for x, y in micro_batches(MICRO_STEPS, batch=ROWS * world_size):
        engine.backward(loss_of(engine, (x.chunk(world_size)[rank], y.chunk(world_size)[rank])))
        if engine.step():  # DeepSpeed steps the scheduler inside
            window = engine.gqc.last_window
            group = engine.gqc.param_groups[0]
            steps.append((window.num_draws, window.lr, group["lr"], group["weight_decay"]))
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).detach().clone() for p in engine.module.parameters()], steps


def _check(results, world_size, gradient="mean"):
    want_params, want_steps = oracle(world_size, gradient)
    assert results[0][1] == results[1][1]  # every rank applied the same values
    params, steps = results[0]
    assert [n for n, _, _, _ in steps] == [n for n, _ in want_steps]
    assert [lr for _, lr, _, _ in steps] == pytest.approx([lr for _, lr in want_steps], rel=1e-12)
    for step, (_, _, group_lr, group_wd) in enumerate(steps):
        assert group_lr == pytest.approx(LR * schedule(step + 1), rel=1e-12)  # the scheduler's own value
        assert group_wd == WD  # coupled for the step only
    for got, want in zip(params, want_params):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout,gradient", [("ddp", "mean"), ("ddp", "sqrt"), ("fsdp2", "mean")])
def test_the_hook_sets_each_steps_learning_rate_on_torch_engines(layout, gradient):
    _check(run_distributed(_torch_run, 2, layout, gradient, timeout=240), 2, gradient)


@pytest.mark.parametrize("gradient", ["mean", "sqrt"])
def test_the_hook_sets_each_steps_learning_rate_on_zero2(gradient):
    _check(run_distributed(_zero2_run, 2, gradient, timeout=300), 2, gradient)


@pytest.mark.parametrize("gradient", ["mean", "sqrt"])
def test_the_hook_on_one_process_matches_the_replay(gradient):
    _check([_torch_run(0, 1, "single", gradient)] * 2, 1, gradient)


def test_window_gradient_rejects_an_unknown_kind():
    optimizer = torch.optim.SGD(make_mlp().parameters(), lr=LR)
    for bad, shown in (("sum", "'sum'"), (["sqrt"], r"\['sqrt'\]")):
        with pytest.raises(gqc_dist.GQCConfigError, match=f"window_gradient must be one of mean, sqrt, got {shown}"):
            gqc_dist.OptimizerWrapperFixed(optimizer, 2, window_gradient=bad)
    assert set(optimizer.param_groups[0]) == set(torch.optim.SGD(make_mlp().parameters(), lr=LR).param_groups[0])


def _window(step=0, n=1, seen=1):
    return Window(step=step, num_draws=n, micro_batches_seen=seen, micro_batch_size=8, noise_scale=None,
                  forced=False)


def test_lr_coupling_rules_and_seesaw_floor():
    groups = [{"lr": 1.0, "weight_decay": 0.1}]
    LRCoupling("linear", weight_decay=False)(_window(n=4), groups)
    assert groups == [{"lr": 4.0, "weight_decay": 0.1}]
    groups = [{"lr": 1.0, "weight_decay": 0.1, "min_draws": 1.0}]
    decay = {0: 1.0, 1: 0.5, 2: 0.1}
    hook = LRCoupling("sqrt", schedule=lambda w: decay[w.step], warmup=lambda w: 1.0, seesaw=True)
    hook(_window(step=2, n=9), groups)
    # where the schedule decayed 10x: floor 10; with sqrt, 9 micro-batches: lr 0.1 * 3
    assert groups[0]["min_draws"] == 10.0 and groups[0]["lr"] == pytest.approx(0.3)
    assert groups[0]["weight_decay"] == pytest.approx(0.3)
    noise = LRCoupling("noise", weight_decay=False)
    for b, n in ((6.0, 4), (0.3, 8), (100.0, 2)):  # sqrt of McCandlish's ratio of optimal steps
        groups = [{"lr": 1.0}]
        noise(Window(step=3, num_draws=n, micro_batches_seen=9, micro_batch_size=8, noise_scale=b, forced=False),
              groups)
        assert groups[0]["lr"] == pytest.approx(math.sqrt((1 + b) / (1 + b / n)))
    assert noise.factor(4, None) == 1.0 and noise.factor(4, math.inf) == pytest.approx(2.0)
    with pytest.raises(gqc_dist.GQCConfigError, match="rule"):
        LRCoupling("cubic")
    with pytest.raises(gqc_dist.GQCConfigError, match="seesaw needs a schedule"):
        LRCoupling(seesaw=True)
    with pytest.raises(gqc_dist.GQCConfigError, match='seesaw must be true, false or "noise", got \'yes\''):
        LRCoupling(schedule=lambda w: 1.0, seesaw="yes")
    with pytest.raises(gqc_dist.GQCConfigError, match="window_hook must be callable"):
        gqc_dist.OptimizerWrapperFixed(torch.optim.SGD(make_mlp().parameters(), lr=0.1), 2, window_hook=3)


def test_seesaw_noise_grows_the_floor_only_up_to_the_noise_scale():
    """Where the schedule decayed 10x (Seesaw: floor 10), ``"noise"`` stops the floor at the
    window's noise scale, and grows nothing without a finite estimate; the learning rate is the
    schedule's times the sqrt rule of the window actually taken, as for ``True``."""
    hook = LRCoupling("sqrt", schedule=lambda w: 0.1, seesaw="noise", weight_decay=False)
    for noise, floor in ((25.0, 10.0), (6.7, 6.0), (0.4, 1.0), (None, 1.0), (math.inf, 1.0)):
        groups = [{"lr": 1.0, "min_draws": 1.0}]
        hook(Window(step=5, num_draws=4, micro_batches_seen=90, micro_batch_size=2, noise_scale=noise,
                    forced=False), groups)
        assert groups == [{"lr": pytest.approx(0.1 * 2.0), "min_draws": floor}]


def test_seesaw_raises_cbcs_floor_as_the_schedule_decays():
    """CBC with a noise scale far below one micro-batch takes windows of one; with Seesaw on a
    schedule that halves every 10 steps its windows grow 1, 2, 4 as the learning rate falls by
    sqrt(2) per halving (the coupled lr is base * decay * sqrt(n))."""
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([param], lr=1.0)
    hook = LRCoupling("sqrt", schedule=lambda w: 0.5 ** (w.step // 10), seesaw=True)
    wrapper = gqc_dist.OptimizerWrapperCBC(optimizer, 16, probe_interval=1000, window_hook=hook)
    n, lengths, lrs = 0, [], []
    generator = torch.Generator().manual_seed(0)
    while len(lengths) < 31:
        g = torch.ones(4) + 0.01 * torch.randn(4, generator=generator)  # B_simple far below 1
        param.grad = g if param.grad is None else param.grad + g
        n += 1
        if wrapper.step():
            lengths.append(n)
            lrs.append(wrapper.last_window.lr)
            n = 0
    assert lengths[2:10] == [1] * 8 and lengths[11:20] == [2] * 9 and lengths[21:30] == [4] * 9
    assert lrs[15] == pytest.approx(0.5 * math.sqrt(2)) and lrs[25] == pytest.approx(0.25 * 2)


def test_clipping_bounds_what_the_optimizer_receives_under_sqrt():
    """Windows of 2 and 3 at SGD lr 1 without momentum: the step is the sum over sqrt(n),
    scaled to norm ``clip`` where it is longer (oracle: by hand)."""
    from gqc_dist.engines import TorchOptimizerGradients

    for clip in (0.0, 0.05):
        model, want = make_mlp(), make_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        wrapper = gqc_dist.OptimizerWrapperFixed(optimizer, 2.5, window_gradient="sqrt",
                                                 gradients=TorchOptimizerGradients(optimizer, clip=clip))
        batches = micro_batches(5)
        for batch in batches:
            loss_of(model, batch).backward()
            wrapper.step()
        for window in (batches[:2], batches[2:]):  # 2.5: windows of 2, then 3
            grads = [torch.zeros_like(p) for p in want.parameters()]
            for batch in window:
                for g, piece in zip(grads, torch.autograd.grad(loss_of(want, batch), list(want.parameters()))):
                    g += piece
            grads = [g / math.sqrt(len(window)) for g in grads]
            norm = torch.sqrt(sum((g * g).sum() for g in grads))
            factor = min(1.0, clip / (float(norm) + 1e-6)) if clip else 1.0
            assert not clip or float(norm) > clip  # the clip is in force
            with torch.no_grad():
                for p, g in zip(want.parameters(), grads):
                    p -= factor * g
        for got, expected in zip(model.parameters(), want.parameters()):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
