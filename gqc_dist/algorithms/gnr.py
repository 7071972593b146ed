"""Gradient Norm Rescaler (GNR): every micro-batch steps, with the gradient rescaled to a target norm."""

from typing import Optional, Tuple

import torch
import torch_schedule_anything as tsa

from .. import rules
from ..schedules import synchronous
from ..validation import check_schedule_args
from ..wrapper import GQCOptimizerWrapper, MicroStepStats


class OptimizerWrapperGNR(GQCOptimizerWrapper):
    """Rescales each gradient to the schedulable ``target_gradient_norm`` (mean over groups) and
    steps every micro-batch. The norm it rescales by is the exact global norm."""

    ALGORITHM = "gnr"
    SCHEDULABLE = {"target_gradient_norm": 1.0}

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        distributed_mode: Optional[str] = None,
        *,
        grad_scaler=None,
        verify: bool = False,
        gradients=None,
    ):
        super().__init__(optimizer, 1, distributed_mode, grad_scaler=grad_scaler, verify=verify, gradients=gradients)

    def step(self) -> bool:
        """Rescale and step; always True (a non-finite gradient is dropped and returns False)."""
        return self._micro_step()

    def _settings(self):
        targets = self._group_values("target_gradient_norm")
        return {"target_gradient_norm": sum(targets) / len(targets)}

    def _decide(self, stats: MicroStepStats) -> bool:
        return True

    def _rescale_factor(self, stats: MicroStepStats) -> float:
        return rules.gnr_rescale_factor(stats.total_norm, stats.settings["target_gradient_norm"])


def _make_gnr(optimizer, initial_norm, final_norm, num_training_steps, num_warmup_steps,
              distributed_mode, conventional_lr, wrapper_kwargs):
    check_schedule_args(num_training_steps, num_warmup_steps,
                        initial_norm=initial_norm, final_norm=final_norm)
    wrapper = OptimizerWrapperGNR(optimizer, distributed_mode, **wrapper_kwargs)
    if conventional_lr:
        lr = tsa.cosine_annealing_with_warmup(
            wrapper, 1.0, 0.0, num_warmup_steps, num_training_steps, schedule_target="lr")
    else:
        lr = tsa.constant_with_warmup(wrapper, 1.0, num_warmup_steps, schedule_target="lr")
    norm = tsa.cosine_annealing_with_warmup(
        wrapper, initial_norm, final_norm, num_warmup_steps, num_training_steps,
        schedule_target="target_gradient_norm")
    schedules = [lr, norm]
    if not conventional_lr:
        schedules.append(tsa.cosine_annealing_with_warmup(
            wrapper, 1.0, 0.0, num_warmup_steps, num_training_steps, schedule_target="weight_decay"))
    return wrapper, synchronous(schedules)


def make_gnr_with_cosine_annealing_schedule(
    optimizer: torch.optim.Optimizer,
    initial_norm: float,
    final_norm: float,
    num_training_steps: int,
    num_warmup_steps: int,
    distributed_mode: Optional[str] = None,
    **wrapper_kwargs,
) -> Tuple[OptimizerWrapperGNR, tsa.SynchronousSchedule]:
    """GNR with constant LR after warmup, target norm and weight decay cosine-annealed."""
    return _make_gnr(optimizer, initial_norm, final_norm, num_training_steps, num_warmup_steps,
                     distributed_mode, False, wrapper_kwargs)


def make_gnr_with_cosine_annealing_schedule_conventional_lr(
    optimizer: torch.optim.Optimizer,
    initial_norm: float,
    final_norm: float,
    num_training_steps: int,
    num_warmup_steps: int,
    distributed_mode: Optional[str] = None,
    **wrapper_kwargs,
) -> Tuple[OptimizerWrapperGNR, tsa.SynchronousSchedule]:
    """GNR with LR and target norm cosine-annealed; weight decay not scheduled."""
    return _make_gnr(optimizer, initial_norm, final_norm, num_training_steps, num_warmup_steps,
                     distributed_mode, True, wrapper_kwargs)
