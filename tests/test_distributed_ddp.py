"""DDP over gloo, real processes: exact norms, identical decisions, faults, collective budget.

Every rank's per-micro-step ``mean_grad_norm`` and decision, and the final parameters, are
compared with a single-process oracle that trains the whole model on the concatenated
micro-batches (reference.reference_gnts).
"""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gqc_dist
from distributed_harness import run_distributed
from reference import (LOCAL_BATCH, MAX_DRAWS, THRESHOLD, adamw, assert_matches_oracle, global_batches, loss_of,
                       make_mlp, micro_batches, reference_gnts)

def _local(batch, rank, world_size):
    x, y = batch
    return x.chunk(world_size)[rank], y.chunk(world_size)[rank]


def _ddp_run(rank, world_size, thresholds=None, poison=None, verify=False, no_sync=False):
    """One rank of a DDP GNTS run. ``thresholds[rank]`` overrides this rank's threshold,
    ``poison=(rank, micro_step)`` writes NaN into that rank's local gradient after backward."""
    model = make_mlp()
    ddp = DDP(model)
    wrapper = gqc_dist.OptimizerWrapperGNTS(adamw(ddp.parameters()), MAX_DRAWS, verify=verify)
    threshold = thresholds[rank] if thresholds else THRESHOLD
    wrapper.param_groups[0]["gradient_norm_threshold"] = threshold
    decisions, norms = [], []
    for index, batch in enumerate(global_batches(world_size)):
        if no_sync:
            with ddp.no_sync():
                loss_of(ddp, _local(batch, rank, world_size)).backward()
        else:
            loss_of(ddp, _local(batch, rank, world_size)).backward()
        if poison == (rank, index):
            next(model.parameters()).grad[0, 0] = float("nan")
        try:
            decisions.append(wrapper.step())
        except gqc_dist.GQCError as error:
            return {"error": type(error).__name__, "message": str(error), "at": index,
                    "ranks": getattr(error, "ranks", None)}
        norms.append(wrapper.statistics()["mean_grad_norm"])
    return {"decisions": decisions, "norms": norms, "stats": wrapper.statistics(),
            "params": [p.detach().clone() for p in model.parameters()]}


def _oracle(world_size, poison_step=None, threshold=THRESHOLD):
    model = make_mlp()
    poison = () if poison_step is None else (poison_step,)
    decisions, norms = reference_gnts(model, adamw(model.parameters()),
                                      global_batches(world_size), threshold, MAX_DRAWS, poison)
    return decisions, norms, [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_norms_decisions_and_params_match_single_process_oracle(world_size):
    results = run_distributed(_ddp_run, world_size)
    assert_matches_oracle(results, _oracle(world_size))


def test_nonfinite_gradient_on_one_rank_drops_the_window_everywhere():
    results = run_distributed(_ddp_run, 2, poison=(1, 7))
    assert_matches_oracle(results, _oracle(2, poison_step=7))
    assert all(r["stats"]["dropped_windows"] == 1 for r in results)


def test_forced_divergence_is_held_together_by_rank0_settings():
    """Rank 1 is given another threshold: both ranks still follow rank 0's (the oracle's)."""
    results = run_distributed(_ddp_run, 2, thresholds=[THRESHOLD, 10.0])
    assert_matches_oracle(results, _oracle(2))


def test_forced_divergence_with_verify_raises_within_one_micro_step():
    results = run_distributed(_ddp_run, 4, thresholds=[THRESHOLD, THRESHOLD, 10.0, THRESHOLD],
                              verify=True)
    for result in results:
        assert result["error"] == "RankDivergenceError"
        assert result["at"] == 0 and result["ranks"] == (2,)
        assert "ranks [2]" in result["message"]


def test_verify_passes_when_ranks_agree():
    results = run_distributed(_ddp_run, 2, verify=True)
    assert_matches_oracle(results, _oracle(2))


def test_ddp_no_sync_partial_gradients_are_refused_on_every_rank():
    results = run_distributed(_ddp_run, 2, no_sync=True)
    for result in results:
        assert result["error"] == "PartialGradientError" and result["at"] == 0
        assert "no_sync" in result["message"]


# ---------------------------------------------------------------- communication budget
_COLLECTIVES = ["all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce",
                "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
                "gather", "scatter", "barrier", "all_gather_object", "broadcast_object_list"]


def _budget_run(rank, world_size, width, verify):
    model = make_mlp(width=width)
    ddp = DDP(model)
    wrapper = gqc_dist.OptimizerWrapperGNTS(adamw(ddp.parameters()), MAX_DRAWS, verify=verify)
    calls = []
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def counting(name):
        def call(tensor_or_list=None, *args, **kwargs):
            numel = tensor_or_list.numel() if isinstance(tensor_or_list, torch.Tensor) else None
            calls.append((name, numel))
            return originals[name](tensor_or_list, *args, **kwargs)
        return call

    per_step = []
    for batch in micro_batches(6, batch=LOCAL_BATCH * world_size):
        loss_of(ddp, _local(batch, rank, world_size)).backward()
        calls.clear()
        for name in _COLLECTIVES:
            setattr(dist, name, counting(name))
        try:
            wrapper.step()
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)
        per_step.append(list(calls))
    return per_step


@pytest.mark.parametrize("verify", [False, True])
def test_collectives_per_micro_step_are_few_small_and_independent_of_model_size(verify):
    small = run_distributed(_budget_run, 2, 16, verify)
    large = run_distributed(_budget_run, 2, 512, verify)
    for per_step_small, per_step_large in zip(small[0], large[0]):
        assert per_step_small == per_step_large  # same calls, same sizes, for a 32x wider model
        assert len(per_step_small) == (2 if verify else 1)
        for name, numel in per_step_small:
            assert name == "all_reduce" and numel <= 16


def test_the_micro_step_packet_does_not_grow_with_the_world():
    two = run_distributed(_budget_run, 2, 16, False)
    four = run_distributed(_budget_run, 4, 16, False)
    sizes = {numel for result in two + four for step in result for _, numel in step}
    assert len(sizes) == 1  # the same float64 vector for 2 and 4 ranks
