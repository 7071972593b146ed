"""Rank-local gradient sums, on device, in one fused pass and without a host sync.

``local_group_sums`` takes the gradient pieces of each param group (see ``reduction.Piece``) and
returns float64 device tensors:

* ``weighted``: per group, ``sum ||x||^2 / rho(x)``; after the all-reduce SUM this is the exact
  squared global norm of the group. A piece holding inf or NaN makes its group's entry non-finite
  (its weight ``1/rho`` is positive and every term is >= 0; through the matrix product the NaN
  reaches the other groups' entries too), so the caller reads "some rank has a non-finite
  gradient" off the reduced values and needs no separate flag.
* ``fingerprint``: squared norm of the pieces claimed replicated over the world; replicated copies
  give bit-identical values on every rank, so comparing it across ranks detects partial grads.

Both come out of one float64 matrix-vector product of the per-tensor squared norms with a cached
``pieces x (groups + 1)`` weight matrix.
"""

from typing import List, Sequence, Tuple

import torch

from gqc_dist.core.collectives import host_to_device
from gqc_dist.core.reduction import Piece


def per_tensor_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of every tensor, stacked, via one foreach kernel per device and dtype: float32,
    or float64 when any tensor is float64 (a norm may widen its input, never narrow it)."""
    if not tensors:
        return torch.zeros(0)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = torch._foreach_norm(list(tensors), 2, dtype=dtype)
    try:
        return torch.stack(norms)
    except RuntimeError:  # tensors on several devices: gather the norms on the first one's
        device = tensors[0].device
        return torch.stack([n.to(device) for n in norms])


class WeightCache:
    """The device weight matrix of ``local_group_sums``: row ``i`` holds ``1/rho_i`` in piece
    ``i``'s group column and, in the last column, 1 if the piece is fingerprinted.

    The caller passes the adapter's ``layout_version``: while it is unchanged the pieces are the
    same (same groups, ``rho`` and order) and the matrix is returned without looking at them;
    when it changes, the matrix is rebuilt only if the pieces' layout really differs.
    """

    def __init__(self):
        self._version = None
        self._key = None
        self._matrix = None

    def get(self, pieces: List[Tuple[int, Piece]], num_groups: int, device, layout_version=None) -> torch.Tensor:
        if layout_version is not None and layout_version == self._version and self._key[:2] == (device, num_groups):
            return self._matrix
        key = (device, num_groups, tuple((g, p.rho, p.check_replicated) for g, p in pieces))
        if key != self._key:
            matrix = torch.zeros(len(pieces), num_groups + 1, dtype=torch.float64)
            for row, (group, piece) in enumerate(pieces):
                matrix[row, group] = 1.0 / piece.rho
                matrix[row, num_groups] = float(piece.check_replicated)
            self._matrix = host_to_device(matrix, device)
            self._key = key
        self._version = layout_version
        return self._matrix


def local_group_sums(
    pieces: List[Tuple[int, Piece]], num_groups: int, device: torch.device, weights: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank-local ``(weighted, fingerprint)`` over ``pieces`` (``(group index, Piece)`` pairs):
    float64 tensors of ``num_groups`` and 1 elements on ``device``; ``weights`` is
    :class:`WeightCache`'s matrix for these pieces. See the module docstring."""
    if not pieces:
        sums = torch.zeros(num_groups + 1, dtype=torch.float64, device=device)
    else:
        norms = per_tensor_norms([p.tensor for _, p in pieces]).to(device=device, dtype=torch.float64)
        sums = (norms * norms) @ weights
    return sums[:num_groups], sums[num_groups:]
