"""Scheduled Batch Controller (SBC): step once the accumulated samples reach a scheduled batch size."""

from typing import Optional, Tuple

import torch
import torch_schedule_anything as tsa

from gqc_dist.core import rules
from gqc_dist.errors import GQCConfigError
from gqc_dist.schedules import conventional_lr_twin, lr_and_weight_decay, synchronous
from gqc_dist.validation import check_number, check_schedule_args
from gqc_dist.core.wrapper import GQCOptimizerWrapper, MicroStepStats
from gqc_dist.algorithms.spec import REQUIRED, AlgorithmSpec


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
        **kwargs,
    ):
        check_number("physical_batch_size", physical_batch_size, minimum=1, integer=True)
        super().__init__(optimizer, max_batch_draws, distributed_mode, **kwargs)
        self._physical_batch_size = physical_batch_size
        self._effective_batch_size = None

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


def _batch_schedule(wrapper, initial, final, num_warmup_steps, num_training_steps, power):
    return tsa.polynomial_schedule_with_warmup(
        wrapper, initial, final, num_warmup_steps, num_training_steps, polynomial_exponent=power,
        schedule_target="logical_batch_size")


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
    *,
    conventional_lr: bool = False,
    **wrapper_kwargs,
) -> Tuple[OptimizerWrapperSBC, tsa.SynchronousSchedule]:
    """SBC with constant LR, weight decay annealed to zero, polynomial logical batch growth."""
    check_schedule_args(num_training_steps, num_warmup_steps, initial_batch_size=initial_batch_size,
                        final_batch_size=final_batch_size, polynomial_power=polynomial_power)
    wrapper = OptimizerWrapperSBC(optimizer, physical_batch_size, max_batch_draws, distributed_mode,
                                  **wrapper_kwargs)
    schedules = lr_and_weight_decay(wrapper, num_warmup_steps, num_training_steps, conventional_lr,
                                    constant_weight_decay=True)
    schedules.append(_batch_schedule(wrapper, initial_batch_size, final_batch_size, num_warmup_steps,
                                     num_training_steps, polynomial_power))
    return wrapper, synchronous(schedules)


make_sbc_with_polynomial_schedule_conventional_lr = conventional_lr_twin(
    make_sbc_with_polynomial_schedule,
    """SBC with cosine-annealed LR, constant weight decay, polynomial logical batch growth.""")


def _build(optimizer, section, context, **kwargs):
    batch = section.get("physical_batch_size", context.get("physical_batch_size"))
    if batch is None:
        raise GQCConfigError("gradient_quality_control.physical_batch_size is required for sbc")
    return OptimizerWrapperSBC(optimizer, batch, section["max_draws"], **kwargs)


SPEC = AlgorithmSpec(
    name="sbc",
    build=_build,
    options={"max_draws": ("int+", 64), "physical_batch_size": ("int+", None)},
    values={"logical_batch_size": ("num+", "logical_batch_size")},
    schedule={"initial_batch_size": ("num+", REQUIRED), "final_batch_size": ("num+", REQUIRED),
              "polynomial_power": ("num+", 2.0)},
    make_schedules=lambda wrapper, s: [_batch_schedule(
        wrapper, s["initial_batch_size"], s["final_batch_size"], s["num_warmup_steps"],
        s["num_training_steps"], s["polynomial_power"])],
    logged_value="logical_batch_size",
)
