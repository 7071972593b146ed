"""Detect FSDP2 gradient sync turned off for parameters a wrapper drives.

With ``set_requires_gradient_sync(False)`` FSDP2 accumulates unreduced gradients on its unsharded
parameters and leaves the sharded ``.grad`` unset or stale, so no norm read from the optimizer's
parameters is right. The wrapper only holds the optimizer, so this module finds the FSDP2 param
groups that own those parameters through torch's composable-state registry and reads their
sync flags each micro-step (a few attribute reads).

These are torch internals (checked against torch 2.6 - 2.13): if they are missing the guard
finds no groups and stays silent, and the placements check in ``reduction`` still applies.
"""

from typing import Iterable, List

from .errors import PartialGradientError


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
                "reduce-scatters every backward by default)."
            )
