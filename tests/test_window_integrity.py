"""The wrapper knows its window is intact: a gradient cleared or replaced outside GQC since the
last micro-step (a leftover ``zero_grad()``), or a ``step()`` with no backward, ends in one
``GQCUsageError`` on every rank at the same micro-step, with the counters unchanged; a correct
loop (split probes, clipping, rank-local accumulation included) never trips it.

Oracles: the same loop without the misuse (decisions and parameters), and the micro-step at
which the misuse happened."""

import re

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

import gqc_dist
from distributed_harness import run_distributed
from gqc_dist.engines.torch_optimizer import TorchOptimizerGradients
from gqc_dist.errors import GQCUsageError
from reference import adamw, global_batches, loss_of, make_mlp

CLEARED = "was cleared or replaced outside GQC since the last step()"
NO_BACKWARD = "step() was called with no backward since the last step()"
EDITED = "was changed in place outside GQC since the last step()"


def fixed(model, k=4, **kwargs):
    return gqc_dist.OptimizerWrapperFixed(adamw(model.parameters()), k, **kwargs)


def one_micro_batch_in():
    """A fixed window of 4 holding one micro-batch: the model, its wrapper and the batches."""
    model = make_mlp()
    wrapper = fixed(model)
    data = batches()
    loss_of(model, data[0]).backward()
    assert wrapper.step() is False
    return model, wrapper, data


def refused_at_step(wrapper, needle: str) -> str:
    """The one-line error ``wrapper.step()`` raises, which counts nothing."""
    with pytest.raises(GQCUsageError, match=re.escape(needle)) as error:
        wrapper.step()
    assert "\n" not in str(error.value) and "(1 micro-batch)" in str(error.value)
    assert (wrapper.num_batches, wrapper.num_draws, wrapper.num_steps) == (1, 1, 0)
    return str(error.value)


def batches(count=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 8, generator=generator), torch.randn(8, 1, generator=generator)) for _ in range(count)]


@pytest.mark.parametrize("leftover", ["model.zero_grad()", "optimizer.zero_grad()", "zero_grad() before step()"])
def test_a_window_cleared_from_outside_is_refused_and_nothing_is_counted(leftover):
    """The old loop's ``step(); zero_grad()`` (then the next backward starts the gradient afresh),
    or a ``zero_grad()`` between backward and step()."""
    model, wrapper, data = one_micro_batch_in()
    if leftover == "model.zero_grad()":
        model.zero_grad()
        loss_of(model, data[1]).backward()
    elif leftover == "optimizer.zero_grad()":
        wrapper._optimizer.zero_grad()  # the wrapped torch optimizer, as a framework holds it
        loss_of(model, data[1]).backward()
    else:
        loss_of(model, data[1]).backward()
        model.zero_grad()
    refused_at_step(wrapper, CLEARED)


@pytest.mark.parametrize("leftover", ["optimizer.zero_grad(set_to_none=False)", "model.zero_grad(set_to_none=False)",
                                      "clip_grad_norm_", "zeroed, then step() without backward"])
def test_a_window_changed_in_place_from_outside_is_refused(leftover):
    """Zeroing in place keeps the gradient tensors (their identity says nothing): the old loop's
    ``step(); zero_grad(set_to_none=False)``, the same before the next backward, a clip of the
    running sum after step(), or a zeroing followed by step() with no backward."""
    model, wrapper, data = one_micro_batch_in()
    if leftover == "optimizer.zero_grad(set_to_none=False)":
        wrapper._optimizer.zero_grad(set_to_none=False)
    elif leftover == "model.zero_grad(set_to_none=False)":
        model.zero_grad(set_to_none=False)
    elif leftover == "clip_grad_norm_":
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    else:
        model.zero_grad(set_to_none=False)
        with pytest.raises(GQCUsageError, match=re.escape(EDITED)):
            wrapper.step()
        assert (wrapper.num_batches, wrapper.num_draws) == (1, 1)
        return
    loss_of(model, data[1]).backward()
    message = refused_at_step(wrapper, EDITED)
    assert "zero_grad(set_to_none=False)" in message and "clip=" in message


def test_step_twice_without_backward_mid_window_is_refused():
    model = make_mlp()
    wrapper = fixed(model)
    loss_of(model, batches()[0]).backward()
    wrapper.step()
    with pytest.raises(GQCUsageError, match=re.escape(NO_BACKWARD)):
        wrapper.step()
    assert (wrapper.num_batches, wrapper.num_draws) == (1, 1)


def _train(model, wrapper, data, split=False):
    decisions = []
    for x, y in data:
        if split and wrapper.split_next:
            (loss_of(model, (x[0::2], y[0::2])) * 0.5).backward()
            wrapper.after_part(0.5)
            (loss_of(model, (x[1::2], y[1::2])) * 0.5).backward()
        else:
            loss_of(model, (x, y)).backward()
        decisions.append(wrapper.step())
    return decisions


