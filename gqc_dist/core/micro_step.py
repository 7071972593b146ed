"""The statistics of one micro-step: local sums -> one collective -> global values, in one place.

:func:`collect` is the whole communication budget of a micro-step: one fused pass over this
rank's gradient pieces (``grad_norms``), one ``all_reduce`` of a small float64 vector
(``packet``), one host synchronisation. Everything it returns is identical on every rank.
"""

import math
from typing import Callable, Dict, Optional, Tuple

import torch

from gqc_dist.engines.base import GradientAdapter
from gqc_dist.errors import GQCUsageError, PartialGradientError, RankDivergenceError
from gqc_dist.core.grad_norms import WeightCache, local_group_sums
from gqc_dist.core.packet import StatsPacket, world_rank_and_size

_BASE_FIELDS = frozenset({"group_sq", "settings", "scale", "fingerprint", "fingerprint0", "outside"})
_EPS = 2.0**-52


class MicroStepStats:
    """Global statistics of one micro-step, identical on every rank.

    Attributes:
        num_draws: ``n``, the window's micro-batches so far, this one included.
        group_sq_norms: exact squared L2 norm of each param group's accumulated gradient
            ``G_n`` (sum over the ``n`` micro-batches, unscaled), counted once per element.
        total_sq_norm: ``sum(group_sq_norms)``, ``||G_n||^2``.
        total_norm: ``||G_n||``.
        mean_grad_norm: ``total_norm / n`` (GNTS's ``||G_n|| / n``).
        nonfinite: True when a gradient piece on some rank holds inf or NaN.
        settings: rank 0's controller settings (``max_draws``, thresholds, ...).
        scale: the AMP loss scale the gradients still carry (1.0 without one).
        fields: the algorithm's own reduced fields (per-rank fields: one list per rank).
    """

    def __init__(self, group_sq_norms, num_draws, nonfinite, settings, scale, fields):
        self.group_sq_norms = group_sq_norms
        self.num_draws = num_draws
        self.total_sq_norm = sum(group_sq_norms)
        self.total_norm = math.sqrt(self.total_sq_norm)
        self.mean_grad_norm = self.total_norm / num_draws
        self.nonfinite = nonfinite
        self.settings = settings
        self.scale = scale
        self.fields = fields


def local_sums(gradients: GradientAdapter, weights: WeightCache, num_groups: int,
               fallback_device: Callable[[], torch.device]) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``(weighted, fingerprint)`` (``grad_norms.local_group_sums``): the squared L2
    norm of each param group's gradient pieces and the replication fingerprint, float64 on the
    gradients' device; one fused pass, no host sync."""
    pieces = gradients.local_pieces()
    device = pieces[0][1].tensor.device if pieces else fallback_device()
    return local_group_sums(pieces, num_groups, device, weights.get(pieces, num_groups, device, gradients.layout_version))


def collect(
    gradients: GradientAdapter,
    weights: WeightCache,
    num_groups: int,
    num_draws: int,
    settings: Dict[str, float],
    add_fields: Callable[[StatsPacket], None],
    validate_settings: Callable[[Dict[str, float]], None],
    fallback_device: Callable[[], torch.device],
    timeout_s: Optional[float] = None,
    outside: Tuple[int, int, int] = (0, 0, 0),
) -> MicroStepStats:
    """One micro-step's global statistics.

    Args:
        gradients: the engine adapter (its ``local_pieces()`` are this rank's gradient pieces).
        weights: the weight-matrix cache, reused while the adapter's layout is unchanged.
        num_groups: param groups of the optimizer.
        num_draws: micro-batches in the window so far, this one included.
        settings: this rank's controller settings; rank 0's are returned (and validated with
            ``validate_settings``) so every rank decides from the same values.
        add_fields: adds the algorithm's own fields to the packet.
        fallback_device: where the packet lives when this rank holds no gradient piece (called
            only then: under ZeRO-3 the optimizer's own parameters may be empty).
        timeout_s: bound on the all-reduce (``CollectiveTimeoutError`` after it).
        outside: this rank's ``GradientAdapter.outside_changes()`` before the read.

    Raises :class:`GQCUsageError` (on every rank) when some rank's window was cleared from
    outside or saw no backward (:func:`refuse_outside_changes`), :class:`PartialGradientError`
    (on every rank) when gradients claimed replicated differ across ranks.
    """
    distributed = world_rank_and_size()[1] > 1
    weighted, fingerprint = local_sums(gradients, weights, num_groups, fallback_device)
    device = weighted.device
    packet = StatsPacket(device)
    packet.add_sum("group_sq", weighted)
    packet.add_sum("outside", list(outside))  # host numbers: they ride with the settings
    packet.add_root("settings", list(settings.values()))
    loss_scale = gradients.loss_scale()
    if loss_scale is not None:
        packet.add_root("scale", loss_scale if isinstance(loss_scale, torch.Tensor) else [loss_scale])
    if distributed:  # a constant-size replication check: sum and sum of squares, and rank 0's value
        packet.add_sum("fingerprint", torch.cat([fingerprint, fingerprint * fingerprint]))
        packet.add_root("fingerprint0", fingerprint)
    add_fields(packet)
    reduced = packet.reduce(timeout_s)

    refuse_outside_changes(*reduced["outside"], num_draws)
    scale = reduced["scale"][0] if loss_scale is not None else 1.0
    rank0_settings = dict(zip(settings, reduced["settings"]))
    # an inf or NaN in any rank's piece reaches its group's reduced sum (grad_norms)
    nonfinite = not all(math.isfinite(v) for v in reduced["group_sq"])
    if distributed and not nonfinite:
        check_replicated(*reduced["fingerprint"], reduced["fingerprint0"][0], packet.world_size)
    validate_settings(rank0_settings)
    fields = {name: reduced[name] for name in reduced if name not in _BASE_FIELDS}
    return MicroStepStats([v / (scale * scale) for v in reduced["group_sq"]], num_draws, nonfinite,
                          rank0_settings, scale, fields)


