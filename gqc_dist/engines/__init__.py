"""Engine adapters: where each engine keeps the accumulated gradient and how to step or drop it.

An adapter knows nothing of the decision rule; the controller (``gqc_dist.wrapper``) knows
nothing of the engine. Adapters implement :class:`GradientAdapter`.
"""

from .base import GradientAdapter
from .torch_optimizer import TorchOptimizerGradients

__all__ = ["GradientAdapter", "TorchOptimizerGradients"]
