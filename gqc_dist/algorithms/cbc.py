"""Critical Batch Controller (CBC): accumulate until the batch reaches ``kappa`` times the
measured gradient noise scale.

The gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` is the batch size above which more
samples per step stop paying for themselves (McCandlish et al. 2018); it grows as training
proceeds. CBC reads it from the windows' own exact norms (``gqc_dist.core.noise_scale``: no extra
communication) and steps once ``n >= ceil(kappa * B_simple)`` micro-batches, within
``[min_draws, max_draws]``. ``kappa`` is a plain ratio (1: the paper's efficient point), not a
gradient norm: nothing to tune per model.

* **Windows of one where the noise is small.** A window of one micro-batch says nothing about
  the noise, so while the target is one micro-batch every ``probe_interval``-th window (default
  24: 96% of windows stay at one) takes two; before the first estimate every window takes two.
  With ``probe="split"`` a probe window instead takes its one micro-batch in two parts
  (:attr:`split_next`, ``after_part``): the same data and the same step as a window of one,
  with the first part's norm as the estimate's second point. Measured in gqc-train
  (``benchmarks/efficiency.py``, ``third``, 8 seeds): the gap to fixed k = 1 went from +0.53%
  to +0.04% on the mean. With rank-local accumulation on several ranks every window informs
  (the ranks' local norms against the reduced one), so there are no probes.
* **No bursts.** A window takes at most ``growth`` times the previous one (at least 2), and
  while the signal estimate is not positive (``B_simple`` reads infinite: early in a run, from a
  handful of windows) one micro-batch more than the previous one, so a transient swing of the
  estimate cannot throw the run to ``max_draws``; a real rise in the noise scale is followed
  within a few steps. With ``probe="split"`` such a window instead keeps the previous one's
  length, and a window of one is split: that measures the noise at no data cost. Creeping up
  after a swing of the estimate took windows of 2, 3, ... 16 in a row on 2-sequence
  micro-batches, and the windows of 16 then measured ``B_simple`` at 80-470
  (``benchmarks/efficiency.py``, ``mb2`` seed 0).
* **No runaway.** The measured noise scale depends on the run itself: near equilibrium
  ``|G|^2`` scales with ``lr / B``, so with a constant learning rate a larger batch measures a
  larger ``B_simple`` and ``kappa * B_simple`` can feed on itself. With the learning rate
  coupled to the window by the square-root rule (:class:`gqc_dist.LRCoupling`, gqc-train's
  default) the measured value grows only as ``sqrt(n)`` and the loop has a stable fixed point.
* **Windows of ``kappa * B_simple`` in the mean** (``rounding="dither"``, gqc-train's default).
  The default ``"ceil"`` (torch-gqc's rule) rounds every window up, which overshoots by up to
  one micro-batch: by 22% on the mean window where the rule asks for 2 to 3 (measured,
  ``benchmarks/efficiency.py``, 2-sequence micro-batches). Dithering takes ``floor(wanted + u)``
  with ``u`` the ``i``-th point of the golden-ratio sequence for the ``i``-th window: the windows
  average ``wanted`` (a rule asking 1.5 takes 1 and 2 alternately), ``u`` is a function of the
  step count alone, so every rank and a resumed run take the same windows, and nothing new is
  saved.
* ``min_draws`` is also a param-group key (rank 0's value decides): a schedule or a window hook
  (Seesaw) may raise the floor during the run.
"""

import math
from typing import Optional, Tuple

import torch
import torch_schedule_anything as tsa

from gqc_dist.errors import GQCConfigError
from gqc_dist.core.packet import world_rank_and_size
from gqc_dist.schedules import synchronous
from gqc_dist.validation import check_number, check_schedule_args, choice
from gqc_dist.core.wrapper import GQCOptimizerWrapper, MicroStepStats
from gqc_dist.algorithms.spec import REQUIRED, AlgorithmSpec


