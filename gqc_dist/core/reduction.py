"""Where each gradient piece lives and how many ranks hold an identical copy of it.

For every local gradient piece ``x`` the wrapper needs ``rho(x)``: the number of ranks in the world
holding an identical copy (docs/guarantees.md). Contributions ``||x||^2 / rho(x)`` summed over ranks
count every element exactly once. This module turns a parameter (and its param-group policy)
into ``(local tensor, rho, kind)``; it knows nothing about algorithms or engines.

Policies, set per param group under the key ``"gqc_reduction"``:

* :class:`Replicated` ``(group)``: every rank of ``group`` holds an identical copy (DDP).
* :class:`Sharded` ``(group)``: ranks of ``group`` hold distinct pieces; a rank outside ``group``
  holding the same piece holds an identical copy (an expert sharded over the expert-parallel
  group and replicated over expert-data-parallel ranks is ``Sharded(ep_group)``).

Without a policy, DTensor gradients (FSDP2, HSDP) are read from their placements: ``Shard`` dims
split, ``Replicate`` dims multiply ``rho``, ``Partial`` is refused. Plain tensors under
torch.distributed are taken as replicated over the world (DDP) and that claim is verified every
micro-step from the same collective (see ``fingerprint``).
"""

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist

from gqc_dist.errors import GQCConfigError, PartialGradientError

POLICY_KEY = "gqc_reduction"

try:  # DTensor is public from torch 2.5; keep the import soft for older installs
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # pragma: no cover
    DTensor = Partial = Replicate = None


def _group_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _world_size() -> int:
    return _group_size(None)


@dataclass(frozen=True)
class Replicated:
    """Identical gradient copies on every rank of ``group`` (``None``: the world)."""

    group: Any = None

    def replication(self) -> int:
        return _group_size(self.group)

    @property
    def spans_world(self) -> bool:
        return self.group is None or _group_size(self.group) == _world_size()


@dataclass(frozen=True)
class Sharded:
    """Distinct gradient pieces across ``group``; identical copies across the other ranks."""

    group: Any = None

    def replication(self) -> int:
        size, world = _group_size(self.group), _world_size()
        if world % size:
            raise GQCConfigError(
                f"Sharded(group) of size {size} does not divide the world size {world}"
            )
        return world // size

    spans_world = False


_MODE_POLICIES = {"replicated": Replicated, "sharded": Sharded}


class Piece(NamedTuple):
    """A rank-local gradient tensor, its replication factor, and whether to fingerprint it."""

    tensor: torch.Tensor
    rho: int
    check_replicated: bool


def group_policy(group: dict, distributed_mode: Optional[str]):
    """The explicit policy of a param group, from its key or from torch-gqc's ``distributed_mode``."""
    policy = group.get(POLICY_KEY)
    if policy is not None:
        if not isinstance(policy, (Replicated, Sharded)):
            raise GQCConfigError(
                f"param group key '{POLICY_KEY}' must be gqc_dist.Replicated(...) or "
                f"gqc_dist.Sharded(...), got {type(policy).__name__}"
            )
        return policy
    if distributed_mode is not None:
        return _MODE_POLICIES[distributed_mode]()
    return None


def dtensor_piece(grad) -> Piece:
    """Local shard of a DTensor gradient; ``rho`` is the product of its ``Replicate`` mesh dims."""
    rho = 1
    for dim, placement in enumerate(grad.placements):
        if isinstance(placement, Partial):
            raise PartialGradientError(
                "a DTensor gradient has a Partial placement (unreduced rank-local sums): its norm "
                "cannot be computed exactly. Keep gradient sync on (FSDP2: do not call "
                "set_requires_gradient_sync(False) between GQC steps) or redistribute first."
            )
        if isinstance(placement, Replicate):
            rho *= grad.device_mesh.size(dim)
    return Piece(grad.to_local(), rho, False)


def resolve_piece(grad: torch.Tensor, policy, distributed: bool) -> Piece:
    """``Piece`` for one parameter gradient under ``policy`` (``None``: detect from the gradient)."""
    is_dtensor = DTensor is not None and isinstance(grad, DTensor)
    if policy is None:
        if is_dtensor:
            return dtensor_piece(grad)
        if not distributed:
            return Piece(grad, 1, False)
        return Piece(grad, _world_size(), True)  # DDP: verified replicated every micro-step
    if is_dtensor:
        dtensor_piece(grad)  # refuses Partial even under an explicit policy
        grad = grad.to_local()
    return Piece(grad, policy.replication(), isinstance(policy, Replicated) and policy.spans_world)
