"""Gradient Norm Threshold Scheduler (GNTS): step when ``||G_n|| / n <= threshold``."""

from typing import Optional, Tuple

import torch
import torch_schedule_anything as tsa

from gqc_dist.core import rules
from gqc_dist.schedules import conventional_lr_twin, lr_and_weight_decay, synchronous
from gqc_dist.validation import check_schedule_args
from gqc_dist.core.wrapper import GQCOptimizerWrapper, MicroStepStats
from gqc_dist.algorithms.spec import REQUIRED, AlgorithmSpec


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
        grad_scaler, verify, gradients: see :class:`gqc_dist.core.wrapper.GQCOptimizerWrapper`.
    """

    ALGORITHM = "gnts"
    SCHEDULABLE = {"gradient_norm_threshold": 1.0}

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


def _threshold_schedule(wrapper, initial, final, num_warmup_steps, num_training_steps, warmup_multiplier):
    return tsa.cosine_annealing_with_inverse_warmup(
        wrapper, warmup_to_value=initial, anneal_to_value=final, num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps, warmup_multiplier=warmup_multiplier,
        schedule_target="gradient_norm_threshold")


def make_gnts_with_cosine_annealing_schedule(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int,
    initial_threshold: float = 0.95,
    final_threshold: float = 0.25,
    warmup_multiplier: float = 10,
    max_batch_draws: int = 64,
    distributed_mode: Optional[str] = None,
    *,
    conventional_lr: bool = False,
    **wrapper_kwargs,
) -> Tuple[OptimizerWrapperGNTS, tsa.SynchronousSchedule]:
    """GNTS with constant LR after warmup, threshold inverse-warmup then cosine anneal, and weight
    decay warmup then anneal to zero (torch-gqc's factory). Step the schedule once per optimizer
    step. ``wrapper_kwargs`` (``grad_scaler``, ``verify``) go to the wrapper."""
    check_schedule_args(num_training_steps, num_warmup_steps, warmup_multiplier,
                        initial_threshold=initial_threshold, final_threshold=final_threshold)
    wrapper = OptimizerWrapperGNTS(optimizer, max_batch_draws, distributed_mode, **wrapper_kwargs)
    schedules = lr_and_weight_decay(wrapper, num_warmup_steps, num_training_steps, conventional_lr)
    schedules.append(_threshold_schedule(wrapper, initial_threshold, final_threshold, num_warmup_steps,
                                         num_training_steps, warmup_multiplier))
    return wrapper, synchronous(schedules)


make_gnts_with_cosine_annealing_schedule_conventional_lr = conventional_lr_twin(
    make_gnts_with_cosine_annealing_schedule,
    """GNTS with LR warmup then cosine anneal to zero and the same threshold schedule; weight
    decay is not scheduled (torch-gqc's factory).""")


SPEC = AlgorithmSpec(
    name="gnts",
    build=lambda optimizer, section, context, **kwargs: OptimizerWrapperGNTS(
        optimizer, section["max_draws"], **kwargs),
    options={"max_draws": ("int+", 64)},
    values={"threshold": ("num0", "gradient_norm_threshold")},
    schedule={"initial_threshold": ("num0", REQUIRED), "final_threshold": ("num0", REQUIRED),
              "warmup_multiplier": ("num+", 10.0)},
    make_schedules=lambda wrapper, s: [_threshold_schedule(
        wrapper, s["initial_threshold"], s["final_threshold"], s["num_warmup_steps"],
        s["num_training_steps"], s["warmup_multiplier"])],
    logged_value="gradient_norm_threshold",
)
