"""The one validator: every config value and argument gqc_dist checks, in the ds_config
section, gqc-train's config and the wrappers' constructors, is checked by a :class:`Kind`, so
the same value is refused with the same words wherever it is given (only the key path differs:
``gradient_quality_control.noise_beta``, ``gqc.noise_beta``, ``noise_beta``).

Algorithms declare their options with these kinds (``gqc_dist.algorithms.spec``), by name
(:data:`KINDS`) or as a :func:`choice`.
"""

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

from gqc_dist.errors import GQCConfigError, GQCTypeError


@dataclass(frozen=True)
class Kind:
    """What a value must be: a type (``type_wanted``, ``fits``) and a range (``range_wanted``,
    ``in_range``); ``convert`` normalises what passed (numbers of a config section to float)."""

    type_wanted: str
    fits: Callable[[Any], bool]
    range_wanted: str = ""
    in_range: Callable[[Any], bool] = lambda value: True
    convert: Callable[[Any], Any] = lambda value: value

    def check(self, path: str, value: Any, type_error=GQCConfigError) -> Any:
        """``value`` (converted) if it fits; otherwise one line naming ``path``: ``type_error``
        for the wrong type (the wrappers raise :class:`GQCTypeError`, a ``TypeError``, as
        torch-gqc does), :class:`GQCConfigError` out of range."""
        if not self.fits(value):
            raise type_error(f"{path} must be {self.type_wanted}, got {value!r}")
        if not self.in_range(value):
            raise GQCConfigError(f"{path} must be {self.range_wanted}, got {value!r}")
        return self.convert(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum=None) -> Kind:
    """An integer (not a bool), at least ``minimum``."""
    if minimum is None:
        return Kind("an integer", _is_int)
    return Kind("an integer", _is_int, f">= {minimum}", lambda value: value >= minimum)


def number(low=None, high=None, low_open=False, high_open=False, as_float=False) -> Kind:
    """A finite number in the interval from ``low`` to ``high`` (open ends where asked)."""
    def in_range(value):
        return ((low is None or value > low or (value == low and not low_open))
                and (high is None or value < high or (value == high and not high_open)))

    if high is None:
        wanted = "" if low is None else f"{'>' if low_open else '>='} {low}"
    else:
        wanted = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return Kind("a finite number", _is_number, wanted, in_range, float if as_float else (lambda value: value))


def choice(options: Sequence[str]) -> Kind:
    """One of the strings ``options``."""
    options = tuple(options)
    return Kind(f"one of {', '.join(options)}", lambda value: isinstance(value, str) and value in options)


def optional(kind: Kind) -> Kind:
    """``kind``, or ``None`` (JSON null)."""
    return Kind(f"{kind.type_wanted} or null", lambda value: value is None or kind.fits(value),
                f"{kind.range_wanted} or null", lambda value: value is None or kind.in_range(value),
                lambda value: value if value is None else kind.convert(value))


_integer = integer  # check_number's own argument is called integer
BOOL = Kind("true or false", lambda value: isinstance(value, bool))
#: the kinds algorithms name in their descriptors (numbers of a config section become floats,
#: but ``num1``'s integers stay integers: a fixed accumulation of 4 stays 4)
KINDS = {
    "int+": integer(1), "int0": integer(0),
    "num+": number(0, low_open=True, as_float=True), "num0": number(0, as_float=True),
    "num1": Kind("a finite number", _is_number, ">= 1", lambda value: value >= 1,
                 lambda value: value if isinstance(value, int) else float(value)),
    "prob": number(0, 1, low_open=True, as_float=True),  # in (0, 1]
    "beta": number(0, 1, high_open=True, as_float=True),  # in [0, 1): an EMA factor
    "bool": BOOL,
}


def kind_of(kind: Union[str, Kind]) -> Kind:
    """A :class:`Kind` given as itself or by its :data:`KINDS` name."""
    return kind if isinstance(kind, Kind) else KINDS[kind]


def check_number(name: str, value, *, minimum=None, allow_equal=True, integer=False):
    """Return ``value`` if it is a finite number (an int when ``integer``) at or above ``minimum``
    (strictly above when ``allow_equal`` is False); otherwise raise an error naming ``name``
    (:class:`GQCTypeError` for the wrong type)."""
    kind = _integer(minimum) if integer else number(minimum, low_open=not allow_equal)
    return kind.check(name, value, type_error=GQCTypeError)


def check_schedule_args(num_training_steps, num_warmup_steps, warmup_multiplier=None, **values):
    """Validate step counts (``0 <= warmup < training``), the multiplier (> 0) and ``values`` (>= 0)."""
    check_number("num_training_steps", num_training_steps, minimum=1, integer=True)
    check_number("num_warmup_steps", num_warmup_steps, minimum=0, integer=True)
    if num_warmup_steps >= num_training_steps:
        raise GQCConfigError(
            f"num_warmup_steps ({num_warmup_steps}) must be smaller than num_training_steps "
            f"({num_training_steps})"
        )
    if warmup_multiplier is not None:
        check_number("warmup_multiplier", warmup_multiplier, minimum=0, allow_equal=False)
    for name, value in values.items():
        check_number(name, value, minimum=0)


def check_wrapper_args(optimizer, max_draws, distributed_mode, grad_scaler, verify, gradients,
                       micro_batch_size, noise_beta, timeout_s) -> None:
    """The GQC wrapper's constructor arguments (see ``GQCOptimizerWrapper``), each error naming
    the argument."""
    import torch

    from gqc_dist.engines.base import GradientAdapter
    from gqc_dist.core.reduction import group_policy

    from gqc_dist.core.optimizer_lookalike import OptimizerLookalike

    if not isinstance(optimizer, torch.optim.Optimizer):
        raise GQCTypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, OptimizerLookalike):
        raise GQCTypeError(f"optimizer is already a GQC wrapper ({type(optimizer).__name__}): wrap the "
                           "torch optimizer itself, once")
    check_number("max_draws", max_draws, minimum=1, integer=True)
    if distributed_mode not in (None, "replicated", "sharded"):
        raise GQCConfigError(f"distributed_mode must be None, 'replicated' or 'sharded', got {distributed_mode!r}")
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise GQCTypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    if micro_batch_size is not None:
        check_number("micro_batch_size", micro_batch_size, minimum=1, integer=True)
    if noise_beta is not None:
        KINDS["beta"].check("noise_beta", noise_beta, type_error=GQCTypeError)
    if timeout_s is not None:
        check_number("timeout_s", timeout_s, minimum=0, allow_equal=False)
    BOOL.check("verify", verify, type_error=GQCTypeError)
    for group in optimizer.param_groups:
        group_policy(group, distributed_mode)  # validates explicit policies up front
    if gradients is not None and not isinstance(gradients, GradientAdapter):
        raise GQCTypeError(f"gradients must be a GradientAdapter, got {type(gradients).__name__}")