ROUNDINGS = ("ceil", "dither")
PROBES = ("extra", "split")
GOLDEN = (math.sqrt(5) - 1) / 2  # the golden-ratio sequence frac(i * GOLDEN) fills [0, 1) most evenly


def dither_offset(windows: int) -> float:
    """The ``windows``-th point of the golden-ratio sequence, in ``[0, 1)``: over any run of
    windows the points are spread almost evenly, so ``floor(wanted + u)`` averages ``wanted``."""
    return (windows * GOLDEN) % 1.0


def target_draws(noise_scale: Optional[float], kappa: float, windows: int, min_draws: int,
                 max_draws: int, probe_interval: Optional[int], last_draws: Optional[int] = None,
                 growth: float = 2.0, rounding: str = "ceil") -> int:
    """Micro-batches the window should take: ``kappa * noise_scale`` (``noise_scale`` in
    micro-batches; ``None`` before an estimate) rounded and bounded by :func:`bounded_draws`."""
    wanted = None if noise_scale is None else kappa * noise_scale
    return bounded_draws(wanted, windows, min_draws, max_draws, probe_interval, last_draws, growth, rounding)


def bounded_draws(wanted: Optional[float], windows: int, min_draws: int, max_draws: int,
                  probe_interval: Optional[int], last_draws: Optional[int] = None, growth: float = 2.0,
                  rounding: str = "ceil") -> int:
    """``wanted`` micro-batches rounded up (``rounding`` ``"ceil"``) or to ``floor(wanted + u)``
    with ``u`` :func:`dither_offset` of ``windows`` (``"dither"``: the windows average
    ``wanted``) (``None``: no estimate yet, 2; ``inf``, a signal estimate that is not positive:
    one more than the last window), at most ``max(2, ceil(growth * last_draws))`` after a window
    of ``last_draws``, clamped to ``[min_draws, max_draws]``; at least 2 on every
    ``probe_interval``-th window (``windows``: steps so far) while that is 1 (``probe_interval``
    ``None``: every window informs, no probes)."""
    if wanted is None:
        wanted = 2 if probe_interval is not None else 1
    elif math.isinf(wanted):  # the signal is unknown, not infinitely small: creep up, do not burst
        wanted = (last_draws or 1) + 1
    elif rounding == "dither":
        wanted = math.floor(min(wanted, max_draws) + dither_offset(windows))
    else:
        wanted = math.ceil(wanted - 1e-9)
    if last_draws is not None:
        wanted = min(wanted, max(2, math.ceil(growth * last_draws - 1e-9)))
    wanted = min(max(wanted, min_draws), max_draws)
    if wanted < 2 and probe_interval is not None and windows % probe_interval == 0:
        wanted = 2
    return min(wanted, max_draws)


