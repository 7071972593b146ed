"""FSDP2 gradient sync: detect it turned off, and reduce what accumulated while it was off.

With ``set_requires_gradient_sync(False)`` FSDP2 accumulates unreduced gradients on its unsharded
parameters and leaves the sharded ``.grad`` unset or stale, so no norm read from the optimizer's
parameters is right. The wrapper only holds the optimizer, so this module finds the FSDP2 param
groups that own those parameters through torch's composable-state registry and reads their
sync flags each micro-step (a few attribute reads).

Rank-local accumulation (``local_accumulation=True``) runs FSDP2 with sync off on purpose: the
unsharded sums are read where FSDP2 keeps them (:func:`unsharded_local_sums`), and at a step
:func:`reduce_scatter_local_sums` does the reduction FSDP2 skipped, with FSDP2's semantics (the
mean over the shard group, this rank's dim-0 chunk as the sharded DTensor ``.grad``).

These are torch internals (checked against torch 2.6 - 2.13): if they are missing the guard
finds no groups and stays silent, and the placements check in ``reduction`` still applies.
"""

import math
from typing import Iterable, List, Tuple

import torch
import torch.distributed as dist

from gqc_dist.core import collectives
from gqc_dist.errors import GQCUsageError, PartialGradientError


def fsdp2_param_groups_owning(params: Iterable) -> List:
    """FSDP2 ``FSDPParamGroup`` objects whose sharded parameters include any of ``params``."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # pragma: no cover - older or newer torch
        return []
    wanted = {id(p) for p in params}
    found = []
    for reference in list(_module_state_mapping.values()):
        state = reference()
        if not isinstance(state, FSDPState):
            continue
        for group in getattr(state, "_fsdp_param_groups", []):
            if any(id(fsdp_param.sharded_param) in wanted for fsdp_param in group.fsdp_params):
                found.append(group)
    return found


def check_gradient_sync(groups: List) -> None:
    """Raise :class:`PartialGradientError` if any FSDP2 group skips its gradient reduction."""
    for group in groups:
        reduce_scatter_off = not getattr(group, "reduce_grads", True)
        all_reduce_off = getattr(group, "_is_hsdp", False) and not getattr(group, "all_reduce_grads", True)
        if reduce_scatter_off or all_reduce_off:
            what = "set_requires_gradient_sync(False)" if reduce_scatter_off else "set_requires_all_reduce(False)"
            raise PartialGradientError(
                f"FSDP2 module '{getattr(group, '_module_fqn', '?')}' has {what}: its gradients are "
                "unreduced rank-local sums, so their global norm is unknown and GQC cannot decide. "
                "Keep gradient sync on for every micro-batch (GQC decides after each one; FSDP2 "
                "reduce-scatters every backward by default), or pass local_accumulation=True to "
                "keep it off on purpose."
            )


def _unsharded_grad(fsdp_param):
    """The rank-local sum FSDP2 keeps while sync is off (upcast to the reduce dtype, or not)."""
    accumulated = getattr(fsdp_param, "unsharded_accumulated_grad", None)
    return accumulated if accumulated is not None else fsdp_param._unsharded_param.grad


def check_local_layout(groups: List, world_size: int) -> None:
    """Raise :class:`GQCUsageError` unless every group is plain FSDP2 sharded on dim 0 over all
    ``world_size`` ranks (the layout :func:`reduce_scatter_local_sums` reproduces)."""
    from torch.distributed.tensor import Shard

    for group in groups:
        name = getattr(group, "_module_fqn", "?")
        for fsdp_param in group.fsdp_params:
            param = fsdp_param.sharded_param
            mesh = param.device_mesh
            if mesh.ndim != 1 or mesh.size() != world_size or tuple(param.placements) != (Shard(0),):
                raise GQCUsageError(
                    f"local_accumulation supports FSDP2 sharded on dim 0 over all {world_size} ranks; FSDP2 "
                    f"module '{name}' has placements {tuple(param.placements)} on a mesh of shape "
                    f"{tuple(mesh.shape)} (HSDP, expert or tensor-parallel meshes are not supported yet)")
        if getattr(group, "gradient_divide_factor", None) is not None:
            raise GQCUsageError(f"local_accumulation does not support FSDP2 module '{name}' with a custom "
                                "gradient_divide_factor")


def unsharded_local_sums(groups: List) -> List[Tuple[torch.nn.Parameter, torch.Tensor]]:
    """``(sharded parameter, this rank's unreduced full-shape gradient sum)`` for every
    parameter with a gradient, while gradient sync is off."""
    out = []
    for group in groups:
        for fsdp_param in group.fsdp_params:
            grad = _unsharded_grad(fsdp_param)
            if grad is not None:
                if type(grad) is not torch.Tensor:
                    raise GQCUsageError(f"local_accumulation supports plain FSDP2 parameters; got a "
                                        f"{type(grad).__name__} unsharded gradient")
                out.append((fsdp_param.sharded_param, grad))
    return out


def reduce_scatter_local_sums(groups: List) -> None:
    """Average the unsharded sums over the ranks and give each sharded parameter its dim-0 chunk
    as ``.grad`` (a DTensor like the parameter; added to an existing one), in one
    ``reduce_scatter_tensor``; the unsharded sums are dropped. Collective: every rank calls it,
    and every trainable parameter takes part (zeros where this rank has no gradient, so the
    ranks' buffers match whichever parameters each one used; a parameter no rank used gets a
    zero gradient, as under DDP)."""
    from torch.distributed.tensor import DTensor

    fsdp_params = [fsdp_param for group in groups for fsdp_param in group.fsdp_params
                   if fsdp_param.sharded_param.requires_grad]
    world = dist.get_world_size()
    dtype = torch.float32  # at least: bf16 sums are averaged in fp32
    for fsdp_param in fsdp_params:
        dtype = torch.promote_types(dtype, fsdp_param.sharded_param.dtype)
    columns = []  # per parameter: its rows padded to world chunks, as [world, chunk elements]
    for fsdp_param in fsdp_params:
        param, grad = fsdp_param.sharded_param, _unsharded_grad(fsdp_param)
        chunk_rows = math.ceil(param.shape[0] / world)
        padded = torch.zeros((chunk_rows * world, *param.shape[1:]), dtype=dtype, device=param.device)
        if grad is not None:
            padded[: grad.shape[0]].copy_(grad)
        columns.append(padded.reshape(world, -1))
    sizes = [c.shape[1] for c in columns]
    mine = torch.empty(sum(sizes), dtype=dtype, device=columns[0].device)
    collectives.reduce_scatter_tensor(mine, torch.cat(columns, dim=1).reshape(-1), columns[0].device)
    mine.div_(world)
    for fsdp_param, part in zip(fsdp_params, mine.split(sizes)):
        param = fsdp_param.sharded_param
        shard = part.view(-1, *param.shape[1:])[: param.to_local().shape[0]].to(param.dtype)
        if param.grad is None:
            param.grad = DTensor.from_local(shard.contiguous(), param.device_mesh, param.placements,
                                            shape=param.shape, stride=param.stride())
        else:
            param.grad.to_local().add_(shard)
        fsdp_param.unsharded_accumulated_grad = None
        fsdp_param._unsharded_param.grad = None
