"""MoE in ONE optimizer on 4 ranks: dense layers FSDP2-sharded over the world, experts plain
parameters sharded over an expert-parallel group (EP 2) and replicated over the
expert-data-parallel group (EDP 2), with the expert policy set explicitly.

Routing: token ``t`` of a micro-batch goes to expert ``t % 4``; a rank holding data shard ``d``
owns the experts of EP index ``d % 2`` and passes tokens of other experts through unchanged.
The oracle runs the whole model (all four experts) on every shard with the same rule.
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import gqc_dist
from distributed_harness import run_distributed
from reference import micro_batches, reference_gnts

NUM_EXPERTS, EP = 4, 2
THRESHOLD = 0.5
MAX_DRAWS = 5
MICRO_STEPS = 20
LOCAL_BATCH = 8
WORLD = 4


def owned_experts(ep_index):
    per_rank = NUM_EXPERTS // EP
    return list(range(ep_index * per_rank, (ep_index + 1) * per_rank))


class TinyMoE(torch.nn.Module):
    def __init__(self, expert_ids):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(8, 16)
        all_experts = torch.randn(NUM_EXPERTS, 16, 16) * 0.3
        self.out = torch.nn.Linear(16, 1)
        self.expert_ids = list(expert_ids)
        self.experts = torch.nn.Parameter(all_experts[self.expert_ids].clone())

    def forward(self, x, active):
        """``active``: global expert ids applied to this shard's tokens."""
        h = torch.tanh(self.inp(x))
        route = torch.arange(x.shape[0]) % NUM_EXPERTS
        outputs = []
        for token in range(x.shape[0]):
            expert = int(route[token])
            if expert in active:
                weight = self.experts[self.expert_ids.index(expert)]
                outputs.append(h[token] + torch.tanh(h[token] @ weight))
            else:
                outputs.append(h[token])
        return self.out(torch.stack(outputs))


def _shard_loss(model, batch, shard, active):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x.chunk(WORLD)[shard], active), y.chunk(WORLD)[shard])


def _optimizer(model):
    dense = [p for n, p in model.named_parameters() if n != "experts"]
    return dense, torch.optim.AdamW(
        [{"params": dense}, {"params": [model.experts]}], lr=1e-2, weight_decay=0.01)


def _moe_run(rank, world_size):
    ep_index = rank % EP
    # EP groups {0,1},{2,3} hold different experts; EDP groups {0,2},{1,3} hold the same ones.
    ep_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    edp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    ep_group, edp_group = ep_groups[rank // EP], edp_groups[ep_index]
    experts = owned_experts(ep_index)
    model = TinyMoE(experts)
    mesh = init_device_mesh("cpu", (world_size,))
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model.out, mesh=mesh)
    _, optimizer = _optimizer(model)
    optimizer.param_groups[1]["gqc_reduction"] = gqc_dist.Sharded(ep_group)
    wrapper = gqc_dist.OptimizerWrapperGNTS(optimizer, MAX_DRAWS)
    wrapper.param_groups[0]["gradient_norm_threshold"] = THRESHOLD
    wrapper.param_groups[1]["gradient_norm_threshold"] = THRESHOLD
    # Each micro-batch's expert gradient, before it is accumulated: sum over the ranks holding
    # these experts (EDP), mean over all data (the world), as expert-parallel engines do.
    def reduce_expert_grad(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=edp_group)
        return grad / world_size

    model.experts.register_hook(reduce_expert_grad)
    decisions, norms = [], []
    for batch in micro_batches(MICRO_STEPS, batch=LOCAL_BATCH * world_size):
        _shard_loss(model, batch, rank, experts).backward()
        decisions.append(wrapper.step())
        norms.append(wrapper.statistics()["mean_grad_norm"])
    return {"decisions": decisions, "norms": norms, "experts": experts,
            "expert_params": model.experts.detach().clone(),
            "dense": [p.full_tensor().detach().clone() for p in (model.inp.weight, model.inp.bias,
                                                                 model.out.weight, model.out.bias)]}


class _WholeModel(torch.nn.Module):
    """The oracle: every shard's loss with its owner's experts, averaged over shards."""

    def __init__(self):
        super().__init__()
        self.moe = TinyMoE(range(NUM_EXPERTS))

    def forward(self, batch):
        losses = [_shard_loss(self.moe, batch, shard, owned_experts(shard % EP))
                  for shard in range(WORLD)]
        return torch.stack(losses).mean()


def _oracle():
    whole = _WholeModel()
    _, optimizer = _optimizer(whole.moe)
    batches = micro_batches(MICRO_STEPS, batch=LOCAL_BATCH * WORLD)
    decisions, norms = reference_gnts(whole, optimizer, batches, THRESHOLD, MAX_DRAWS,
                                      loss_fn=lambda model, batch: model(batch))
    return decisions, norms, whole.moe


def test_moe_dense_fsdp2_plus_expert_parallel_in_one_optimizer_matches_oracle():
    results = run_distributed(_moe_run, WORLD, timeout=300)
    decisions, norms, oracle_model = _oracle()
    assert True in decisions and False in decisions
    for rank, result in enumerate(results):
        assert result["decisions"] == decisions, f"rank {rank}"
        for got, want in zip(result["norms"], norms):
            assert got == pytest.approx(want, rel=1e-6), f"rank {rank}"
        want_dense = [oracle_model.inp.weight, oracle_model.inp.bias,
                      oracle_model.out.weight, oracle_model.out.bias]
        for got, want in zip(result["dense"], want_dense):
            torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(result["expert_params"],
                                   oracle_model.experts.detach()[result["experts"]], atol=1e-5, rtol=0)


def test_experts_without_a_policy_are_refused_not_treated_as_replicated():
    results = run_distributed(_moe_without_policy, WORLD, timeout=300)
    for result in results:
        assert result["error"] == "PartialGradientError"
        assert "gqc_reduction" in result["message"]


def _moe_without_policy(rank, world_size):
    ep_index = rank % EP
    model = TinyMoE(owned_experts(ep_index))
    mesh = init_device_mesh("cpu", (world_size,))
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model.out, mesh=mesh)
    _, optimizer = _optimizer(model)
    wrapper = gqc_dist.OptimizerWrapperGNTS(optimizer, MAX_DRAWS)
    batch = micro_batches(1, batch=LOCAL_BATCH * world_size)[0]
    _shard_loss(model, batch, rank, owned_experts(ep_index)).backward()
    try:
        wrapper.step()
    except gqc_dist.GQCError as error:
        return {"error": type(error).__name__, "message": str(error)}
    return {"error": None}
