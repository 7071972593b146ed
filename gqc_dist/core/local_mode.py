"""Communication-avoiding mode: decide from a predicted global norm while gradients stay local.

With DDP under ``no_sync()``, FSDP2 with gradient sync off or DeepSpeed ZeRO-0/1 (whichever
the engine adapter reads: ``param.grad``, FSDP2's unsharded sums, ZeRO's local sums) each rank
holds ``G_n^r``, the sum of its own ``n`` micro-batch
gradients (``B/W`` samples each). The one small all-reduce of the micro-step then gives
``m = mean_r ||G_n^r / n||^2``, a squared mean gradient at a batch ``W`` times smaller than the
global one, and ``E m = |G|^2 + W tr(Sigma)/(nB)`` while the global
``E ||G_n/n||^2 = |G|^2 + tr(Sigma)/(nB)``. So the decision uses the prediction

    ||G_n/n||^2  ~  S + (m - S) / W,          S = |G|^2 from the noise-scale estimate

(before an estimate exists, ``S = m``: the prediction then errs high, towards drawing more). When
the rule steps, the adapter reduces the gradients over the ranks (``reduce_local``: one
full-size reduction, what the engine does once per step anyway), the exact statistics are taken, the step uses them (clipping, GNR),
and the pair (local ``m`` at ``n/W`` micro-batches, exact global at ``n``) refreshes the noise
estimate and measures the prediction's error. Every input is delivered by a collective, so
every rank predicts, decides and steps alike.
"""

import math
from typing import Any, Callable, Dict, Optional

from gqc_dist.core.micro_step import MicroStepStats
from gqc_dist.core.packet import world_rank_and_size


class LocalAccumulation:
    """The local-mode half of a wrapper's micro-step; ``gradients`` is the engine adapter (it
    must implement ``reduce_local``)."""

    def __init__(self, gradients):
        gradients.accumulate_locally()
        self.gradients = gradients
        self.world = world_rank_and_size()[1]
        self.local_mean_sq: Optional[float] = None
        self.predicted_mean_sq: Optional[float] = None
        self.estimated_decisions = 0
        self.last_prediction_error: Optional[float] = None

    def predict(self, stats: MicroStepStats, signal_sq: Optional[float]) -> MicroStepStats:
        """``stats`` (from rank-local sums, each counted once per rank) turned into the predicted
        global statistics the decision uses."""
        n, world = stats.num_draws, self.world
        local_total = stats.total_sq_norm  # sum over ranks of ||G_n^r||^2
        self.local_mean_sq = local_total / (world * n * n)
        signal = self.local_mean_sq if signal_sq is None else min(max(signal_sq, 0.0), self.local_mean_sq)
        self.predicted_mean_sq = signal + (self.local_mean_sq - signal) / world
        factor = self.predicted_mean_sq * n * n / local_total if local_total > 0 else 0.0
        self.estimated_decisions += 1
        return MicroStepStats([g * factor for g in stats.group_sq_norms], n, stats.nonfinite, stats.settings,
                              stats.scale, stats.fields)

    def at_step(self, predicted: MicroStepStats, gather_exact: Callable[[], MicroStepStats],
                noise, position: int) -> MicroStepStats:
        """Average the gradients over the ranks, take the exact statistics, recalibrate the noise
        estimate (``position``: micro-batches into the run)."""
        self.gradients.reduce_local()
        exact = gather_exact()
        n = exact.num_draws
        exact_mean_sq = exact.total_sq_norm / (n * n)
        if exact_mean_sq > 0:
            self.last_prediction_error = math.sqrt(self.predicted_mean_sq / exact_mean_sq) - 1
        if self.world > 1:
            noise.fold(self.local_mean_sq, n / self.world, exact_mean_sq, n, position)
        return exact

    def statistics(self) -> Dict[str, Any]:
        out = {"estimated_decisions": self.estimated_decisions}
        if self.last_prediction_error is not None:
            out["last_prediction_error"] = self.last_prediction_error
        return out

