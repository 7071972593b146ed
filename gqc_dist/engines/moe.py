"""A small expert-parallel mixture-of-experts layer, and the groups and policies it needs.

Experts are plain parameters split over an expert-parallel (EP) group: each EP rank owns
``num_experts / ep_size`` different experts, and ranks at the same EP index (the
expert-data-parallel, EDP, group) hold identical copies. Tokens are routed top-1 and
dispatched to the owning rank with ``all_to_all`` (autograd-aware), so expert gradients
collect contributions from every EP rank's tokens; :func:`reduce_expert_grads` then sums them
over the EDP group and divides by the world size, giving the gradient of the mean loss.

For GQC such experts are ``gqc_dist.Sharded(ep_group)`` (see :func:`expert_param_groups`):
distinct across the EP group, identical across the rest of the world.
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gqc_dist.core import collectives
from gqc_dist.errors import GQCConfigError
from gqc_dist.core.reduction import Sharded


def expert_parallel_groups(ep_size: int) -> Tuple[Optional[object], Optional[object]]:
    """Create (on every rank, same order) the EP and EDP groups this rank belongs to.

    EP groups are consecutive ranks ``[k*ep, (k+1)*ep)``; EDP groups are ranks with equal
    ``rank % ep``. Returns ``(None, None)`` when torch.distributed is not initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if ep_size != 1:
            raise GQCConfigError(f"ep_size={ep_size} needs torch.distributed to be initialised")
        return None, None
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise GQCConfigError(f"ep_size={ep_size} must divide the world size {world}")
    ep_groups = [dist.new_group(list(range(k, k + ep_size))) for k in range(0, world, ep_size)]
    edp_groups = [dist.new_group(list(range(i, world, ep_size))) for i in range(ep_size)]
    return ep_groups[rank // ep_size], edp_groups[rank % ep_size]


class ExpertParallelMoE(torch.nn.Module):
    """Top-1 MoE feed-forward block ``x + gate * expert(x)`` with experts split over ``ep_group``.

    Args:
        dim, hidden: model and expert hidden widths.
        num_experts: experts in the whole model; must be a multiple of the EP group size.
        ep_group: the expert-parallel group (``None``: all experts local).
        seed: experts are drawn from this seed for the whole model, then this rank keeps its
            slice, so any EP layout starts from the same global weights.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, ep_group=None, seed: int = 0):
        super().__init__()
        self.ep_group = ep_group
        self.ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
        self.ep_rank = 0 if ep_group is None else dist.get_rank(ep_group)
        if num_experts % self.ep_size:
            raise GQCConfigError(f"num_experts={num_experts} is not a multiple of ep_size={self.ep_size}")
        self.num_experts = num_experts
        self.local_experts = num_experts // self.ep_size
        generator = torch.Generator().manual_seed(seed)
        self.router = torch.nn.Linear(dim, num_experts, bias=False)
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(num_experts, dim, generator=generator) / math.sqrt(dim))
        w_in = torch.randn(num_experts, dim, hidden, generator=generator) / math.sqrt(dim)
        w_out = torch.randn(num_experts, hidden, dim, generator=generator) / math.sqrt(hidden)
        mine = slice(self.ep_rank * self.local_experts, (self.ep_rank + 1) * self.local_experts)
        self.w_in = torch.nn.Parameter(w_in[mine].clone())
        self.w_out = torch.nn.Parameter(w_out[mine].clone())

    def expert_parameters(self) -> List[torch.nn.Parameter]:
        return [self.w_in, self.w_out]

    def _run_experts(self, tokens: torch.Tensor, local_index: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(tokens)
        for e in range(self.local_experts):
            rows = (local_index == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                out = out.index_add(0, rows, F.gelu(tokens[rows] @ self.w_in[e]) @ self.w_out[e])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        gate, expert = F.softmax(self.router(tokens), dim=-1).max(dim=-1)
        if self.ep_size == 1:
            out = self._run_experts(tokens, expert)
        else:
            out = self._dispatch(tokens, expert)
        return (tokens + gate.unsqueeze(-1) * out).reshape(shape)

    def _dispatch(self, tokens: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        # Fixed capacity (all local tokens) per destination keeps the all_to_all splits equal.
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        count, dim = tokens.shape
        owner, local_index = expert // self.local_experts, expert % self.local_experts
        send = tokens.new_zeros(self.ep_size, count, dim)
        # on the tokens' device: the index exchange is a collective too, and NCCL refuses CPU tensors
        send_index = torch.full((self.ep_size, count), -1, dtype=torch.long, device=tokens.device)
        slots = []
        for rank in range(self.ep_size):
            rows = (owner == rank).nonzero(as_tuple=True)[0]
            send = send.index_put((torch.full_like(rows, rank), torch.arange(rows.numel())), tokens[rows])
            send_index[rank, : rows.numel()] = local_index[rows]
            slots.append(rows)
        received = all_to_all_single_autograd(send.reshape(-1, dim), None, None, self.ep_group)
        received_index = torch.empty(self.ep_size * count, dtype=torch.long, device=tokens.device)
        collectives.all_to_all_single(received_index, send_index.reshape(-1), tokens.device, group=self.ep_group)
        processed = self._run_experts(received, received_index)
        returned = all_to_all_single_autograd(processed, None, None, self.ep_group)
        returned = returned.reshape(self.ep_size, count, dim)
        out = tokens.new_zeros(count, dim)
        for rank, rows in enumerate(slots):
            out = out.index_add(0, rows, returned[rank, : rows.numel()])
        return out


def reduce_expert_grads(module: torch.nn.Module, edp_group, world_size: int) -> None:
    """Register hooks that turn each micro-batch's expert gradient into its share of the mean:
    sum over the EDP group (the other replicas' tokens), divide by ``world_size``."""
    for layer in module.modules():
        if isinstance(layer, ExpertParallelMoE):
            for param in layer.expert_parameters():
                param.register_hook(_edp_mean_hook(edp_group, world_size))


def _edp_mean_hook(edp_group, world_size):
    def hook(grad):
        grad = grad.clone()
        if edp_group is not None and dist.get_world_size(edp_group) > 1:
            collectives.all_reduce(grad, grad.device, group=edp_group)
        return grad / world_size

    return hook


def expert_param_groups(module: torch.nn.Module, ep_group, **group_options) -> List[dict]:
    """Two param groups for one optimizer: dense parameters, and experts with the policy
    ``gqc_dist.Sharded(ep_group)``. ``group_options`` (lr, weight_decay...) go to both."""
    experts = {
        id(p) for layer in module.modules() if isinstance(layer, ExpertParallelMoE)
        for p in layer.expert_parameters()
    }
    dense = [p for p in module.parameters() if id(p) not in experts]
    expert = [p for p in module.parameters() if id(p) in experts]
    groups = [{"params": dense, **group_options}]
    if expert:
        groups.append({"params": expert, "gqc_reduction": Sharded(ep_group), **group_options})
    return groups
