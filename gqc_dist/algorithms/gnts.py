"""Gradient Norm Threshold Scheduler (GNTS): step when ``||G_n|| / n <= threshold``."""

from typing import Optional, Tuple

import torch
import torch_schedule_anything as tsa

from .. import rules
from ..wrapper import GQCOptimizerWrapper, MicroStepStats
from ..schedules import synchronous
from ..validation import check_schedule_args


class OptimizerWrapperGNTS(GQCOptimizerWrapper):
    """Steps when the mean accumulated gradient norm falls to the threshold, or at max draws.

    ``G_n`` is the sum of the ``n`` micro-batch gradients; its global L2 norm is exact on every
    layout (one all-reduce of replication-weighted squared norms). The schedulable param-group
    key ``gradient_norm_threshold`` (minimum over groups, rank 0's value) is compared against
    ``||G_n|| / n`` in the same units as the gradient.

    Args:
        optimizer: the optimizer to drive.
        max_batch_draws: micro-batches after which a step is forced (>= 1).
        distributed_mode: ``None`` (detect), ``"replicated"`` or ``"sharded"``.
        grad_scaler, verify, gradients: see :class:`gqc_dist.wrapper.GQCOptimizerWrapper`.
    """

    ALGORITHM = "gnts"
    SCHEDULABLE = {"gradient_norm_threshold": 1.0}

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_batch_draws: int = 64,
        distributed_mode: Optional[str] = None,
        *,
        grad_scaler=None,
        verify: bool = False,
        gradients=None,
    ):
        super().__init__(
            optimizer, max_batch_draws, distributed_mode, grad_scaler=grad_scaler, verify=verify, gradients=gradients
        )

    def step(self) -> bool:
        """Account one micro-batch (after ``backward``); True when the optimizer stepped."""
        return self._micro_step()

    def get_mean_grad_norm(self) -> Optional[float]:
        """``||G_n|| / n`` as used by the last decision (``None`` before the first step() call)."""
        return self._counters["mean_grad_norm"]

    def _settings(self):
        return {"gradient_norm_threshold": min(self._group_values("gradient_norm_threshold"))}

    def _decide(self, stats: MicroStepStats) -> bool:
        return rules.gnts_should_step(
            stats.mean_grad_norm,
            stats.settings["gradient_norm_threshold"],
            self.num_draws,
            stats.settings["max_draws"],
        )


def _make_gnts(optimizer, num_training_steps, num_warmup_steps, initial_threshold,
               final_threshold, warmup_multiplier, max_batch_draws, distributed_mode,
               conventional_lr, **wrapper_kwargs):
    check_schedule_args(num_training_steps, num_warmup_steps, warmup_multiplier,
                        initial_threshold=initial_threshold, final_threshold=final_threshold)
    wrapper = OptimizerWrapperGNTS(optimizer, max_batch_draws, distributed_mode, **wrapper_kwargs)
    if conventional_lr:
        lr = tsa.cosine_annealing_with_warmup(
            wrapper, 1.0, 0.0, num_warmup_steps, num_training_steps, schedule_target="lr")
    else:
        lr = tsa.constant_with_warmup(wrapper, 1.0, num_warmup_steps, schedule_target="lr")
    threshold = tsa.cosine_annealing_with_inverse_warmup(
        wrapper,
        warmup_to_value=initial_threshold,
        anneal_to_value=final_threshold,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        warmup_multiplier=warmup_multiplier,
        schedule_target="gradient_norm_threshold",
    )
    schedules = [lr, threshold]
    if not conventional_lr:
        schedules.append(tsa.cosine_annealing_with_warmup(
            wrapper, 1.0, 0.0, num_warmup_steps, num_training_steps, schedule_target="weight_decay"))
    return wrapper, synchronous(schedules)


def make_gnts_with_cosine_annealing_schedule(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int,
    initial_threshold: float = 0.95,
    final_threshold: float = 0.25,
    warmup_multiplier: float = 10,
    max_batch_draws: int = 64,
    distributed_mode: Optional[str] = None,
    **wrapper_kwargs,
) -> Tuple[OptimizerWrapperGNTS, tsa.SynchronousSchedule]:
    """GNTS with constant LR after warmup, threshold inverse-warmup then cosine anneal, and weight
    decay warmup then anneal to zero (torch-gqc's factory). Step the schedule once per optimizer
    step. ``wrapper_kwargs`` (``grad_scaler``, ``verify``) go to the wrapper."""
    return _make_gnts(optimizer, num_training_steps, num_warmup_steps, initial_threshold,
                      final_threshold, warmup_multiplier, max_batch_draws, distributed_mode,
                      False, **wrapper_kwargs)


def make_gnts_with_cosine_annealing_schedule_conventional_lr(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int,
    initial_threshold: float = 0.95,
    final_threshold: float = 0.25,
    warmup_multiplier: float = 10,
    max_batch_draws: int = 64,
    distributed_mode: Optional[str] = None,
    **wrapper_kwargs,
) -> Tuple[OptimizerWrapperGNTS, tsa.SynchronousSchedule]:
    """GNTS with LR warmup then cosine anneal to zero and the same threshold schedule; weight
    decay is not scheduled (torch-gqc's factory)."""
    return _make_gnts(optimizer, num_training_steps, num_warmup_steps, initial_threshold,
                      final_threshold, warmup_multiplier, max_batch_draws, distributed_mode,
                      True, **wrapper_kwargs)
