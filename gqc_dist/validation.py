"""Argument checks with errors that name the argument: shared by wrappers and factories."""

import math

from gqc_dist.errors import GQCConfigError, GQCTypeError


def check_number(name: str, value, *, minimum=None, allow_equal=True, integer=False):
    """Return ``value`` if it is a finite number (an int when ``integer``) at or above ``minimum``
    (strictly above when ``allow_equal`` is False); otherwise raise an error naming ``name``."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise GQCTypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise GQCConfigError(f"{name} must be finite, got {value!r}")
    if minimum is not None and (value < minimum or (value == minimum and not allow_equal)):
        bound = ">=" if allow_equal else ">"
        raise GQCConfigError(f"{name} must be {bound} {minimum}, got {value!r}")
    return value


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
        check_number("noise_beta", noise_beta, minimum=0)
        if not noise_beta < 1:
            raise GQCConfigError(f"noise_beta must be None or in [0, 1), got {noise_beta!r}")
    if timeout_s is not None:
        check_number("timeout_s", timeout_s, minimum=0, allow_equal=False)
    if not isinstance(verify, bool):
        raise GQCTypeError(f"verify must be a bool, got {type(verify).__name__}")
    for group in optimizer.param_groups:
        group_policy(group, distributed_mode)  # validates explicit policies up front
    if gradients is not None and not isinstance(gradients, GradientAdapter):
        raise GQCTypeError(f"gradients must be a GradientAdapter, got {type(gradients).__name__}")
