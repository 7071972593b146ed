"""Fixed accumulation: exactly ``accumulation_steps`` micro-batches per optimizer step.

The baseline GQC is compared against. It measures the same statistics (``mean_grad_norm``),
drops non-finite windows and checkpoints like every other algorithm.
"""

from typing import Optional

import torch

from ..validation import check_number
from ..wrapper import GQCOptimizerWrapper, MicroStepStats
from .spec import REQUIRED, AlgorithmSpec


class OptimizerWrapperFixed(GQCOptimizerWrapper):
    """Steps every ``accumulation_steps`` micro-batches (``max_draws`` = ``accumulation_steps``)."""

    ALGORITHM = "fixed"

    def __init__(self, optimizer: torch.optim.Optimizer, accumulation_steps: int,
                 distributed_mode: Optional[str] = None, **kwargs):
        check_number("accumulation_steps", accumulation_steps, minimum=1, integer=True)
        super().__init__(optimizer, accumulation_steps, distributed_mode, **kwargs)

    def _decide(self, stats: MicroStepStats) -> bool:
        return self.num_draws >= stats.settings["max_draws"]


SPEC = AlgorithmSpec(
    name="fixed",
    build=lambda optimizer, section, context, **kwargs: OptimizerWrapperFixed(
        optimizer, section["accumulation_steps"], **kwargs),
    options={"accumulation_steps": ("int+", REQUIRED)},
    adaptive=False,
)
