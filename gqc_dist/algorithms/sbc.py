"""Scheduled Batch Controller (SBC): step once the accumulated samples reach a scheduled batch size."""

from typing import Optional, Tuple

import torch
import torch_schedule_anything as tsa

from .. import rules
from ..schedules import synchronous
from ..validation import check_number, check_schedule_args
from ..wrapper import GQCOptimizerWrapper, MicroStepStats


class OptimizerWrapperSBC(GQCOptimizerWrapper):
    """Steps when ``n * effective_batch_size >= logical_batch_size`` (max over groups) or at max draws.

    ``effective_batch_size`` is the sum of ``physical_batch_size`` over all ranks (every rank of
    a DDP or FSDP2 job draws its own micro-batch), delivered by the micro-step's one all-reduce.
    """

    ALGORITHM = "sbc"
    SCHEDULABLE = {"logical_batch_size": 1.0}

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        physical_batch_size: int,
        max_batch_draws: int = 64,
        distributed_mode: Optional[str] = None,
        *,
        grad_scaler=None,
        verify: bool = False,
        gradients=None,
    ):
        check_number("physical_batch_size", physical_batch_size, minimum=1, integer=True)
        super().__init__(
            optimizer, max_batch_draws, distributed_mode, grad_scaler=grad_scaler, verify=verify, gradients=gradients
        )
        self._physical_batch_size = physical_batch_size
        self._effective_batch_size = None

    def step(self) -> bool:
        """Account one micro-batch (after ``backward``); True when the optimizer stepped."""
        return self._micro_step()

    def _settings(self):
        return {"logical_batch_size": max(self._group_values("logical_batch_size"))}

    def _add_fields(self, packet, inputs):
        packet.add_sum("physical_batch_size", torch.tensor([float(self._physical_batch_size)]))

    def _record(self, stats: MicroStepStats):
        self._effective_batch_size = stats.fields["physical_batch_size"][0]

    def _decide(self, stats: MicroStepStats) -> bool:
        return rules.sbc_should_step(
            self.num_draws,
            self._effective_batch_size,
            stats.settings["logical_batch_size"],
            stats.settings["max_draws"],
        )

    def _algorithm_statistics(self):
        stats = {"physical_batch_size": self._physical_batch_size}
        if self._effective_batch_size is not None:
            stats["effective_batch_size"] = self._effective_batch_size
        return stats

    def _verbose_only_statistics(self):
        return ["physical_batch_size"]


def _make_sbc(optimizer, physical_batch_size, initial_batch_size, final_batch_size,
              num_training_steps, num_warmup_steps, polynomial_power, max_batch_draws,
              distributed_mode, conventional_lr, wrapper_kwargs):
    check_schedule_args(num_training_steps, num_warmup_steps, initial_batch_size=initial_batch_size,
                        final_batch_size=final_batch_size, polynomial_power=polynomial_power)
    wrapper = OptimizerWrapperSBC(optimizer, physical_batch_size, max_batch_draws, distributed_mode,
                                  **wrapper_kwargs)
    if conventional_lr:
        lr = tsa.cosine_annealing_with_warmup(
            wrapper, 1.0, 0.0, num_warmup_steps, num_training_steps, schedule_target="lr")
        wd = tsa.constant_schedule(wrapper, 1.0, "weight_decay")
    else:
        lr = tsa.constant_with_warmup(wrapper, 1.0, num_warmup_steps, schedule_target="lr")
        wd = tsa.cosine_annealing_with_warmup(
            wrapper, 1.0, 0.0, num_warmup_steps, num_training_steps, schedule_target="weight_decay")
    batch = tsa.polynomial_schedule_with_warmup(
        wrapper, initial_batch_size, final_batch_size, num_warmup_steps, num_training_steps,
        polynomial_exponent=polynomial_power, schedule_target="logical_batch_size")
    return wrapper, synchronous([lr, wd, batch])


def make_sbc_with_polynomial_schedule(
    optimizer: torch.optim.Optimizer,
    physical_batch_size: int,
    initial_batch_size: int,
    final_batch_size: int,
    num_training_steps: int,
    num_warmup_steps: int,
    polynomial_power: float = 2.0,
    max_batch_draws: int = 64,
    distributed_mode: Optional[str] = None,
    **wrapper_kwargs,
) -> Tuple[OptimizerWrapperSBC, tsa.SynchronousSchedule]:
    """SBC with constant LR, weight decay annealed to zero, polynomial logical batch growth."""
    return _make_sbc(optimizer, physical_batch_size, initial_batch_size, final_batch_size,
                     num_training_steps, num_warmup_steps, polynomial_power, max_batch_draws,
                     distributed_mode, False, wrapper_kwargs)


def make_sbc_with_polynomial_schedule_conventional_lr(
    optimizer: torch.optim.Optimizer,
    physical_batch_size: int,
    initial_batch_size: int,
    final_batch_size: int,
    num_training_steps: int,
    num_warmup_steps: int,
    polynomial_power: float = 2.0,
    max_batch_draws: int = 64,
    distributed_mode: Optional[str] = None,
    **wrapper_kwargs,
) -> Tuple[OptimizerWrapperSBC, tsa.SynchronousSchedule]:
    """SBC with cosine-annealed LR, constant weight decay, polynomial logical batch growth."""
    return _make_sbc(optimizer, physical_batch_size, initial_batch_size, final_batch_size,
                     num_training_steps, num_warmup_steps, polynomial_power, max_batch_draws,
                     distributed_mode, True, wrapper_kwargs)