def refuse_outside_changes(cleared: float, unchanged: float, edited: float, num_draws: int) -> None:
    """Raise :class:`GQCUsageError`, on every rank alike (the counts are sums over the ranks),
    when a window was cleared, replaced or changed in place from outside or a micro-step saw no
    backward: each would train silently wrong (a step on part of the window, or on a changed sum,
    while the counters count all of it; a micro-batch counted that never happened)."""
    held = f"{num_draws - 1} micro-batch{'es' if num_draws != 2 else ''}"
    if edited and not cleared:
        raise GQCUsageError(
            f"the window's accumulated gradient ({held}) was changed in place outside GQC since the last step() "
            f"({int(edited)} gradient tensors, summed over ranks): a zero_grad(set_to_none=False) (model's, "
            "optimizer's, a framework's) or a clip_grad_norm_ between micro-batches. Remove it: GQC zeroes the "
            "gradients itself when it steps; clip the window's mean instead with "
            "gradients=gqc_dist.engines.TorchOptimizerGradients(optimizer, clip=...)")
    if cleared:
        raise GQCUsageError(
            f"the window's accumulated gradient ({held}) was cleared or replaced outside GQC since the last "
            f"step() ({int(cleared)} gradient tensors, summed over ranks): a zero_grad() (model.zero_grad(), "
            "optimizer.zero_grad(), a framework's) between micro-batches. Remove it: GQC zeroes the gradients "
            "itself when it steps")
    if unchanged:
        raise GQCUsageError(
            f"step() was called with no backward since the last step() (no gradient changed on {int(unchanged)} "
            "rank(s)): call loss.backward() once before every step(); a second step() would count a micro-batch "
            "that never happened")


def check_replicated(total: float, total_sq: float, first: float, world: int) -> None:
    """Raise :class:`PartialGradientError` (on every rank alike) unless every rank's fingerprint
    ``f_r`` (squared norm of the pieces it claims are replicated over the world) equals rank 0's.

    Constant-size: from ``total = sum f_r``, ``total_sq = sum f_r^2`` and ``first = f_0``. Equal
    fingerprints give ``total = W f_0`` and ``total_sq = W f_0^2`` up to the all-reduce's rounding
    (relative ``(W - 1) * 2^-52`` at most); any two ranks differing by a relative ``d`` move
    ``total_sq`` by about ``2 d^2 f_0^2``, so partial sums (which differ by O(1)) cannot pass.
    """
    tolerance = 8 * world * _EPS
    if (abs(total - world * first) > tolerance * world * abs(first)
            or abs(total_sq - world * first * first) > tolerance * world * first * first):
        spread = math.sqrt(max(0.0, total_sq / world - (total / world) ** 2))
        raise PartialGradientError(
            "gradients treated as replicated differ across ranks (squared norms: rank 0 "
            f"{first!r}, mean over ranks {total / world!r}, spread {spread!r}). "
            "They are rank-local partial sums, e.g. DDP under no_sync(), or sharded/expert "
            "parameters without a policy. Synchronise gradients every micro-step (no "
            "no_sync()), pass local_accumulation=True to accumulate rank-locally on purpose, "
            "or set the param-group key 'gqc_reduction' to "
            "gqc_dist.Sharded(group) / gqc_dist.Replicated(group) for such parameters."
        )


def verify_agreement(device, row, num_batches: int, timeout_s: Optional[float] = None) -> None:
    """Verify mode's second collective: all-gather every rank's ``row`` = ``(decision,
    num_draws, state checksum)`` and raise :class:`RankDivergenceError` naming the ranks whose row
    differs from rank 0's (``num_batches``: the micro-batch count, for the message)."""
    packet = StatsPacket(device)
    packet.add_per_rank("verify", list(row))
    rows = packet.reduce(timeout_s)["verify"]
    bad = [rank for rank, other in enumerate(rows) if other != rows[0]]
    if bad:
        raise RankDivergenceError(
            f"ranks {bad} disagree with rank 0 at micro-batch {num_batches}: "
            f"(decision, num_draws, state checksum) rank 0 {tuple(rows[0])}, "
            + ", ".join(f"rank {r} {tuple(rows[r])}" for r in bad)
            + ". Their settings or counters diverged (e.g. a different threshold or "
            "max_draws on one rank).",
            ranks=bad,
        )
