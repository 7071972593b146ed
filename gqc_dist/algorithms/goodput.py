"""Goodput: the window that makes the most training progress per second, from the measured noise
scale and the measured costs.

With the learning rate tuned per batch (gqc-train couples it to the window), the optimizer steps
to reach a loss grow as ``1 + b / n`` for windows of ``n`` micro-batches, ``b = B_simple`` in
micro-batches (McCandlish et al. 2018), so one step makes ``n / (n + b)`` of an ideal step's
progress. A window costs ``n * c + r`` seconds: ``c`` a micro-step's compute, ``r`` what a step
adds once per window (the gradient reduction under rank-local accumulation, the optimizer step)
(``gqc_dist.core.costs``). Progress per second,

    g(n) = n / ((n + b) (n c + r)),

is largest at ``n* = sqrt(b r / c)``: windows of one while reducing is cheap against a
micro-step or the noise is small, longer ones where a slow link makes every reduction dear.
This is Pollux's goodput (Qiao et al. 2021, AdaptDL) for accumulation alone, decided identically
on every rank: ``b`` from the reduced norms, ``c`` and ``r`` the means over the ranks that the
micro-step's packet carries. Bounds, probes and the growth limit are CBC's (``algorithms.cbc``).

Costs are wall-clock measurements: decisions are identical on every rank of a run, but two runs
(or a run and its resume) may take different windows.
"""

import math
from typing import Optional

from gqc_dist.algorithms.cbc import WINDOW_OPTIONS, OptimizerWrapperCBC, builder
from gqc_dist.algorithms.spec import AlgorithmSpec


def goodput(n: float, noise_scale: float, micro_step_s: float, window_s: float) -> float:
    """Progress per second of a window of ``n`` micro-batches (relative units)."""
    return n / ((n + noise_scale) * (n * micro_step_s + window_s))


def goodput_draws(noise_scale: Optional[float], micro_step_s: Optional[float], window_s: Optional[float],
                  min_draws: int, max_draws: int) -> Optional[int]:
    """The integer ``n`` in ``[min_draws, max_draws]`` with the largest :func:`goodput` (the
    smallest on a tie); ``None`` before the noise scale and a micro-step's cost are known."""
    if noise_scale is None or not micro_step_s or micro_step_s <= 0:
        return None
    if math.isinf(noise_scale):
        return math.inf  # the signal is unknown: CBC creeps up, or holds under split probes
    b, r = max(noise_scale, 0.0), max(window_s or 0.0, 0.0)
    star = math.sqrt(b * r / micro_step_s)
    candidates = {min_draws, max_draws, *(min(max(n, min_draws), max_draws) for n in (math.floor(star), math.ceil(star)))}
    return max(sorted(candidates), key=lambda n: goodput(n, b, micro_step_s, r))


class OptimizerWrapperGoodput(OptimizerWrapperCBC):
    """Steps when the window reaches the goodput-optimal length (see the module).

    Args: as :class:`~gqc_dist.algorithms.cbc.OptimizerWrapperCBC` (``max_batch_draws``,
    ``min_draws``, ``probe_interval``, ``growth``, ``local_accumulation``, ...); it has no
    ``kappa``. ``statistics()`` adds ``cost_micro_step_s``, ``cost_reduction_s`` and
    ``cost_optimizer_step_s`` (means over the ranks); ``wanted_draws`` is the goodput-optimal
    window before bounds.
    """

    ALGORITHM = "goodput"
    SCHEDULABLE = {"min_draws": 1.0}

    def _settings(self):
        return {"min_draws": max(self._group_values("min_draws"))}

    def _wanted(self, settings, min_draws, max_draws):
        costs = self._costs.shared
        window_s = (costs["reduction_s"] or 0.0) + (costs["optimizer_step_s"] or 0.0)
        return goodput_draws(self._noise.noise_scale_micro_batches(), costs["micro_step_s"], window_s,
                             min_draws, max_draws)


SPEC = AlgorithmSpec(name="goodput", build=builder(OptimizerWrapperGoodput), options=WINDOW_OPTIONS)
