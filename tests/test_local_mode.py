"""Communication-avoiding mode (local_accumulation) on DDP under no_sync(), 2 real ranks.

The decision is a prediction, so the oracle checks what must be exact: every rank decides the
same, each optimizer step equals a single-process step on the whole window (same micro-batches,
same window lengths as the run chose), the micro-step sends a handful of floats, the step one
full all-reduce, and the prediction is reported."""

import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gqc_dist
from distributed_harness import run_distributed
from reference import LOCAL_BATCH, adamw, loss_of, make_mlp, micro_batches

os.environ.setdefault("DS_ACCELERATOR", "cpu")

STEPS, THRESHOLD, MAX_DRAWS = 30, 0.6, 5


def _counting_all_reduces(rank, world_size, backward, step):
    """Per micro-step: ``backward(this rank's rows)``, then ``step()`` with the element count of
    every ``dist.all_reduce`` it issues recorded. Returns (decisions, counts per micro-step)."""
    sizes, decisions, original = [], [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sizes[-1].append(tensor.numel())
        return original(tensor, *args, **kwargs)

    for x, y in micro_batches(STEPS, batch=LOCAL_BATCH * world_size):
        backward((x.chunk(world_size)[rank], y.chunk(world_size)[rank]))
        sizes.append([])
        dist.all_reduce = counting
        try:
            decisions.append(step())
        finally:
            dist.all_reduce = original
    return decisions, sizes


def _local_run(rank, world_size):
    model = make_mlp()
    ddp = DDP(model)
    wrapper = gqc_dist.OptimizerWrapperGNTS(adamw(model.parameters()), MAX_DRAWS, local_accumulation=True)
    wrapper.param_groups[0]["gradient_norm_threshold"] = THRESHOLD

    def backward(batch):
        with ddp.no_sync():  # gradients stay rank-local every micro-step
            loss_of(ddp, batch).backward()

    decisions, sizes = _counting_all_reduces(rank, world_size, backward, wrapper.step)
    return {"decisions": decisions, "sizes": sizes, "stats": wrapper.statistics(),
            "params": [p.detach().clone() for p in model.parameters()]}


def _replay(decisions, world_size, clip=0.0):
    """Single process, whole micro-batches, stepping where the run stepped: mean of the window's
    gradients (clipped to ``clip`` by torch's rule, if given), AdamW. One decision per micro-batch."""
    model = make_mlp()
    optimizer = adamw(model.parameters())
    draws = 0
    for batch, stepped in zip(micro_batches(len(decisions), batch=LOCAL_BATCH * world_size), decisions):
        loss_of(model, batch).backward()
        draws += 1
        if stepped:
            for p in model.parameters():
                p.grad /= draws
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            draws = 0
    return [p.detach() for p in model.parameters()]


def test_local_accumulation_steps_exactly_on_the_same_micro_steps_everywhere():
    results = run_distributed(_local_run, 2)
    decisions = results[0]["decisions"]
    assert results[1]["decisions"] == decisions and True in decisions and False in decisions
    want = _replay(decisions, 2)
    for result in results:
        for got, ref in zip(result["params"], want):
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
        stats = result["stats"]
        assert stats["estimated_decisions"] == STEPS and "last_prediction_error" in stats
        for stepped, sizes in zip(decisions, result["sizes"]):
            small = [n for n in sizes if n <= 16]
            assert len(small) == (2 if stepped else 1)  # the predicted packet; at a step the exact one
            assert len(sizes) - len(small) == (1 if stepped else 0)  # one full all-reduce, at the step
    assert results[0]["stats"]["gradient_noise_scale_micro_batches"] == pytest.approx(
        results[1]["stats"]["gradient_noise_scale_micro_batches"])


def _sharded(mesh_shape):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_mlp()
    names = ("replicate", "shard") if len(mesh_shape) == 2 else None  # 2-D: HSDP
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.set_requires_gradient_sync(False)  # every micro-step: rank-local unsharded sums
    return model


def _hsdp_local(rank, world_size):
    model = _sharded((2, world_size // 2))
    wrapper = gqc_dist.OptimizerWrapperGNTS(adamw(model.parameters()), MAX_DRAWS, local_accumulation=True)
    x, y = micro_batches(1, batch=LOCAL_BATCH * world_size)[0]
    loss_of(model, (x.chunk(world_size)[rank], y.chunk(world_size)[rank])).backward()
    try:
        wrapper.step()
    except gqc_dist.GQCUsageError as error:
        return str(error)
    return "accepted"


def test_hsdp_local_accumulation_is_refused_naming_the_layout():
    assert all("sharded on dim 0 over all 4 ranks" in r and "HSDP" in r for r in run_distributed(_hsdp_local, 4))


def _fsdp2_local_run(rank, world_size):
    model = _sharded((world_size,))
    wrapper = gqc_dist.OptimizerWrapperGNTS(adamw(model.parameters()), MAX_DRAWS, local_accumulation=True)
    wrapper.param_groups[0]["gradient_norm_threshold"] = THRESHOLD
    decisions, small, scattered = [], [], []
    original_all_reduce, original_scatter = dist.all_reduce, dist.reduce_scatter_tensor

    def all_reduce(tensor, *args, **kwargs):
        small[-1] += tensor.numel() <= 16
        return original_all_reduce(tensor, *args, **kwargs)

    def reduce_scatter(output, tensor, *args, **kwargs):
        scattered[-1] += tensor.numel()
        return original_scatter(output, tensor, *args, **kwargs)

    for x, y in micro_batches(STEPS, batch=LOCAL_BATCH * world_size):
        loss_of(model, (x.chunk(world_size)[rank], y.chunk(world_size)[rank])).backward()
        small.append(0)
        scattered.append(0)
        dist.all_reduce, dist.reduce_scatter_tensor = all_reduce, reduce_scatter
        try:
            decisions.append(wrapper.step())
        finally:
            dist.all_reduce, dist.reduce_scatter_tensor = original_all_reduce, original_scatter
    return {"decisions": decisions, "small": small, "scattered": scattered, "stats": wrapper.statistics(),
            "params": [p.full_tensor().detach().clone() for p in model.parameters()]}


def test_fsdp2_with_gradient_sync_off_steps_exactly_with_one_reduce_scatter_per_step():
    results = run_distributed(_fsdp2_local_run, 2)
    decisions = results[0]["decisions"]
    assert results[1]["decisions"] == decisions and True in decisions and False in decisions
    want = _replay(decisions, 2)
    # every parameter's rows padded to 2 equal chunks (Linear(16, 1)'s single row too)
    padded = sum(-(-p.shape[0] // 2) * 2 * p[0].numel() for p in make_mlp().parameters())
    for result in results:
        for got, ref in zip(result["params"], want):
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
        assert result["stats"]["estimated_decisions"] == STEPS
        for stepped, small, scattered in zip(decisions, result["small"], result["scattered"]):
            assert small == (2 if stepped else 1)  # the predicted packet; at a step the exact one
            assert scattered == (padded if stepped else 0)  # the gradient, once, at the step


def _ds_local_run(rank, world_size, stage, clip):
    """ZeRO-0/1 under gqc_dist.frontends.deepspeed with local_accumulation: sizes of every all-reduce per
    micro-step, decisions, final weights."""
    from gqc_dist.frontends.deepspeed import initialize

    model = make_mlp()
    config = {"train_micro_batch_size_per_gpu": LOCAL_BATCH, "gradient_clipping": clip,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9,
              "gradient_quality_control": {"algorithm": "gnts", "threshold": THRESHOLD, "max_draws": MAX_DRAWS,
                                           "local_accumulation": True}}
    engine, _, _, _ = initialize(model=model, optimizer=adamw(model.parameters()), config=config)
    decisions, sizes = _counting_all_reduces(rank, world_size, lambda batch: engine.backward(loss_of(engine, batch)),
                                             engine.step)
    return {"decisions": decisions, "sizes": sizes, "stats": engine.gqc.statistics(),
            "global_steps": engine.global_steps,
            "params": [p.detach().clone() for p in engine.module.parameters()]}


@pytest.mark.parametrize("stage", [0, 1])
def test_deepspeed_zero01_local_accumulation_steps_exactly_with_one_reduction_per_step(stage):
    clip = 0.3  # the step clips with the exact norm read after the reduction
    results = run_distributed(_ds_local_run, 2, stage, clip, timeout=300)
    decisions = results[0]["decisions"]
    assert results[1]["decisions"] == decisions and True in decisions and False in decisions
    want = _replay(decisions, 2, clip)
    full = sum(p.numel() for p in make_mlp().parameters())
    for result in results:
        assert result["global_steps"] == sum(decisions)
        for got, ref in zip(result["params"], want):
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
        assert result["stats"]["estimated_decisions"] == STEPS
        for stepped, sizes in zip(decisions, result["sizes"]):
            # between steps one packet of a few floats; at a step the exact packet too (and
            # ZeRO-1's step all-reduces one flag of its own) and DeepSpeed's own reduction of
            # the whole gradient, once
            assert len([n for n in sizes if n <= 16]) == ((2 + (stage == 1)) if stepped else 1)
            assert sum(n for n in sizes if n > 16) == (full if stepped else 0)


def test_local_accumulation_is_refused_where_it_saves_nothing():
    from gqc_dist.frontends.deepspeed import initialize

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "gradient_quality_control": {"algorithm": "gnts", "threshold": 1, "local_accumulation": True}}
    with pytest.raises(gqc_dist.GQCConfigError, match="local_accumulation needs zero_optimization.stage 0 or 1"):
        initialize(model=make_mlp(), config=config)


def test_local_accumulation_refuses_parameters_with_a_reduction_policy():
    model = make_mlp()
    optimizer = adamw([{"params": list(model.parameters()), "gqc_reduction": gqc_dist.Sharded()}])
    wrapper = gqc_dist.OptimizerWrapperGNTS(optimizer, MAX_DRAWS, local_accumulation=True)
    loss_of(model, micro_batches(1)[0]).backward()
    with pytest.raises(gqc_dist.GQCUsageError, match="param group 0 has a 'gqc_reduction' policy"):
        wrapper.step()
