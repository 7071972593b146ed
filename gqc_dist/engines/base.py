"""The interface between the GQC controller and a training engine."""

from typing import List, Optional, Tuple, Union

import torch

from ..reduction import Piece


def clip_coefficient(clip: float, norm: float) -> float:
    """torch's ``clip_grad_norm_`` rule, ``min(1, clip / (norm + 1e-6))``; 1 when ``clip`` is 0."""
    return min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0


class GradientAdapter:
    """Access to one engine's accumulated gradient for one micro-step at a time.

    Units: gradients are the engine's accumulated *sum* over the window's micro-batches, still
    multiplied by ``loss_scale()`` when the engine scales the loss (AMP / fp16).
    """

    def local_pieces(self) -> List[Tuple[int, Piece]]:
        """This rank's gradient pieces as ``(param group index, Piece)`` with their ``rho``.

        Raises a :class:`~gqc_dist.errors.GQCError` (the same on every rank) when the layout
        cannot give an exact norm, e.g. partial gradients.
        """
        raise NotImplementedError

    def loss_scale(self) -> Optional[Union[float, torch.Tensor]]:
        """The factor the gradients still carry (a device tensor or float), ``None`` if unscaled."""
        return None

    def apply_step(self, pieces: List[torch.Tensor], multiplier: float, num_draws: int,
                   scale: float, mean_norm: float) -> None:
        """Turn the accumulated sum into the mean (``/ num_draws``), apply ``multiplier`` (GNR),
        remove the loss ``scale`` unless the engine unscales itself, step the optimizer once, and
        zero the accumulated gradient for the next window. ``pieces`` are ``local_pieces()``'s
        tensors; ``mean_norm`` is the exact global L2 norm of the gradient the step will use
        (after averaging and ``multiplier``, unscaled), for engines that clip."""
        raise NotImplementedError

    def discard(self) -> None:
        """Zero the accumulated gradient without stepping (non-finite window); back off the
        engine's loss scale if it has one."""
        raise NotImplementedError
