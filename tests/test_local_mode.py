"""Communication-avoiding mode (local_accumulation) on DDP under no_sync(), 2 real ranks.

The decision is a prediction, so the oracle checks what must be exact: every rank decides the
same, each optimizer step equals a single-process step on the whole window (same micro-batches,
same window lengths as the run chose), the micro-step sends a handful of floats, the step one
full all-reduce, and the prediction is reported."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gqc_dist
from distributed_harness import run_distributed
from reference import LOCAL_BATCH, adamw, loss_of, make_mlp, micro_batches

STEPS, THRESHOLD, MAX_DRAWS = 30, 0.6, 5


def _local_run(rank, world_size):
    model = make_mlp()
    ddp = DDP(model)
    wrapper = gqc_dist.OptimizerWrapperGNTS(adamw(model.parameters()), MAX_DRAWS, local_accumulation=True)
    wrapper.param_groups[0]["gradient_norm_threshold"] = THRESHOLD
    sizes, decisions, original = [], [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sizes[-1].append(tensor.numel())
        return original(tensor, *args, **kwargs)

    for x, y in micro_batches(STEPS, batch=LOCAL_BATCH * world_size):
        with ddp.no_sync():  # gradients stay rank-local every micro-step
            loss_of(ddp, (x.chunk(world_size)[rank], y.chunk(world_size)[rank])).backward()
        sizes.append([])
        dist.all_reduce = counting
        try:
            decisions.append(wrapper.step())
        finally:
            dist.all_reduce = original
    return {"decisions": decisions, "sizes": sizes, "stats": wrapper.statistics(),
            "params": [p.detach().clone() for p in model.parameters()]}


def _replay(decisions, world_size):
    """Single process, whole micro-batches, stepping where the run stepped: mean of the window's
    gradients, AdamW."""
    model = make_mlp()
    optimizer = adamw(model.parameters())
    draws = 0
    for batch, stepped in zip(micro_batches(STEPS, batch=LOCAL_BATCH * world_size), decisions):
        loss_of(model, batch).backward()
        draws += 1
        if stepped:
            for p in model.parameters():
                p.grad /= draws
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


def test_local_accumulation_is_refused_on_deepspeed():
    from gqc_dist.deepspeed import initialize

    config = {"train_micro_batch_size_per_gpu": 1,
              "gradient_quality_control": {"algorithm": "gnts", "threshold": 1, "local_accumulation": True}}
    with pytest.raises(gqc_dist.GQCConfigError, match="local_accumulation is not supported on DeepSpeed"):
        initialize(model=make_mlp(), config=config)
