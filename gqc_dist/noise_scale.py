"""Gradient noise statistics from the norms the window already measures (no extra traffic).

With ``B`` samples per global micro-batch and ``G_n`` the sum of the window's ``n`` micro-batch
mean gradients (all at the same parameters), ``E||G_n/n||^2 = |G|^2 + tr(Sigma)/(nB)``
(McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", appendix A.1). The first
micro-batch of a window (``||G_1||^2``, batch ``B``) and the whole window (``||G_N/N||^2``, batch
``NB``) are two batch sizes' samples of that line, so per window

    noise  = N (||G_1||^2 - ||G_N/N||^2) / (N - 1)      (tr(Sigma)/B: one micro-batch's noise)
    signal = (N ||G_N/N||^2 - ||G_1||^2) / (N - 1)      (|G|^2)

are unbiased. Both are smoothed across windows separately (an exponential moving average with
Adam's bias correction) and their ratio is the gradient noise scale ``B_simple = tr(Sigma)/|G|^2``
in micro-batches (times ``B``: in samples). A window of one micro-batch carries no information
and leaves the estimate as it was; controllers that want ``n = 1`` keep it fresh by drawing a
second micro-batch now and then (see ``algorithms.cbc``). The inputs are the exact global squared
norms every rank already holds, so every rank computes the same estimate.
"""

import math
from typing import Any, Dict, Optional


class NoiseScaleEstimator:
    """Smoothed ``|G|^2``, ``tr(Sigma)`` and ``B_simple`` from windows' first and last norms
    (or, with rank-local accumulation, from the ranks' local norms against the global one).

    Args:
        beta: EMA factor per informative window (0 < beta < 1); larger is smoother, slower.
        micro_batch_size: global samples per micro-step (``B``), or ``None`` if unknown; only
            the sample-unit statistics need it.
    """

    def __init__(self, beta: float = 0.9, micro_batch_size: Optional[int] = None):
        self.beta = beta
        self.micro_batch_size = micro_batch_size
        self._first_sq: Optional[float] = None  # ||G_1||^2 of the open window
        self._ema_noise = 0.0
        self._ema_signal = 0.0
        self._windows = 0  # informative windows folded into the averages

    def observe(self, num_draws: int, total_sq_norm: float) -> None:
        """Record the exact global ``||G_n||^2`` (sum of ``n`` micro-batch gradients, unscaled)."""
        if num_draws == 1:
            self._first_sq = total_sq_norm

    def close_window(self, num_draws: int, total_sq_norm: float) -> None:
        """The window ends in an optimizer step with ``num_draws`` micro-batches and
        ``||G_N||^2 = total_sq_norm``: fold its estimates into the averages (N >= 2)."""
        first, self._first_sq = self._first_sq, None
        if num_draws >= 2 and first is not None:
            self.fold(first, 1, total_sq_norm / num_draws**2, num_draws)

    def fold(self, small_sq: float, small_batch: float, large_sq: float, large_batch: float) -> None:
        """Fold one pair of squared mean-gradient norms at two batch sizes (in micro-batches,
        ``small_batch < large_batch``, same parameters) into the averages: with
        ``E s_b = |G|^2 + T / b``, ``T = (s_small - s_large) / (1/small - 1/large)`` is
        ``tr(Sigma)/B`` and ``|G|^2 = s_large - T / large``."""
        if not (math.isfinite(small_sq) and math.isfinite(large_sq)) or not small_batch < large_batch:
            return
        noise = (small_sq - large_sq) / (1 / small_batch - 1 / large_batch)
        signal = large_sq - noise / large_batch
        self._ema_noise = self.beta * self._ema_noise + (1 - self.beta) * noise
        self._ema_signal = self.beta * self._ema_signal + (1 - self.beta) * signal
        self._windows += 1

    def drop_window(self) -> None:
        """The window was dropped (non-finite): forget its first norm."""
        self._first_sq = None

    @property
    def estimable(self) -> bool:
        return self._windows > 0

    def noise_per_micro_batch(self) -> Optional[float]:
        """``tr(Sigma)/B``: the expected squared noise of one micro-batch's mean gradient."""
        return self._ema_noise / self._debias() if self.estimable else None

    def signal_sq(self) -> Optional[float]:
        """``|G|^2``: the squared norm of the true gradient."""
        return self._ema_signal / self._debias() if self.estimable else None

    def noise_scale_micro_batches(self) -> Optional[float]:
        """``B_simple`` in global micro-batches; ``inf`` when the signal estimate is not positive
        (noise dominates), ``None`` before the first informative window."""
        if not self.estimable:
            return None
        if self._ema_signal <= 0:
            return math.inf
        return max(0.0, self._ema_noise) / self._ema_signal

    def statistics(self) -> Dict[str, Any]:
        """``gradient_noise_scale_micro_batches``, ``gradient_signal_sq``, ``gradient_noise_trace``
        (``tr(Sigma)`` per sample when ``B`` is known, else per micro-batch, i.e. ``tr(Sigma)/B``)
        and ``gradient_noise_scale`` (samples, when ``B`` is known); empty before an estimate."""
        if not self.estimable:
            return {}
        per_micro_batch = self.noise_per_micro_batch()
        out = {"gradient_noise_scale_micro_batches": self.noise_scale_micro_batches(),
               "gradient_signal_sq": self.signal_sq(), "gradient_noise_trace": per_micro_batch}
        if self.micro_batch_size:
            out["gradient_noise_trace"] = per_micro_batch * self.micro_batch_size
            out["gradient_noise_scale"] = self.noise_scale_micro_batches() * self.micro_batch_size
        return out

    def _debias(self) -> float:
        return 1 - self.beta ** self._windows

    def state_dict(self) -> Dict[str, Any]:
        return {"first_sq": self._first_sq, "ema_noise": self._ema_noise, "ema_signal": self._ema_signal,
                "windows": self._windows}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._first_sq = state["first_sq"]
        self._ema_noise = state["ema_noise"]
        self._ema_signal = state["ema_signal"]
        self._windows = state["windows"]
