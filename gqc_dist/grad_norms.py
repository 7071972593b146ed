"""Rank-local gradient sums, on device, in one fused pass and without a host sync.

``local_group_sums`` takes the gradient pieces of each param group (see ``reduction.Piece``) and
returns float64 device tensors:

* ``weighted``: per group, ``sum ||x||^2 / rho(x)``; after the all-reduce SUM this is the exact
  squared global norm of the group.
* ``nonfinite``: how many pieces hold an inf or NaN (read off the same per-tensor norms).
* ``fingerprint``: squared norm of the pieces claimed replicated over the world; replicated copies
  give bit-identical values on every rank, so comparing it across ranks detects partial grads.
"""

from typing import List, Sequence, Tuple

import torch

from .reduction import Piece


class LocalSums:
    """Holder of the three device tensors described in the module docstring."""

    __slots__ = ("weighted", "nonfinite", "fingerprint")

    def __init__(self, weighted, nonfinite, fingerprint):
        self.weighted = weighted
        self.nonfinite = nonfinite
        self.fingerprint = fingerprint


def per_tensor_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Float32 L2 norm of every tensor, stacked, via one foreach kernel per device and dtype."""
    if not tensors:
        return torch.zeros(0)
    norms = torch._foreach_norm(list(tensors), 2, dtype=torch.float32)
    device = tensors[0].device
    return torch.stack([n.to(device) for n in norms])


class WeightCache:
    """Device copies of per-piece ``1/rho`` weights, rebuilt only when the layout changes."""

    def __init__(self):
        self._key = None
        self._tensors = None

    def get(self, pieces: List[Tuple[int, Piece]], num_groups: int, device) -> Tuple[torch.Tensor, ...]:
        key = (device, num_groups, tuple((g, p.rho, p.check_replicated) for g, p in pieces))
        if key != self._key:
            inv_rho = torch.tensor([1.0 / p.rho for _, p in pieces], dtype=torch.float64)
            group_index = torch.tensor([g for g, _ in pieces], dtype=torch.long)
            replicated = torch.tensor([p.check_replicated for _, p in pieces], dtype=torch.float64)
            self._tensors = tuple(t.to(device) for t in (inv_rho, group_index, replicated))
            self._key = key
        return self._tensors


def local_group_sums(
    pieces: List[Tuple[int, Piece]], num_groups: int, device: torch.device, cache: WeightCache
) -> LocalSums:
    """Rank-local sums over ``pieces`` (``(group index, Piece)`` pairs); see the module docstring."""
    weighted = torch.zeros(num_groups, dtype=torch.float64, device=device)
    if not pieces:
        zero = torch.zeros(1, dtype=torch.float64, device=device)
        return LocalSums(weighted, zero, zero)
    norms = per_tensor_norms([p.tensor for _, p in pieces]).to(device=device, dtype=torch.float64)
    squares = norms * norms
    inv_rho, group_index, replicated = cache.get(pieces, num_groups, device)
    weighted.index_add_(0, group_index, squares * inv_rho)
    nonfinite = (~torch.isfinite(norms)).sum(dtype=torch.float64).reshape(1)
    # where(), not a product: an inf square times a zero weight would turn into NaN
    fingerprint = torch.where(replicated > 0, squares, 0.0).sum().reshape(1)
    return LocalSums(weighted, nonfinite, fingerprint)

