"""Every collective gqc_dist and gqc-train issue, in one place that keeps them on the right device.

NCCL refuses CPU tensors, gloo takes both: a loop that averages a host tensor passes every CPU
test and crashes at its first step on GPUs. So no module calls ``torch.distributed``'s
collectives directly (``tests/test_device_discipline.py`` checks the source); they call these
functions, which take the device the caller computes on (the run's device: its gradients' or
its model's) and refuse, with :class:`DeviceMismatchError` naming the collective, a tensor that
is elsewhere, and any non-CUDA tensor when the process group is NCCL. Tensors built from host
values are made here on that device (:func:`tensor_on`, :func:`mean_over_ranks`).

Object collectives (``all_gather_object``) are torch's: it serialises on the device its backend
needs (the current CUDA device for NCCL).
"""

from datetime import timedelta
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from gqc_dist.errors import GQCError


class DeviceMismatchError(GQCError, RuntimeError):
    """A collective was handed a tensor on another device than the run's (or a CPU tensor on NCCL)."""


def initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def _caller() -> str:
    import traceback

    frames = [f for f in traceback.extract_stack()[:-3] if "/gqc_dist/collectives.py" not in f.filename.replace("\\", "/")]
    site = frames[-1] if frames else None
    return f" (called from {site.filename.rsplit('/', 1)[-1]}:{site.lineno})" if site else ""


def check_device(name: str, device: torch.device, *tensors: torch.Tensor, group=None) -> None:
    """Raise :class:`DeviceMismatchError` unless every tensor is on ``device`` (the run's) and the
    process group's backend can take it."""
    device = torch.device(device)
    for tensor in tensors:
        if tensor.device.type != device.type or (
                device.index is not None and tensor.device.index is not None and tensor.device.index != device.index):
            raise DeviceMismatchError(f"{name}{_caller()}: a tensor on {tensor.device}, the run computes on {device}; "
                                      "every collective must use the run's device (NCCL refuses CPU tensors)")
    if device.type != "cuda" and initialized() and tensors:  # a CPU run under NCCL: say so before NCCL does
        backend = dist.get_backend(group)
        if "nccl" in str(backend).lower() and any(t.device.type != "cuda" for t in tensors):
            raise DeviceMismatchError(f"{name}{_caller()}: the process group is NCCL and a tensor is on "
                                      f"{next(t.device for t in tensors if t.device.type != 'cuda')}")


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``; on CUDA through pinned memory, non-blocking: a
    pageable copy would synchronise the host with the device."""
    device = torch.device(device)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def tensor_on(values: Sequence[float], device: torch.device, dtype=torch.float64) -> torch.Tensor:
    """A 1-D tensor of host ``values`` on ``device`` (pinned and non-blocking on CUDA)."""
    return host_to_device(torch.tensor(list(values), dtype=dtype, device="cpu"), device)


def all_reduce(tensor: torch.Tensor, device: torch.device, op=None, group=None,
               timeout_s: Optional[float] = None) -> None:
    """``dist.all_reduce`` (SUM by default) in place on ``device``; with ``timeout_s`` the wait is
    bounded (a ``RuntimeError`` after it, as torch raises for a timed-out collective)."""
    check_device("all_reduce", device, tensor, group=group)
    op = dist.ReduceOp.SUM if op is None else op
    if timeout_s:
        dist.all_reduce(tensor, op=op, group=group, async_op=True).wait(timedelta(seconds=timeout_s))
    else:
        dist.all_reduce(tensor, op=op, group=group)


def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, device: torch.device, group=None) -> None:
    """``dist.reduce_scatter_tensor`` (SUM) on ``device``."""
    check_device("reduce_scatter_tensor", device, output, input, group=group)
    dist.reduce_scatter_tensor(output, input, group=group)


def all_to_all_single(output: torch.Tensor, input: torch.Tensor, device: torch.device, group=None) -> None:
    """``dist.all_to_all_single`` with equal splits on ``device``."""
    check_device("all_to_all_single", device, output, input, group=group)
    dist.all_to_all_single(output, input, group=group)


def barrier(device: torch.device) -> None:
    """Wait for every rank: a one-element all-reduce on ``device`` (``dist.barrier`` under NCCL
    guesses a device from the rank number, which is wrong when ranks do not own GPU ``rank``)."""
    if initialized():
        all_reduce(torch.zeros(1, device=device), device)


def mean_over_ranks(values, device: torch.device) -> List[float]:
    """The mean over ranks of each of ``values`` (host floats, or a 1-D tensor on ``device``):
    one small all-reduce on ``device`` and one host read."""
    tensor = values.to(device=device, dtype=torch.float64) if isinstance(values, torch.Tensor) \
        else tensor_on(values, device)
    if initialized() and dist.get_world_size() > 1:
        all_reduce(tensor, device)
        tensor = tensor / dist.get_world_size()
    return tensor.tolist()


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not initialized():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
