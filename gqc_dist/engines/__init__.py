"""Engine adapters: where each engine keeps the accumulated gradient and how to step or drop it.

An adapter knows nothing of the decision rule; the controller (``gqc_dist.core.wrapper``) knows
nothing of the engine. Adapters implement :class:`GradientAdapter`.
"""

from gqc_dist.engines.base import GradientAdapter
from gqc_dist.engines.torch_optimizer import TorchOptimizerGradients

__all__ = ["GradientAdapter", "TorchOptimizerGradients"]