class OptimizerWrapperCBC(GQCOptimizerWrapper):
    """Steps when the window holds ``ceil(kappa * B_simple)`` micro-batches (see the module).

    Args:
        optimizer: the optimizer to drive; its param groups gain ``critical_batch_fraction``
            (``kappa``, mean over groups, rank 0's value; schedulable) and ``min_draws``
            (largest over groups, rank 0's value; schedulable).
        max_batch_draws: most micro-batches per step (>= 1).
        distributed_mode: ``None`` (detect), ``"replicated"`` or ``"sharded"``.
        min_draws: fewest micro-batches per step (1 <= min_draws <= max_batch_draws), the
            param groups' initial ``min_draws``.
        probe_interval: while the target is 1, every ``probe_interval``-th window takes 2.
        growth: a window takes at most ``growth`` times the previous one's micro-batches (and
            at least 2 may always be taken); ``>= 1``.
        rounding: ``"ceil"`` (every window ``ceil(kappa * B_simple)``, torch-gqc's rule) or
            ``"dither"`` (the windows average ``kappa * B_simple``; see the module).
        probe: how a probe window informs the noise estimate: ``"extra"`` (it takes a second
            micro-batch) or ``"split"`` (:attr:`split_next` asks the host for its micro-batch in
            two halves, :meth:`after_part` between them; a window that was not split takes the
            extra micro-batch).
        **kwargs: see :class:`gqc_dist.core.wrapper.GQCOptimizerWrapper` (``micro_batch_size``,
            ``noise_beta``, ``window_hook``, ``grad_scaler``, ``verify``, ``gradients``).
    """

    ALGORITHM = "cbc"
    SCHEDULABLE = {"critical_batch_fraction": 1.0, "min_draws": 1.0}

    def __init__(self, optimizer: torch.optim.Optimizer, max_batch_draws: int = 64,
                 distributed_mode: Optional[str] = None, *, min_draws: int = 1, probe_interval: int = 24,
                 growth: float = 2.0, rounding: str = "ceil", probe: str = "extra", **kwargs):
        check_number("min_draws", min_draws, minimum=1, integer=True)
        if rounding not in ROUNDINGS:
            raise GQCConfigError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
        if probe not in PROBES:
            raise GQCConfigError(f"probe must be one of {', '.join(PROBES)}, got {probe!r}")
        check_number("probe_interval", probe_interval, minimum=1, integer=True)
        check_number("growth", growth, minimum=1)
        if isinstance(max_batch_draws, int) and min_draws > max_batch_draws:
            raise GQCConfigError(f"min_draws ({min_draws}) must not exceed max_draws ({max_batch_draws})")
        if isinstance(optimizer, torch.optim.Optimizer):
            for group in optimizer.param_groups:
                group.setdefault("min_draws", float(min_draws))
        super().__init__(optimizer, max_batch_draws, distributed_mode, **kwargs)
        self._probe_interval = probe_interval
        self._growth = growth
        self._rounding = rounding
        self._probe = probe

    def _settings(self):
        kappas = self._group_values("critical_batch_fraction")
        return {"critical_batch_fraction": sum(kappas) / len(kappas),
                "min_draws": max(self._group_values("min_draws"))}

    def target_draws(self, settings: Optional[dict] = None) -> int:
        """Micro-batches the current window will take (every rank computes the same from rank 0's
        ``settings``, which the decision passes; default: this rank's)."""
        settings = {"max_draws": self.max_draws, **self._settings()} if settings is None else settings
        min_draws = max(1, int(round(settings["min_draws"])))
        max_draws = int(settings["max_draws"])
        # rank-local accumulation on several ranks informs every window; otherwise a window of two
        # micro-batches, or of one that was split, already informs the estimate: no probe
        informed = (self.local_accumulation and world_rank_and_size()[1] > 1) or self._noise.window_informs
        wanted = self._wanted(settings, min_draws, max_draws)
        if (self._probe == "split" and wanted is not None and math.isinf(wanted)
                and (self.num_draws == 0 or informed)):
            # the signal is not measured: hold the window, measured by its split (split_next) or, in
            # local mode, by its ranks' own norms; a window of one the host did not split measures
            # nothing yet and takes the extra micro-batch
            wanted = float(self.last_num_draws or 1)
        return bounded_draws(wanted, self.num_steps, min_draws, max_draws,
                             None if informed else self._probe_interval, self.last_num_draws, self._growth,
                             self._rounding)

    @property
    def split_next(self) -> bool:
        """With ``probe="split"``: the next micro-batch opens a probe window, to be taken in two
        halves: before the first estimate, and while the windows take one micro-batch (the last
        one did) every ``probe_interval``-th window and every window while the signal estimate
        is not positive (the noise is then not yet measured). Longer windows inform the estimate
        on their own, and a half micro-batch's norm is the noisier point (a squared norm's tail
        is heavier over fewer samples), so they are not split. A function of counters and the
        noise estimate, identical on every rank."""
        if not (self._probe == "split" and self.num_draws == 0 and self._part is None
                and not self.local_accumulation):  # local mode: after_part observes nothing
            return False
        if not self._noise.estimable:
            return True
        unmeasured = math.isinf(self._noise.noise_scale_micro_batches())
        return self.last_num_draws == 1 and (unmeasured or self.num_steps % self._probe_interval == 0)

    def _wanted(self, settings: dict, min_draws: int, max_draws: int) -> Optional[float]:
        """Micro-batches the rule asks for before bounds (``None``: no estimate yet)."""
        noise_scale = self._noise.noise_scale_micro_batches()
        return None if noise_scale is None else settings["critical_batch_fraction"] * noise_scale

    def _decide(self, stats: MicroStepStats) -> bool:
        return self.num_draws >= self.target_draws(stats.settings)

    def _algorithm_statistics(self):
        """``target_draws``: the current window's length; ``wanted_draws``: what the rule asks for
        before bounds (``kappa * B_simple`` in micro-batches), ``None`` before an estimate."""
        settings = {"max_draws": self.max_draws, **self._settings()}
        min_draws = max(1, int(round(settings["min_draws"])))
        return {"target_draws": self.target_draws(), "wanted_draws": self._wanted(settings, min_draws, self.max_draws)}

    def _verbose_only_statistics(self):
        return ["min_draws"]


