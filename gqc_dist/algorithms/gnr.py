"""Gradient Norm Rescaler (GNR): every micro-batch steps, with the gradient rescaled to a target norm."""

from typing import Optional, Tuple

import torch
import torch_schedule_anything as tsa

from gqc_dist.core import rules
from gqc_dist.schedules import conventional_lr_twin, lr_and_weight_decay, synchronous
from gqc_dist.validation import check_schedule_args
from gqc_dist.core.wrapper import GQCOptimizerWrapper, MicroStepStats
from gqc_dist.algorithms.spec import REQUIRED, AlgorithmSpec


class OptimizerWrapperGNR(GQCOptimizerWrapper):
    """Rescales each gradient to the schedulable ``target_gradient_norm`` (mean over groups) and
    steps every micro-batch (``step()`` is always True unless a non-finite gradient is dropped).
    The norm it rescales by is the exact global norm."""

    ALGORITHM = "gnr"
    SCHEDULABLE = {"target_gradient_norm": 1.0}

    def __init__(self, optimizer: torch.optim.Optimizer, distributed_mode: Optional[str] = None, **kwargs):
        super().__init__(optimizer, 1, distributed_mode, **kwargs)

    def _settings(self):
        targets = self._group_values("target_gradient_norm")
        return {"target_gradient_norm": sum(targets) / len(targets)}

    def _decide(self, stats: MicroStepStats) -> bool:
        return True

    def _rescale_factor(self, stats: MicroStepStats) -> float:
        return rules.gnr_rescale_factor(stats.total_norm, stats.settings["target_gradient_norm"])


def _norm_schedule(wrapper, initial_norm, final_norm, num_warmup_steps, num_training_steps):
    return tsa.cosine_annealing_with_warmup(wrapper, initial_norm, final_norm, num_warmup_steps,
                                            num_training_steps, schedule_target="target_gradient_norm")


def make_gnr_with_cosine_annealing_schedule(
    optimizer: torch.optim.Optimizer,
    initial_norm: float,
    final_norm: float,
    num_training_steps: int,
    num_warmup_steps: int,
    distributed_mode: Optional[str] = None,
    *,
    conventional_lr: bool = False,
    **wrapper_kwargs,
) -> Tuple[OptimizerWrapperGNR, tsa.SynchronousSchedule]:
    """GNR with constant LR after warmup, target norm and weight decay cosine-annealed."""
    check_schedule_args(num_training_steps, num_warmup_steps, initial_norm=initial_norm, final_norm=final_norm)
    wrapper = OptimizerWrapperGNR(optimizer, distributed_mode, **wrapper_kwargs)
    schedules = lr_and_weight_decay(wrapper, num_warmup_steps, num_training_steps, conventional_lr)
    schedules.append(_norm_schedule(wrapper, initial_norm, final_norm, num_warmup_steps, num_training_steps))
    return wrapper, synchronous(schedules)


make_gnr_with_cosine_annealing_schedule_conventional_lr = conventional_lr_twin(
    make_gnr_with_cosine_annealing_schedule,
    """GNR with LR and target norm cosine-annealed; weight decay not scheduled.""")


SPEC = AlgorithmSpec(
    name="gnr",
    build=lambda optimizer, section, context, **kwargs: OptimizerWrapperGNR(optimizer, **kwargs),
    values={"target_norm": ("num+", "target_gradient_norm")},
    schedule={"initial_norm": ("num+", REQUIRED), "final_norm": ("num+", REQUIRED)},
    make_schedules=lambda wrapper, s: [_norm_schedule(wrapper, s["initial_norm"], s["final_norm"],
                                                      s["num_warmup_steps"], s["num_training_steps"])],
    logged_value="target_gradient_norm",
    adaptive=False,
)