def test_no_false_alarm_with_split_probes_and_clipping():
    """CBC with split probes (a read between the two parts' backwards) and clipping by the
    adapter: every micro-step passes, and the run equals the one whose adapter cannot tell
    (``outside_changes`` always (0, 0)): the check changes no decision and no parameter."""
    results = []
    for checking in (True, False):
        model = make_mlp()
        optimizer = adamw(model.parameters())
        gradients = TorchOptimizerGradients(optimizer, clip=0.5)
        if not checking:
            gradients.outside_changes = lambda: (0, 0, 0)
        wrapper = gqc_dist.OptimizerWrapperCBC(optimizer, 8, gradients=gradients, probe="split",
                                               micro_batch_size=8)
        decisions = _train(model, wrapper, batches(40), split=True)
        results.append((decisions, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0] and any(results[0][0]) and not all(results[0][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


# --- several ranks: a clear on one rank is refused on every rank, at the same micro-step ----------

def _run(rank, world_size, engine, clear_on=None, local=False, after_step=False, set_to_none=True):
    model = make_mlp()
    if engine == "ddp":
        wrapped = DDP(model)
    else:
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    wrapper = gqc_dist.OptimizerWrapperFixed(adamw(wrapped.parameters()), 3, local_accumulation=local)
    decisions = []
    for index, (x, y) in enumerate(global_batches(world_size)[:9]):
        local_batch = (x.chunk(world_size)[rank], y.chunk(world_size)[rank])
        if local and engine == "ddp":
            with wrapped.no_sync():
                loss_of(wrapped, local_batch).backward()
        else:
            loss_of(wrapped, local_batch).backward()
        if clear_on == (rank, index) and not after_step:
            wrapped.zero_grad()
        try:
            decisions.append(wrapper.step())
        except GQCUsageError as error:
            return {"error": str(error), "at": index}
        if clear_on == (rank, index) and after_step:  # the old loop's `optimizer.step(); zero_grad()`
            wrapped.zero_grad(set_to_none=set_to_none)
    return {"decisions": decisions, "params": [p.detach().clone() if engine == "ddp" else p.full_tensor().detach()
                                               for p in wrapped.parameters()]}


@pytest.mark.parametrize("engine, after_step", [("ddp", False), ("ddp", True), ("fsdp2", False), ("fsdp2", True)])
def test_a_clear_on_one_rank_is_refused_on_every_rank(engine, after_step):
    """Rank 1 clears at micro-step 4 (the window's second), between backward and step() or after
    step(): every rank refuses at the step() that follows the clear, with the same line."""
    results = run_distributed(_run, 2, engine, clear_on=(1, 4), after_step=after_step)
    expected = 5 if after_step else 4
    assert [r.get("at") for r in results] == [expected, expected], results
    assert results[0]["error"] == results[1]["error"] and CLEARED in results[0]["error"]


def test_a_window_zeroed_in_place_on_one_rank_is_refused_on_every_rank():
    """DDP, rank 1 runs the old loop's ``zero_grad(set_to_none=False)`` after step() at
    micro-step 4: every rank refuses at the next step(), with the same line."""
    results = run_distributed(_run, 2, "ddp", clear_on=(1, 4), after_step=True, set_to_none=False)
    assert [r.get("at") for r in results] == [5, 5], results
    assert results[0]["error"] == results[1]["error"] and EDITED in results[0]["error"]


@pytest.mark.parametrize("engine, local", [("ddp", False), ("fsdp2", False), ("ddp", True)])
def test_no_false_alarm_on_a_correct_loop(engine, local):
    results = run_distributed(_run, 2, engine, local=local)
    assert all("error" not in r for r in results), results
    assert results[0]["decisions"] == results[1]["decisions"] == [False, False, True] * 3


# --- DeepSpeed: ZeRO-2 keeps the window in its partitions; ZeRO-0/1 in param.grad -------------

def _ds_run(rank, world_size, stage, clear_on=None, twice_on=None):
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import gqc_dist.frontends.deepspeed as gqc_deepspeed

    model = make_mlp()
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "gradient_clipping": 0.0,
              "gradient_quality_control": {"algorithm": "fixed", "accumulation_steps": 3}}
    engine, _, _, _ = gqc_deepspeed.initialize(model=model, optimizer=adamw(model.parameters()), config=config)
    decisions = []
    for index, (x, y) in enumerate(global_batches(world_size)[:9]):
        engine.backward(loss_of(engine, (x.chunk(world_size)[rank], y.chunk(world_size)[rank])))
        if clear_on == (rank, index):
            engine.zero_grad()
        try:
            decisions.append(engine.step())
            if twice_on == index:  # a leftover line of the loop: on every rank
                decisions.append(engine.step())
        except GQCUsageError as error:
            return {"error": str(error), "at": index}
    return {"decisions": decisions, "params": [p.detach().clone() for p in engine.module.parameters()]}


def test_deepspeed_zero2_a_clear_on_one_rank_leaves_the_window_intact_and_zero1_refuses_it():
    """ZeRO-2 reduce-scatters every backward into partitions a ``zero_grad()`` does not touch:
    rank 1's clear changes nothing (every parameter equals the clean run's). ZeRO-1 keeps the
    window in ``param.grad``: every rank refuses at the same micro-step."""
    clean = run_distributed(_ds_run, 2, 2, timeout=300)
    cleared = run_distributed(_ds_run, 2, 2, clear_on=(1, 4), timeout=300)
    assert clean[0]["decisions"] == cleared[0]["decisions"] == cleared[1]["decisions"] == [False, False, True] * 3
    for got, want in zip(cleared[1]["params"], clean[1]["params"]):
        assert torch.equal(got, want)
    refused = run_distributed(_ds_run, 2, 1, clear_on=(1, 4), timeout=300)
    assert [r.get("at") for r in refused] == [4, 4], refused
    assert refused[0]["error"] == refused[1]["error"] and CLEARED in refused[0]["error"]


def test_deepspeed_step_twice_without_backward_is_refused_on_every_rank():
    results = run_distributed(_ds_run, 2, 2, twice_on=3, timeout=300)
    assert [r.get("at") for r in results] == [3, 3], results
    assert results[0]["error"].startswith("engine.step() must follow exactly one engine.backward()")
