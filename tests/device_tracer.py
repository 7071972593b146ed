"""What a CPU run cannot show by itself: which tensors would live on the accelerator.

On a GPU run the model, its gradients and the batches live on the rank's device, and NCCL
refuses any collective tensor that was made on the host; ``float(t)`` / ``.item()`` on a device
tensor is a host sync. On the CPU both are the same memory, so :class:`DeviceTracer` (a
``TorchFunctionMode``, active in the test process only) keeps the distinction the GPU would make:

* the run's device is ``cpu:0`` (what gqc-train is given as its device) and the host is plain
  ``cpu``. A tensor made by a factory (``torch.tensor``, ``zeros``, ``full`` ...) without a
  device or with the host's, or moved with ``.cpu()`` / ``.to("cpu")``, is a *host* tensor; one
  made for ``cpu:0``, moved ``.to(cpu:0)``, produced by autograd or by an op with any non-host
  input, lives on the run's device. ``tensor.device`` reads ``cpu:0`` for those, so code that
  takes its device from a tensor behaves as on a GPU.
* every call of a ``torch.distributed`` collective made directly from gqc_dist's code is checked
  on its way through (the collective still runs, on gloo): a host tensor there is what NCCL
  would refuse (``violations``);
* ``item``/``tolist``/``float``/``int``/``bool``/``.cpu()`` of a run-device tensor is a host sync
  (``syncs``), attributed to the current micro-step by the test.

Collectives that torch issues itself (``all_gather_object``'s byte tensors, FSDP2, DCP) choose
their device by backend and are not gqc_dist's to check.
"""

import contextlib
import os
import traceback

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.overrides import TorchFunctionMode

import gqc_dist

# the library's own code, by where it is installed (a checkout named gqc_dist holds torch in .venv too)
_PACKAGE = os.path.dirname(os.path.abspath(gqc_dist.__file__)) + os.sep

RUN = torch.device("cpu", 0)
_DEVICE_PROPERTY = torch.Tensor.device
HOST = torch.device("cpu")
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
              torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye, torch.scalar_tensor,
              torch.randperm}
_SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
          torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}
_COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast",
                "all_gather", "reduce_scatter", "reduce", "all_to_all", "gather", "scatter")


def _device_of(value):
    if value is None:
        return HOST  # the default device: the host
    if isinstance(value, torch.Tensor):
        return HOST if is_host(value) else RUN
    device = torch.device(value) if not isinstance(value, int) else torch.device("cpu", value)
    return RUN if (device.type != "cpu" or device.index is not None) else HOST


def is_host(tensor) -> bool:
    """Whether ``tensor`` was made on the host (see the module docstring)."""
    return bool(getattr(tensor, "_made_on_host", False))


def _tag(value, host: bool):
    if isinstance(value, torch.Tensor):
        try:
            value._made_on_host = host
        except (AttributeError, RuntimeError):
            pass
    elif isinstance(value, (list, tuple)):
        for item in value:
            _tag(item, host)
    return value


def _tensors(args, kwargs):
    out = []
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(v for v in value if isinstance(v, torch.Tensor))
    return out


def _to_target(args, kwargs):
    """The device a ``Tensor.to`` call moves to, or ``None`` (a dtype-only cast)."""
    if "device" in kwargs:
        return _device_of(kwargs["device"])
    for value in args[1:]:
        if isinstance(value, torch.Tensor):
            return _device_of(value)
        if isinstance(value, (str, torch.device, int)) and not isinstance(value, bool):
            return _device_of(value)
    return None


class DeviceTracer(TorchFunctionMode):
    """See the module docstring. ``violations``: (collective, call site) of host tensors handed to
    a collective by gqc_dist; ``checked``: how many collective calls were checked; ``syncs``: host
    syncs of run-device tensors (call sites), cleared by the test as it likes."""

    def __init__(self):
        super().__init__()
        self.violations, self.checked, self.syncs = [], 0, []
        self._patched = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is _DEVICE_PROPERTY:  # tensor.device (a fresh method-wrapper each time)
            return HOST if is_host(args[0]) else RUN
        if func in _SYNCS and args and not is_host(args[0]):
            self.syncs.append(_site())
        result = func(*args, **kwargs)
        if func in _FACTORIES:
            return _tag(result, _device_of(kwargs.get("device")) == HOST)
        if func is torch.Tensor.to:
            target = _to_target(args, kwargs)
            if target is not None:  # a move: a new object carrying the target's side
                if result is args[0]:
                    result = result.view_as(result) if result.requires_grad or result.grad_fn else result.detach()
                return _tag(result, target == HOST)
            return _tag(result, is_host(args[0])) if result is not args[0] else result
        if func is torch.Tensor.cpu:
            if result is args[0]:
                result = result.detach()
            return _tag(result, True)
        inputs = _tensors(args, kwargs)
        if inputs and isinstance(result, (torch.Tensor, list, tuple)) and not (args and result is args[0]):
            _tag(result, all(is_host(t) for t in inputs))
        return result

    # ------------------------------------------------------------------ collectives
    def _checked(self, name, original):
        def collective(*args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if os.path.abspath(caller.filename).startswith(_PACKAGE):
                self.checked += 1
                for tensor in _tensors(args, kwargs):
                    if is_host(tensor):
                        self.violations.append((name, f"{caller.filename.rsplit('/', 1)[-1]}:{caller.lineno}"))
            return original(*args, **kwargs)

        return collective

    @contextlib.contextmanager
    def active(self):
        """The mode plus the collective checks, undone on leaving."""
        for module in (dist, c10d):
            for name in _COLLECTIVES:
                original = getattr(module, name, None)
                if original is not None:
                    self._patched.append((module, name, original))
                    setattr(module, name, self._checked(name, original))
        try:
            with self:
                yield self
        finally:
            for module, name, original in reversed(self._patched):
                setattr(module, name, original)
            self._patched.clear()


def _site() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        if "/tests/device_tracer.py" not in path and "/torch/" not in path:
            return f"{path.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"