def _kappa_schedule(wrapper, initial, final, num_warmup_steps, num_training_steps):
    return tsa.cosine_annealing_with_warmup(wrapper, initial, final, num_warmup_steps, num_training_steps,
                                            schedule_target="critical_batch_fraction")


def make_cbc_with_cosine_annealing_schedule(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int,
    kappa: float = 1.0,
    max_batch_draws: int = 64,
    distributed_mode: Optional[str] = None,
    **wrapper_kwargs,
) -> Tuple[OptimizerWrapperCBC, tsa.SynchronousSchedule]:
    """CBC with a constant ``kappa`` and the learning rate warmed up then cosine-annealed to zero
    over ``num_training_steps`` optimizer steps. Step the schedule once per optimizer step."""
    check_schedule_args(num_training_steps, num_warmup_steps, kappa=kappa)
    wrapper = OptimizerWrapperCBC(optimizer, max_batch_draws, distributed_mode, **wrapper_kwargs)
    for group in wrapper.param_groups:
        group["critical_batch_fraction"] = kappa
    lr = tsa.cosine_annealing_with_warmup(wrapper, 1.0, 0.0, num_warmup_steps, num_training_steps,
                                          schedule_target="lr")
    return wrapper, synchronous([lr])


#: the options CBC and the rules built on its bounds (goodput) take
WINDOW_OPTIONS = {"max_draws": ("int+", 64), "min_draws": ("int+", 1), "probe_interval": ("int+", 24),
                  "growth": ("num1", 2.0), "probe": (choice(PROBES), "extra")}


def builder(cls, *extra):
    """``AlgorithmSpec.build`` for ``cls``, a wrapper taking :data:`WINDOW_OPTIONS` and the
    options named in ``extra``."""
    def build(optimizer, section, context, **kwargs):
        return cls(optimizer, section["max_draws"], min_draws=section["min_draws"],
                   probe_interval=section["probe_interval"], growth=section["growth"], probe=section["probe"],
                   **{key: section[key] for key in extra}, **kwargs)
    return build


SPEC = AlgorithmSpec(
    name="cbc",
    build=builder(OptimizerWrapperCBC, "rounding"),
    options={**WINDOW_OPTIONS, "rounding": (choice(ROUNDINGS), "ceil")},
    values={"kappa": ("num+", "critical_batch_fraction")},
    schedule={"initial_kappa": ("num+", REQUIRED), "final_kappa": ("num+", REQUIRED)},
    make_schedules=lambda wrapper, s: [_kappa_schedule(wrapper, s["initial_kappa"], s["final_kappa"],
                                                       s["num_warmup_steps"], s["num_training_steps"])],
    logged_value="critical_batch_fraction",
)
