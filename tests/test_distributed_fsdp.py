"""FSDP2 (1-D mesh) and HSDP (2-D mesh) over gloo, real processes, against a single-process oracle.

The wrapper is given no mode and no policy: it reads the DTensor placements of the gradients.
"""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import gqc_dist
from distributed_harness import run_distributed
from reference import MAX_DRAWS, THRESHOLD, adamw, assert_matches_oracle, global_batches, loss_of, make_mlp, reference_gnts

def shard_mlp(model, mesh):
    """fully_shard each Linear, then the root (the final Linear(16, 1) shards unevenly)."""
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _mesh(world_size, hsdp):
    if hsdp:
        return init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (world_size,))


def _fsdp_run(rank, world_size, hsdp=False):
    model = shard_mlp(make_mlp(), _mesh(world_size, hsdp))
    wrapper = gqc_dist.OptimizerWrapperGNTS(adamw(model.parameters()), MAX_DRAWS)
    wrapper.param_groups[0]["gradient_norm_threshold"] = THRESHOLD
    decisions, norms = [], []
    for batch in global_batches(world_size):
        x, y = batch
        loss_of(model, (x.chunk(world_size)[rank], y.chunk(world_size)[rank])).backward()
        decisions.append(wrapper.step())
        norms.append(wrapper.statistics()["mean_grad_norm"])
    placements = sorted({str(p.placements) for p in model.parameters()})
    return {"decisions": decisions, "norms": norms, "placements": placements,
            "params": [p.full_tensor().detach().clone() for p in model.parameters()]}


def _oracle(world_size):
    model = make_mlp()
    decisions, norms = reference_gnts(model, adamw(model.parameters()),
                                      global_batches(world_size), THRESHOLD, MAX_DRAWS)
    return decisions, norms, [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_matches_single_process_oracle(world_size):
    results = run_distributed(_fsdp_run, world_size)
    assert results[0]["placements"] == ["(Shard(dim=0),)"]
    assert_matches_oracle(results, _oracle(world_size))


def test_hsdp_replicate2_x_shard2_matches_single_process_oracle():
    results = run_distributed(_fsdp_run, 4, hsdp=True)
    assert results[0]["placements"] == ["(Replicate(), Shard(dim=0))"]
    assert_matches_oracle(results, _oracle(4))


def _sync_off_run(rank, world_size, hsdp, first_synced_steps):
    model = shard_mlp(make_mlp(), _mesh(world_size, hsdp))
    wrapper = gqc_dist.OptimizerWrapperGNTS(adamw(model.parameters()), MAX_DRAWS)
    for index, (x, y) in enumerate(global_batches(world_size)[:4]):
        if index == first_synced_steps:
            if hsdp:
                model.set_requires_all_reduce(False)
            else:
                model.set_requires_gradient_sync(False)
        loss_of(model, (x.chunk(world_size)[rank], y.chunk(world_size)[rank])).backward()
        try:
            wrapper.step()
        except gqc_dist.GQCError as error:
            return {"error": type(error).__name__, "message": str(error), "at": index}
    return {"error": None}


@pytest.mark.parametrize("hsdp, first_synced_steps", [(False, 0), (False, 2), (True, 1)])
def test_gradient_sync_off_is_refused_on_every_rank(hsdp, first_synced_steps):
    """Sync off from the start (no sharded grads) or mid-window (stale sharded grads)."""
    results = run_distributed(_sync_off_run, 4 if hsdp else 2, hsdp, first_synced_steps)
    for result in results:
        assert result["error"] == "PartialGradientError", result
        assert result["at"] == first_synced_steps
        assert "set_requires_" in result["message"]
