"""The one small collective per micro-step.

Each rank packs what the decision needs into one float64 vector on the gradients' device:

* ``sum`` fields: rank-local contributions (replication-weighted squared norms, non-finite
  counts); the all-reduce SUM makes them global.
* ``root`` fields: controller settings (threshold, max_draws, ...) that only rank 0 contributes
  while the others contribute zeros, so after the SUM every rank holds rank 0's values exactly
  (``x + 0 == x``) and decides from identical inputs.
* ``per_rank`` fields: one slot per rank, zeros elsewhere, so after the SUM every rank holds every
  rank's value (per-rank micro-batch norms, metrics, replication fingerprints).

``reduce()`` issues at most one ``all_reduce`` over the world and one host synchronisation
(``tolist``). Float64 keeps squared norms and settings exact enough for parity with float64
Python arithmetic.
"""

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from gqc_dist.core import collectives
from gqc_dist.errors import CollectiveTimeoutError

Number = Union[int, float]


def world_rank_and_size():
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StatsPacket:
    """Builder of the per-micro-step statistics vector; see the module docstring."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.rank, self.world_size = world_rank_and_size()
        self._parts: List[torch.Tensor] = []
        self._fields: List[tuple] = []  # (name, kind, length per rank)

    def _host_if_cpu(self, values):
        """A CPU tensor for a packet on an accelerator rides as host numbers: reading it costs no
        sync, where a pageable copy to the device would synchronise the host."""
        if isinstance(values, torch.Tensor) and values.device.type == "cpu" and self.device.type != "cpu":
            return values.reshape(-1).tolist()
        return values

    def add_sum(self, name: str, values: Union[torch.Tensor, Sequence[Number]]) -> None:
        """Add values every rank contributes (a tensor, or host numbers that ride with the host
        part of the vector); the result is the sum over ranks."""
        values = self._host_if_cpu(values)
        if not isinstance(values, torch.Tensor):
            values = list(values)
            self._fields.append((name, "sum", len(values)))
            self._parts.append(("host", values))
            return
        values = values.reshape(-1).to(device=self.device, dtype=torch.float64)
        self._fields.append((name, "sum", values.numel()))
        self._parts.append(values)

    def add_root(self, name: str, values: Union[torch.Tensor, Sequence[Number]]) -> None:
        """Add values of which only rank 0's survive; every rank gets rank 0's values."""
        values = self._host_if_cpu(values)
        if isinstance(values, torch.Tensor):
            values = values.reshape(-1).to(device=self.device, dtype=torch.float64)
            if self.rank != 0:
                values = torch.zeros_like(values)
            self._fields.append((name, "root", values.numel()))
            self._parts.append(values)
            return
        values = list(values)
        if self.rank != 0:
            values = [0.0] * len(values)
        self._fields.append((name, "root", len(values)))
        self._parts.append(("host", values))

    def add_per_rank(self, name: str, values: Union[torch.Tensor, Sequence[Number]]) -> None:
        """Add this rank's values into its own slot; every rank gets all ranks' values."""
        values = self._host_if_cpu(values)
        if isinstance(values, torch.Tensor):
            values = values.reshape(-1).to(device=self.device, dtype=torch.float64)
            length = values.numel()
            before = torch.zeros(self.rank * length, dtype=torch.float64, device=self.device)
            after = torch.zeros(
                (self.world_size - self.rank - 1) * length, dtype=torch.float64, device=self.device
            )
            self._parts.append(torch.cat([before, values, after]))
        else:
            values = list(values)
            length = len(values)
            slots = [0.0] * (length * self.world_size)
            slots[self.rank * length : (self.rank + 1) * length] = values
            self._parts.append(("host", slots))
        self._fields.append((name, "per_rank", length))

    def reduce(self, timeout_s: Optional[float] = None) -> Dict[str, Union[List[float], List[List[float]]]]:
        """All-reduce (SUM) the packet over the world once and return its fields on the host.

        ``sum`` and ``root`` fields map to a list of floats; ``per_rank`` fields map to a list
        (one entry per rank, in rank order) of lists of floats. The all-reduce fails with
        :class:`CollectiveTimeoutError` after ``timeout_s`` seconds (``None``: the process
        group's own timeout) or when a peer is gone, naming the collective.
        """
        device_parts = [part for part in self._parts if not isinstance(part, tuple)]
        host_values = [value for part in self._parts if isinstance(part, tuple) for value in part[1]]
        device_count = sum(part.numel() for part in device_parts)
        distributed = self.world_size > 1
        if distributed and host_values:  # they ride in the same vector, the same all_reduce
            device_parts.append(collectives.tensor_on(host_values, self.device))  # no stall of the stream
        vector = torch.cat(device_parts) if device_parts else torch.zeros(0, dtype=torch.float64)
        if distributed:
            _all_reduce(vector, self.device, timeout_s, self.rank, self.world_size)
        flat = vector.tolist()  # the one host synchronisation of the micro-step
        if distributed:
            host_values = flat[device_count:]
        # one process: nothing to reduce, so host values never visited the device
        return self._unpack(self._in_part_order(flat[:device_count], host_values))

    def _in_part_order(self, device_values: List[float], host_values: List[float]) -> List[float]:
        """Device and host values merged back into the order the fields were added."""
        device, host = iter(device_values), iter(host_values)
        flat: List[float] = []
        for part in self._parts:
            if isinstance(part, tuple):
                flat.extend(next(host) for _ in part[1])
            else:
                flat.extend(next(device) for _ in range(part.numel()))
        return flat

    def _unpack(self, flat: List[float]):
        out = {}
        pos = 0
        for name, kind, length in self._fields:
            if kind == "per_rank":
                out[name] = [
                    flat[pos + r * length : pos + (r + 1) * length] for r in range(self.world_size)
                ]
                pos += length * self.world_size
            else:
                out[name] = flat[pos : pos + length]
                pos += length
        return out


def _all_reduce(vector: torch.Tensor, device: torch.device, timeout_s: Optional[float], rank: int,
                world: int) -> None:
    try:  # with timeout_s: an async op waited on with its own bound; else the process group's
        collectives.all_reduce(vector, device, timeout_s=timeout_s)
    except collectives.DeviceMismatchError:
        raise
    except RuntimeError as error:
        bound = f"within {timeout_s:g} s" if timeout_s else "within the process group's timeout"
        raise CollectiveTimeoutError(
            f"the GQC statistics all-reduce did not complete {bound} on rank {rank} of {world}: "
            f"another rank is stalled or gone ({str(error).splitlines()[0]})") from error
