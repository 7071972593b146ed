"""The window an optimizer step is taken on, and the hooks that set that step's learning rate.

A *window hook* is called by the wrapper once per optimizer step, after the decision and before
the engine steps, with the :class:`Window` (micro-batches, samples, noise scale, forced or not)
and the optimizer's param groups. Every field comes from counters and reduced statistics that
are identical on every rank, so a hook that is a function of them sets identical values on every
rank, on every engine (DeepSpeed included: the hook runs before DeepSpeed's ``step()``).

What a hook writes to a group's ``lr`` and ``weight_decay`` holds for this one step: afterwards
the wrapper puts back what the groups held before the hook, so a torch or DeepSpeed lr scheduler
keeps owning the base value (a value the engine's own scheduler wrote during the step is kept).
Other keys it writes stay (e.g. CBC's ``min_draws``, the next window's floor).

:class:`LRCoupling` is the hook gqc_dist provides: the square-root rule for Adam (Malladi et al.
2022; OLMo-core's batch-size scheduler multiplies the learning rate by ``sqrt(new/old)``), the
linear rule for SGD, an optional schedule keyed on the window (gqc-train's token budget), and a
Seesaw-style option (Meterez et al. 2025): where the schedule would cut the learning rate by
``a``, the window floor grows by ``a`` and, with the square-root rule, the learning rate falls
by ``sqrt(a)`` only.
"""

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Union

from gqc_dist.errors import GQCConfigError

RULES = {"none": 0.0, "sqrt": 0.5, "linear": 1.0, "noise": None}  # power of n / reference; noise: below
SEESAW = (False, True, "noise")

#: what the optimizer receives for a window of n micro-batches with gradients g_1..g_n:
#: ``mean``, (g_1 + ... + g_n) / n (a fixed-accumulation loop's), or ``sqrt``, the sum over sqrt(n)
WINDOW_GRADIENTS = {"mean": 1.0, "sqrt": 0.5}


def window_gradient_factor(kind: str, num_draws: int) -> float:
    """What the window's mean gradient is multiplied by before the optimizer step: 1 for
    ``"mean"``; ``sqrt(n)`` for ``"sqrt"``, so the window hands the optimizer the sum over
    ``sqrt(n)``, whose noise has one micro-batch's size whatever ``n`` is.

    Why: Adam divides by the root of its second moment, an average over about ``1 / (1 - beta2)``
    steps (20 at gqc-train's 0.95, 1000 at torch's default). With a fixed window that average
    matches every step, and the mean and the sum over ``sqrt(n)`` give the same updates (Adam
    does not see a constant scale). When windows vary, the average mixes their noise levels: the
    mean of a long window is then divided by a second moment set by the short ones, and its step
    comes out too small by about the noise ratio. That undoes the square-root learning-rate rule,
    which assumes the second moment fits the window. Under ``"sqrt"`` every window's noise is the
    same size, so the second moment fits them all. Measured on gqc-train's 2-sequence micro-batches, unclipped, three seeds: CBC
    1.6% lower on the mean (benchmarks/README.md); gqc-train's default CBC uses it. For plain
    SGD ``"sqrt"`` is a learning-rate factor ``sqrt(n)`` on top of any coupling."""
    return num_draws ** (1.0 - WINDOW_GRADIENTS[kind])


@dataclass(frozen=True)
class Window:
    """The window an optimizer step is about to be taken on; identical on every rank.

    Attributes:
        step: optimizer steps taken before this one.
        num_draws: micro-batches in the window.
        micro_batches_seen: micro-batches the wrapper has received, this window's included
            (dropped windows' too): ``micro_batches_seen * micro_batch_size`` samples consumed.
        micro_batch_size: global samples per micro-batch, if the wrapper was told.
        noise_scale: ``B_simple`` in micro-batches as the decision saw it (``None`` before an
            estimate, ``inf`` while the signal estimate is not positive).
        forced: the window ended because it reached ``max_draws``.
        lr: the learning rate of the first param group for this step (after the hook).
    """

    step: int
    num_draws: int
    micro_batches_seen: int
    micro_batch_size: Optional[int]
    noise_scale: Optional[float]
    forced: bool
    lr: Optional[float] = None

    @property
    def samples(self) -> Optional[int]:
        """Global samples in the window (``None`` when the micro-batch size is unknown)."""
        return None if self.micro_batch_size is None else self.num_draws * self.micro_batch_size


@dataclass(frozen=True)
class Decision:
    """What one micro-batch led to (:meth:`GQCOptimizerWrapper.after_backward`); identical on
    every rank. True in a boolean context when the optimizer stepped.

    Attributes:
        stepped: the optimizer stepped on the window (the wrapper then zeroed the gradients).
        dropped: a gradient somewhere was non-finite: the window was discarded, no step.
        num_draws: micro-batches in the open window after this call (0 after a step or a drop).
        window: the :class:`Window` the step was taken on (its ``lr`` as applied), or ``None``.
        statistics: ``statistics()`` of the wrapper, read when asked for (``decision.statistics()``).
    """

    stepped: bool
    dropped: bool
    num_draws: int
    window: Optional[Window]
    statistics: Callable[[], dict]

    def __bool__(self) -> bool:
        return self.stepped


WindowHook = Callable[[Window, List[dict]], None]
_STEP_KEYS = ("lr", "weight_decay")


