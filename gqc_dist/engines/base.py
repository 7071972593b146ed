"""The interface between the GQC controller and a training engine."""

import enum
from typing import Any, List, Optional, Tuple, Union

import torch

from gqc_dist.errors import GQCUsageError
from gqc_dist.core.reduction import Piece


def clip_coefficient(clip: float, norm: float) -> float:
    """torch's ``clip_grad_norm_`` rule, ``min(1, clip / (norm + 1e-6))``; 1 when ``clip`` is 0."""
    return min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0


class GradientState(enum.Enum):
    """What the adapter's accumulated gradient is, as it reads it.

    ``EXACT``: the engine reduces it every micro-step (the default). Rank-local accumulation
    (``gqc_dist.core.local_mode``) moves between the other two: ``LOCAL`` between steps (each rank's
    own sum, unreduced), ``REDUCED`` once :meth:`GradientAdapter.reduce_local` has averaged it
    over the ranks for the window's step; the step, a dropped window or a restore return it to
    ``LOCAL``.
    """

    EXACT = "exact"
    LOCAL = "local"
    REDUCED = "reduced"


class GradientAdapter:
    """Owner of one engine's accumulated gradient: reading it, stepping with it, dropping it, and
    saving/restoring it for a checkpoint taken mid-window. The only code that touches where the
    engine keeps its gradients; it knows nothing of the decision rule.

    Units: gradients are the engine's accumulated *sum* over the window's micro-batches, still
    multiplied by ``loss_scale()`` when the engine scales the loss (AMP / fp16).

    ``layout_version``: an integer the adapter changes whenever ``local_pieces()`` may return a
    different layout (other tensors, groups or ``rho``); ``None`` means "unknown, compare the
    pieces". The controller caches per-layout work (``grad_norms.WeightCache``) on it.
    """

    layout_version: Optional[int] = None
    state: GradientState = GradientState.EXACT

    def accumulate_locally(self) -> None:
        """Switch to rank-local accumulation (``GradientState.LOCAL``); engines that cannot keep
        rank-local sums raise :class:`~gqc_dist.errors.GQCUsageError`."""
        self._check_local_support()
        self.state = GradientState.LOCAL

    def _check_local_support(self) -> None:
        raise GQCUsageError(f"{type(self).__name__} does not support rank-local accumulation")

    def reduce_local(self) -> None:
        """Rank-local accumulation, at a step: average the rank-local sums over the
        data-parallel ranks now, in place (one full-size reduction), after which
        ``local_pieces()`` reads them as the step will use them (``GradientState.REDUCED``)."""
        if self.state is not GradientState.LOCAL:
            raise GQCUsageError(f"reduce_local() needs rank-local sums, the gradient is {self.state.value}")
        self._reduce_local()
        self.state = GradientState.REDUCED

    def _reduce_local(self) -> None:
        raise NotImplementedError

    def _window_closed(self) -> None:
        """After a step, a dropped window or a restore: the next window accumulates locally again."""
        if self.state is GradientState.REDUCED:
            self.state = GradientState.LOCAL

    def local_pieces(self) -> List[Tuple[int, Piece]]:
        """This rank's gradient pieces as ``(param group index, Piece)`` with their ``rho``.

        Raises a :class:`~gqc_dist.errors.GQCError` (the same on every rank) when the layout
        cannot give an exact norm, e.g. partial gradients.
        """
        raise NotImplementedError

    def outside_changes(self) -> Tuple[int, int, int]:
        """What happened to this rank's accumulated gradient since the adapter last read it in the
        open window, as host integers (no sync): ``(cleared, unchanged, edited)``: ``cleared``
        counts the tensors that were cleared or replaced outside GQC (a ``zero_grad()``);
        ``unchanged`` is 1 when no gradient changed at all (``step()`` without a backward);
        ``edited`` counts the tensors changed in place outside GQC (``zero_grad(set_to_none=False)``,
        a clip between micro-batches). The wrapper reduces them with the micro-step's statistics,
        so every rank refuses together. ``(0, 0, 0)`` where the adapter cannot tell (the default)
        or no window is open."""
        return 0, 0, 0

    def params_changed(self) -> None:
        """The optimizer's parameters changed (``add_param_group``): forget cached layouts."""
        self.layout_version = None

    def loss_scale(self) -> Optional[Union[float, torch.Tensor]]:
        """The factor the gradients still carry (a device tensor or float), ``None`` if unscaled."""
        return None

    def apply_step(self, multiplier: float, num_draws: int, scale: float, mean_norm: float) -> None:
        """Turn the accumulated sum into the mean (``/ num_draws``), apply ``multiplier`` (GNR),
        remove the loss ``scale`` unless the engine unscales itself, step the optimizer once, and
        zero the accumulated gradient for the next window. ``mean_norm`` is the exact global L2
        norm of the gradient the step will use (after averaging and ``multiplier``, unscaled),
        for engines that clip."""
        raise NotImplementedError

    def discard(self) -> None:
        """Zero the accumulated gradient without stepping (non-finite window); back off the
        engine's loss scale if it has one."""
        raise NotImplementedError

    def save_accumulated(self) -> Any:
        """A copy of this rank's accumulated gradient (tensors in plain containers), for a
        checkpoint taken mid-window."""
        raise NotImplementedError

    def check_accumulated(self, saved: Any) -> None:
        """Raise :class:`~gqc_dist.errors.CheckpointError` naming what does not fit, changing
        nothing, unless ``saved`` (from :meth:`save_accumulated`) fits this engine's layout."""
        raise NotImplementedError

    def restore_accumulated(self, saved: Any) -> None:
        """Make ``saved`` (checked) the accumulated gradient; ``None``: no gradient (a window
        boundary)."""
        raise NotImplementedError
