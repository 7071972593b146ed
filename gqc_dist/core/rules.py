"""Decision rules: pure functions of reduced statistics and controller settings.

Nothing here knows about torch.distributed, engines or gradients; every rank calls these with
identical inputs (delivered by the one all-reduce), so every rank decides identically.
Rules that torch-gqc evaluates in float32 torch arithmetic do the same here, so decisions match
torch-gqc bit for bit on identical statistics.
"""

import math
from typing import Optional, Sequence

import torch


def gnts_should_step(mean_grad_norm: float, threshold: float, num_draws: int, max_draws: int) -> bool:
    """GNTS: step when ``||G_n|| / n <= threshold`` or the draw budget is spent.

    ``mean_grad_norm`` is the global L2 norm of the accumulated gradient divided by ``num_draws``.
    """
    return mean_grad_norm <= threshold or num_draws >= max_draws


def gns_estimate(micro_batch_norms: Sequence[float]) -> float:
    """Gradient noise scale proxy ``var(|g_i|) / (mean(|g_i|^2) + 1e-8)`` over per-micro-batch norms.

    Computed in float32 like torch-gqc; NaN for fewer than two samples (unbiased variance).
    """
    if len(micro_batch_norms) < 2:
        return math.nan  # what torch.var gives, without its warning
    history = torch.tensor(list(micro_batch_norms), dtype=torch.float32)
    mean_squared = torch.mean(history**2)
    variance = torch.var(history)
    return (variance / (mean_squared + 1e-8)).item()


def gns_should_step(gns: float, tolerance: float, num_draws: int, max_draws: int) -> bool:
    """GNS: step when the noise proxy is at most ``num_draws * tolerance`` (float32 compare)."""
    gns32 = torch.tensor(gns, dtype=torch.float32)
    return bool(gns32 <= num_draws * tolerance) or num_draws >= max_draws


def sbc_should_step(
    num_draws: int, effective_batch_size: float, logical_batch_size: float, max_draws: int
) -> bool:
    """SBC: step once ``num_draws * effective_batch_size`` samples reach the scheduled logical batch."""
    return num_draws * effective_batch_size >= logical_batch_size or num_draws >= max_draws


def mht_running_mean(previous: Optional[float], new_metrics: Sequence[float], beta: float) -> float:
    """Exponential running mean of the metric, seeded with the first mean (torch-gqc's update)."""
    update = sum(new_metrics) / len(new_metrics)
    if previous is None:
        return update
    return previous * (1 - beta) + update * beta


def mht_should_step(
    judgment: Sequence[float],
    num_draws: int,
    max_draws: int,
    confidence_level: float,
    percent_error_threshold: float,
) -> bool:
    """MHT: step when the t-confidence interval of the metric lies within ``mean * (1 +- pct)``.

    ``judgment`` is the running mean followed by this window's metric history (torch-gqc's list).
    Fewer than two values never step, exactly as torch-gqc.
    """
    if len(judgment) < 2:
        return False
    if num_draws >= max_draws:
        return True
    from gqc_dist.extras import require

    stats = require("scipy.stats", "mht", "the MHT algorithm")  # local: only MHT needs scipy

    mean = sum(judgment) / len(judgment)
    ci_low, ci_high = stats.t.interval(
        confidence=confidence_level,
        df=len(judgment) - 1,
        loc=mean,
        scale=stats.sem(judgment) + 1e-12,
    )
    if ci_low < mean * (1 - percent_error_threshold):
        return False
    if ci_high > mean * (1 + percent_error_threshold):
        return False
    return True


def gnr_rescale_factor(grad_norm: float, target_norm: float) -> float:
    """GNR: factor that rescales a gradient of norm ``grad_norm`` to ``target_norm`` (0 for a zero grad)."""
    if grad_norm > 0 and math.isfinite(grad_norm):
        return target_norm / grad_norm
    return 0.0