class StepValues:
    """Applies a hook for one step and puts ``lr`` / ``weight_decay`` back afterwards."""

    def __init__(self, hook: Optional[WindowHook], window: Window, groups: List[dict]):
        self.groups = groups
        self.saved = [{key: group[key] for key in _STEP_KEYS if key in group} for group in groups]
        if hook is not None:
            hook(window, groups)
        self.applied = [{key: group[key] for key in _STEP_KEYS if key in group} for group in groups]

    def restore(self) -> None:
        """After the step: the values before the hook, unless the step itself wrote new ones."""
        for group, saved, applied in zip(self.groups, self.saved, self.applied):
            for key, value in saved.items():
                if group.get(key) == applied.get(key):
                    group[key] = value


class LRCoupling:
    """A window hook: each step's learning rate (and weight decay) from the window it takes.

    ``lr = base_lr * warmup(window) * schedule(window) * factor`` for a window of ``n``
    micro-batches against ``r = reference_draws``: ``factor = (n / r) ** p`` with ``p`` 0.5 for
    ``rule="sqrt"`` (Adam), 1 for ``"linear"`` (SGD), 0 for ``"none"``; ``"noise"`` is the square
    root of the ratio of optimal learning rates, ``sqrt((1 + b / r) / (1 + b / n))`` with ``b``
    the window's noise scale in micro-batches (McCandlish et al. 2018: the optimal step grows as
    ``1 / (1 + B_noise / B)``): ``sqrt(n / r)`` where the noise scale is far above the window, 1
    where it is far below (a larger batch then buys no larger step), 1 before an estimate.
    ``base_lr`` is what the group holds (a scheduler's value, or a constant). With
    ``weight_decay`` true the group's weight decay is multiplied by the same factor, so AdamW's
    decay per sample, ``lr * wd / n``, stays that of the reference window under the sqrt rule.

    Args:
        rule: ``"sqrt"``, ``"linear"``, ``"noise"`` or ``"none"``.
        schedule: ``schedule(window) -> multiplier``: the decay of the base lr, 1 at its peak
            (e.g. a cosine keyed on ``window.micro_batches_seen``); ``None``: 1.
        warmup: ``warmup(window) -> multiplier`` in (0, 1], 1 once warmed up; ``None``: 1.
        seesaw: needs ``schedule``: ``True``: the next window takes at least
            ``floor(reference_draws / schedule(window))`` micro-batches (batch growth in place
            of learning-rate decay: with the sqrt rule the learning rate then falls by the
            square root of the decay only). ``"noise"``: the same floor, but no higher than the
            window's noise scale (``B_simple`` in micro-batches; no growth before a finite
            estimate): the batch replaces the decay only while it is below the noise scale,
            where a larger batch still removes noise; above it the learning rate decays as
            scheduled. Sets CBC's ``min_draws`` param-group key (other algorithms ignore it).
        reference_draws: the window length ``base_lr`` was tuned for (micro-batches).
        weight_decay: couple weight decay too.
    """

    def __init__(self, rule: str = "sqrt", schedule: Optional[Callable[[Window], float]] = None,
                 warmup: Optional[Callable[[Window], float]] = None, seesaw: Union[bool, str] = False,
                 reference_draws: int = 1, weight_decay: bool = True):
        if rule not in RULES:
            raise GQCConfigError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        if seesaw not in SEESAW:
            raise GQCConfigError(f"seesaw must be true, false or \"noise\", got {seesaw!r}")
        if seesaw and schedule is None:
            raise GQCConfigError("seesaw needs a schedule: it grows the window where the schedule decays")
        if isinstance(reference_draws, bool) or not isinstance(reference_draws, int) or reference_draws < 1:
            raise GQCConfigError(f"reference_draws must be an integer >= 1, got {reference_draws!r}")
        self.rule = rule
        self.power = RULES[rule]
        self.schedule = schedule
        self.warmup = warmup
        self.seesaw = seesaw
        self.reference_draws = reference_draws
        self.weight_decay = weight_decay

    def factor(self, num_draws: int, noise_scale: Optional[float] = None) -> float:
        """The coupling factor for a window of ``num_draws`` micro-batches (``noise_scale``: the
        window's ``B_simple`` in micro-batches, read by the ``"noise"`` rule only)."""
        ratio = num_draws / self.reference_draws
        if self.power is not None:
            return ratio ** self.power
        if noise_scale is None:
            return 1.0
        if math.isinf(noise_scale):
            return math.sqrt(ratio)
        b = max(noise_scale, 0.0)
        return math.sqrt((1 + b / self.reference_draws) / (1 + b / num_draws))

    def _seesaw_draws(self, decay: float, noise_scale: Optional[float]) -> float:
        """The window floor Seesaw asks for where the schedule stands at ``decay``."""
        grown = self.reference_draws / max(decay, 1e-12)
        if self.seesaw == "noise":  # only while the batch is below the noise scale
            known = noise_scale is not None and math.isfinite(noise_scale)
            grown = min(grown, max(noise_scale if known else 0.0, self.reference_draws))
        return grown

    def __call__(self, window: Window, groups: List[dict]) -> None:
        decay = 1.0 if self.schedule is None else float(self.schedule(window))
        warm = 1.0 if self.warmup is None else float(self.warmup(window))
        factor = self.factor(window.num_draws, window.noise_scale)
        floor = math.floor(self._seesaw_draws(decay, window.noise_scale) + 1e-9) if self.seesaw else None
        for group in groups:
            group["lr"] = group["lr"] * warm * decay * factor
            if self.weight_decay and "weight_decay" in group:
                group["weight_decay"] = group["weight_decay"] * factor
            if floor is not None:
                group["min_draws"] = float(floor)
