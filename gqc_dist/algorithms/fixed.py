"""Fixed accumulation: ``accumulation_steps`` micro-batches per optimizer step.

The baseline GQC is compared against. It measures the same statistics (``mean_grad_norm``),
drops non-finite windows and checkpoints like every other algorithm. A fractional
``accumulation_steps`` ``k`` (e.g. 1.25) is a fixed pattern with exactly ``k`` micro-batches per
step on average: window ``i`` takes ``floor((i + 1) k) - floor(i k)`` (1.25: 1, 1, 1, 2), so a
frontier of fixed batches can be measured between the integers instead of interpolated.
"""

import math
from typing import Optional, Union

import torch

from gqc_dist.validation import check_number
from gqc_dist.core.wrapper import GQCOptimizerWrapper, MicroStepStats
from gqc_dist.algorithms.spec import REQUIRED, AlgorithmSpec


def pattern_draws(accumulation_steps: float, window: int) -> int:
    """Micro-batches window ``window`` (0-based) takes under fixed accumulation of
    ``accumulation_steps`` per step on average."""
    k = accumulation_steps
    return math.floor((window + 1) * k + 1e-9) - math.floor(window * k + 1e-9)


class OptimizerWrapperFixed(GQCOptimizerWrapper):
    """Steps every ``accumulation_steps`` micro-batches (``max_draws`` = its ceiling); a fraction
    gives a fixed pattern with that mean (see the module)."""

    ALGORITHM = "fixed"

    def __init__(self, optimizer: torch.optim.Optimizer, accumulation_steps: Union[int, float],
                 distributed_mode: Optional[str] = None, **kwargs):
        check_number("accumulation_steps", accumulation_steps, minimum=1)
        self.accumulation_steps = accumulation_steps
        super().__init__(optimizer, math.ceil(accumulation_steps - 1e-9), distributed_mode, **kwargs)

    def _decide(self, stats: MicroStepStats) -> bool:
        if self.accumulation_steps == self.max_draws:
            return self.num_draws >= stats.settings["max_draws"]
        return self.num_draws >= pattern_draws(self.accumulation_steps, self.num_steps)


SPEC = AlgorithmSpec(
    name="fixed",
    build=lambda optimizer, section, context, **kwargs: OptimizerWrapperFixed(
        optimizer, section["accumulation_steps"], **kwargs),
    options={"accumulation_steps": ("num1", REQUIRED)},
    adaptive=False,
)
