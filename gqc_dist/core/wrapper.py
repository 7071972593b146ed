"""The optimizer wrapper every GQC algorithm shares: the decision API frameworks drive
(counters, the micro-step, the step). What can live apart does: reporting in
``wrapper_reporting``, checkpoints in ``wrapper_checkpoints`` and ``checkpoint_state``, the
statistics collection in ``micro_step``, the optimizer look-alike in ``optimizer_lookalike``,
rank-local accumulation in ``local_mode``, the noise estimate in ``noise_scale``, costs in
``costs``, the window hook in ``window``, argument checks in ``gqc_dist.validation``.

Per micro-step (one ``after_backward()`` / ``step()`` call after one ``backward``) data flows one
way:

    gradients -> rank-local fused sums (grad_norms) -> one all-reduce (packet) -> decision (rules)
    -> optimizer step or keep accumulating

Exactly one host synchronisation and at most one collective per micro-step (two with
``verify=True``). The decision is a pure function of values the collective delivered
identically to every rank (global squared norms, rank 0's settings) and of counters that
advance identically, so ranks cannot disagree.

Policies this wrapper implements (documented in docs/guarantees.md):

* The wrapper owns ``zero_grad``: it zeroes after every optimizer step and after a dropped window.
* Non-finite gradients (inf/NaN in any rank's piece, including AMP overflow) drop the whole
  accumulation window: gradients are zeroed, the optimizer never sees them, the GradScaler
  backs off, and ``statistics()`` counts ``nonfinite_micro_batches`` and ``dropped_windows``.
  Dropping the window costs no extra memory; keeping the earlier micro-batches would need a
  second copy of every gradient.
* AMP: pass ``grad_scaler=``. The decision sees unscaled gradients; the scale is divided out
  together with the ``1/n`` average in one pass before ``optimizer.step()``; the wrapper, not the
  user, updates the scaler once per window (with the global inf flag, so every rank's scale
  stays equal). Do not call ``scaler.step`` or ``scaler.update`` yourself.
* ``state_dict()`` is a deep copy that carries the accumulated gradients, so resuming
  mid-window continues exactly as an uninterrupted run.
"""

import dataclasses
import math
import sys
import time
import zlib
from typing import Any, Dict, List, Optional

import torch

from gqc_dist.core import checkpoint_state
from gqc_dist.core.costs import CostMeter
from gqc_dist.errors import GQCConfigError, GQCUsageError
from gqc_dist.engines import GradientAdapter, TorchOptimizerGradients
from gqc_dist.core.grad_norms import WeightCache
from gqc_dist.core.micro_step import MicroStepStats, collect, local_sums, verify_agreement
from gqc_dist.core.local_mode import LocalAccumulation
from gqc_dist.core.noise_scale import NoiseScaleEstimator
from gqc_dist.core.framework_leftovers import STOCK_TRAINER, calling_loop
from gqc_dist.core.optimizer_lookalike import OptimizerLookalike
from gqc_dist.core.packet import StatsPacket, world_rank_and_size
from gqc_dist.validation import check_number, check_wrapper_args
from gqc_dist.core.wrapper_checkpoints import WrapperCheckpoints
from gqc_dist.core.wrapper_reporting import WrapperReporting
from gqc_dist.core.window import WINDOW_GRADIENTS, Decision, StepValues, Window, WindowHook, window_gradient_factor

_CARRIED = "carried"  # the packet field of carry()'s values
_PART = "part_sq"  # the packet field of after_part()'s squared norms


class GQCOptimizerWrapper(WrapperReporting, WrapperCheckpoints, OptimizerLookalike):
    """Base of the GQC optimizer wrappers (subclasses implement one decision rule each).

    Args:
        optimizer: the ``torch.optim.Optimizer`` to drive; its ``param_groups`` gain the
            algorithm's schedulable keys (e.g. ``gradient_norm_threshold``) so that
            torch-schedule-anything schedules can drive them.
        max_batch_draws: micro-batches after which a step is forced (>= 1; torch-gqc's name).
        distributed_mode: torch-gqc's ``"replicated"`` / ``"sharded"`` (applied to param groups
            without an explicit ``"gqc_reduction"`` policy), or ``None`` to detect the layout.
        grad_scaler: an enabled ``torch.amp.GradScaler`` when training with AMP fp16.
        verify: all-gather ``(decision, draws, state checksum)`` every micro-step and raise
            :class:`RankDivergenceError` naming the ranks that disagree (one extra collective).
        gradients: the engine adapter that holds the gradients (default: ``param.grad`` of
            ``optimizer``, see :class:`gqc_dist.engines.TorchOptimizerGradients`).
        micro_batch_size: global samples per micro-step (all data-parallel ranks together), if
            known: ``statistics()`` then reports the gradient noise scale in samples too.
        noise_beta: ``None`` (default): the noise-scale estimate remembers about the last half of
            the run; a number in [0, 1): a fixed EMA factor per informative window instead
            (:class:`gqc_dist.core.noise_scale.NoiseScaleEstimator`).
        timeout_s: seconds the per-micro-step collective may take before every waiting rank
            raises :class:`gqc_dist.CollectiveTimeoutError` (a stalled or dead rank); ``None``:
            the process group's own timeout.
        local_accumulation: gradients are rank-local sums (DDP under ``no_sync()`` every
            micro-step, FSDP2 with ``set_requires_gradient_sync(False)``, DeepSpeed ZeRO-0/1):
            each micro-step reduces only a few scalars and decides from the predicted global
            norm (``gqc_dist.core.local_mode``); the step reduces the gradients over the ranks (one
            full all-reduce, or FSDP2's reduce-scatter) and recalibrates. ``statistics()``
            counts ``estimated_decisions`` and reports ``last_prediction_error``.
        window_hook: ``hook(window, param_groups)`` called before every optimizer step with the
            :class:`gqc_dist.core.window.Window` it is taken on; what it writes to ``lr`` and
            ``weight_decay`` holds for that step only (e.g. :class:`gqc_dist.LRCoupling`, the
            square-root rule). Also settable later as the ``window_hook`` attribute.
        window_gradient: what the optimizer steps on for a window of ``n`` micro-batches:
            ``"mean"`` (default: the mean, as a fixed-accumulation loop and torch-gqc take) or
            ``"sqrt"`` (the sum over ``sqrt(n)``: every window's noise the size of one
            micro-batch's, so Adam's second moment fits every window when windows vary; what
            gqc-train's default CBC uses; see
            :func:`gqc_dist.core.window.window_gradient_factor`). Clipping (the engine adapter's
            ``clip``) bounds the norm of what the optimizer receives.

    The wrapper duck-types as the optimizer (``param_groups``, ``state``, ``add_param_group`` ...)
    but owns ``zero_grad``: calling it raises :class:`GQCUsageError`.
    """

    ALGORITHM = "base"
    #: schedulable param-group keys the algorithm adds, with their initial values
    SCHEDULABLE: Dict[str, float] = {}

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_batch_draws: int = 64,
        distributed_mode: Optional[str] = None,
        *,
        grad_scaler: Optional[torch.amp.GradScaler] = None,
        verify: bool = False,
        gradients: Optional[GradientAdapter] = None,
        micro_batch_size: Optional[int] = None,
        noise_beta: Optional[float] = None,
        timeout_s: Optional[float] = None,
        local_accumulation: bool = False,
        window_hook: Optional[WindowHook] = None,
        window_gradient: str = "mean",
    ):
        check_wrapper_args(optimizer, max_batch_draws, distributed_mode, grad_scaler, verify, gradients,
                           micro_batch_size, noise_beta, timeout_s)
        # checked before the optimizer's param groups gain keys: bad input changes nothing
        if not isinstance(window_gradient, str) or window_gradient not in WINDOW_GRADIENTS:
            raise GQCConfigError(f"window_gradient must be one of {', '.join(WINDOW_GRADIENTS)}, "
                                 f"got {window_gradient!r}")
        self.window_gradient = window_gradient
        self._timeout_s = timeout_s
        self._optimizer = optimizer
        self._max_draws = max_batch_draws
        self._distributed_mode = distributed_mode
        self._verify = verify
        self._gradients = gradients or TorchOptimizerGradients(optimizer, distributed_mode, grad_scaler)
        self._local = LocalAccumulation(self._gradients) if local_accumulation else None
        self._weights = WeightCache()
        self._noise = NoiseScaleEstimator(noise_beta, micro_batch_size)
        self._costs = CostMeter()
        self._counters: Dict[str, Any] = checkpoint_state.new_counters()
        self._extend_param_groups(optimizer.param_groups)
        if window_hook is not None and not callable(window_hook):
            raise GQCConfigError(f"window_hook must be callable, got {type(window_hook).__name__}")
        self.window_hook: Optional[WindowHook] = window_hook
        #: the window of the most recent optimizer step (its ``lr`` as applied); ``None`` before
        self.last_window: Optional[Window] = None
        #: sums over the ranks of what :meth:`carry` gave the last ``step()``; ``None`` before
        self.carried: Optional[List[float]] = None
        self._carry: Optional[torch.Tensor] = None
        self._part: Optional[float] = None  # after_part()'s fraction until the micro-batch's after_backward()
        self._part_sums: Optional[torch.Tensor] = None  # this rank's squared norms of the part, per group

    def after_backward(self, loss=None) -> Decision:
        """The decision API: call once after every micro-batch's backward, on every rank.

        Reads the accumulated gradient (one fused pass, one small all-reduce, one host sync),
        decides, and when the rule says so steps the optimizer (window hook, average, clip,
        step) and zeroes the gradients; otherwise the gradients keep accumulating. The wrapper
        owns zeroing: do not call ``zero_grad()``. ``loss`` is this rank's micro-batch loss, read
        only by algorithms that need it (MHT). Returns the :class:`~gqc_dist.core.window.Decision`.
        """
        stepped = self._micro_step(**self._inputs(loss))
        return Decision(stepped, not stepped and self._counters["num_draws"] == 0, self._counters["num_draws"],
                        self.last_window if stepped else None, self.statistics)

    @property
    def split_next(self) -> bool:
        """Whether the algorithm asks for the next micro-batch in two parts, with
        :meth:`after_part` between them (CBC's noise probes with ``probe="split"``). A function of
        counters and the noise estimate, so identical on every rank. A host loop that cannot split
        may ignore it: CBC then probes with an extra micro-batch instead."""
        return False

    def after_part(self, fraction: float = 0.5) -> None:
        """Split micro-batch: call on every rank after the backward of the first part of a
        micro-batch, then run the rest and call :meth:`after_backward` as usual.

        Scale the part's loss by ``fraction`` (its share of the micro-batch's samples, equal on
        every rank) and the rest's by ``1 - fraction``: the micro-batch's gradient is then its
        mean, as if taken whole, and the window and its step are unchanged. What the split adds
        is the part's exact norm, a point at ``n - 1 + fraction`` micro-batches for the noise
        estimate (``gqc_dist.core.noise_scale``), so that a window of one micro-batch informs it. This
        rank's sums are taken here (one fused pass, no sync) and ride in the micro-step's own
        all-reduce: no extra host sync, and no extra collective except where reading the pieces
        takes one (ZeRO-0/1 in exact mode all-reduces a copy). With rank-local accumulation it
        does nothing (the ranks' own norms already inform every window). No :meth:`state_dict`
        between the parts."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise GQCConfigError(f"after_part: fraction must be a number strictly between 0 and 1, got {fraction!r}")
        if self._part is not None:
            raise GQCUsageError("after_part() was already called for this micro-batch: call after_backward() "
                                "after its remaining part")
        self._part = float(fraction)
        if self._local is None:
            self._part_sums = local_sums(self._gradients, self._weights, len(self._optimizer.param_groups),
                                         lambda: self.device)[0]

    def step(self, closure=None) -> bool:
        """torch-gqc's micro-step: :meth:`after_backward`, True when the optimizer stepped.

        ``closure`` (as ``torch.optim`` and Lightning pass it) runs first, with gradients enabled:
        it does the micro-batch's forward and backward and returns its loss.

        Refused when the stock ``transformers.Trainer`` loop calls it (the wrapper given as
        ``optimizers=``): that loop counts, schedules and zeroes every micro-batch as a step."""
        if calling_loop(sys._getframe(1)) == "transformers":  # a few frame reads, no sync
            raise GQCUsageError(STOCK_TRAINER)
        return self.after_backward(self._run_closure(closure)).stepped

    @staticmethod
    def _run_closure(closure):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _inputs(self, loss) -> dict:
        """The algorithm's own per-micro-step inputs, from this rank's loss (none by default:
        the loss is not even read, so no host sync)."""
        return {}

    def _micro_step(self, **inputs) -> bool:
        counters = self._counters
        part, self._part = self._part, None
        counters["num_batches"] += 1
        counters["num_draws"] += 1
        try:
            stats = self._gather(inputs)
        except GQCUsageError:
            counters["num_batches"] -= 1  # the micro-step did not happen
            counters["num_draws"] -= 1
            raise
        part_sq = stats.fields.pop(_PART, None)
        self._costs.share(stats.fields["costs"], world_rank_and_size()[1])
        if self._local is not None:
            stats = self._local.predict(stats, self._noise.signal_sq())
        counters["mean_grad_norm"] = stats.mean_grad_norm
        if stats.nonfinite:
            self._drop_window()
            decision = False
        else:
            if self._local is None:
                if part_sq is not None and math.isfinite(sum(part_sq)):  # the split micro-batch's first part
                    self._noise.observe(counters["num_draws"] - 1 + part, sum(part_sq) / stats.scale**2)
                self._noise.observe(counters["num_draws"], stats.total_sq_norm)
            self._record(stats)
            decision = bool(self._decide(stats))
        if self._verify:
            self._verify_agreement(decision)
        if decision:
            if self._local is not None:  # average over the ranks, then the exact statistics
                start = time.perf_counter()
                stats = self._local.at_step(stats, lambda: self._gather(inputs, add_fields=False), self._noise,
                                            counters["num_batches"])
                self._costs.reduced(time.perf_counter() - start)
            start = time.perf_counter()
            self._take_step(stats)
            self._costs.stepped(time.perf_counter() - start)
        self._costs.returned()
        return decision

    def _gather(self, inputs: dict, add_fields: bool = True) -> MicroStepStats:
        """Local sums -> one collective -> global statistics (one host sync); ``add_fields``:
        the algorithm's own packet fields too (local mode's exact re-read at a step needs none)."""
        carry, self._carry = self._carry, None
        part_sums, self._part_sums = self._part_sums, None
        # before this read (host integers, no sync); local mode's re-read at a step follows no backward
        outside = self._gradients.outside_changes() if add_fields else (0, 0, 0)

        def fields(packet):
            if add_fields:
                packet.add_sum("costs", self._costs.packet_values())  # every rank gets the mean over ranks
                self._add_fields(packet, inputs)
            if part_sums is not None:
                packet.add_sum(_PART, part_sums)
            if carry is not None:
                packet.add_sum(_CARRIED, carry)

        stats = collect(self._gradients, self._weights, len(self._optimizer.param_groups),
                        self._counters["num_draws"], {"max_draws": self._max_draws, **self._settings()},
                        fields, self._validate_settings, lambda: self.device, self._timeout_s, outside)
        if carry is not None:
            self.carried = stats.fields.pop(_CARRIED)
        return stats

    def carry(self, values: torch.Tensor) -> None:
        """Let ``values`` (a small 1-D tensor, this rank's) ride in the next ``step()``'s
        all-reduce: afterwards :attr:`carried` holds their sums over the ranks as floats. It costs
        no extra collective and no extra host sync: gqc-train's window loss and its stop flag
        travel this way. Values on another device are moved to the gradients' device."""
        if not isinstance(values, torch.Tensor):
            raise GQCConfigError(f"carry() takes a tensor, got {type(values).__name__}")
        self._carry = values.detach().reshape(-1)

    def _validate_settings(self, settings: Dict[str, float]) -> None:
        for name, value in settings.items():
            if name != "max_draws":
                check_number(f"param group value '{name}'", value, minimum=0)

    def _record(self, stats: MicroStepStats) -> None:
        """Hook for algorithms that keep history; runs before the decision on finite data."""

    def _take_step(self, stats: MicroStepStats) -> None:
        """Window hook, then average (and unscale) the accumulated gradient, step, zero, advance
        counters."""
        counters = self._counters
        num_draws = counters["num_draws"]
        forced = num_draws >= stats.settings["max_draws"]
        window = Window(counters["num_steps"], num_draws, counters["num_batches"], self._noise.micro_batch_size,
                        self._noise.noise_scale_micro_batches(), forced)
        groups = self._optimizer.param_groups
        values = StepValues(self.window_hook, window, groups)
        self.last_window = dataclasses.replace(window, lr=groups[0].get("lr"))
        multiplier = self._rescale_factor(stats) * window_gradient_factor(self.window_gradient, num_draws)
        step_norm = stats.mean_grad_norm * abs(multiplier)
        try:
            self._gradients.apply_step(multiplier, num_draws, stats.scale, step_norm)
        finally:
            values.restore()
        self._noise.close_window(num_draws, stats.total_sq_norm, counters["num_batches"])
        counters["forced_steps"] += forced
        counters["last_num_draws"] = num_draws
        counters["last_grad_norm"] = step_norm
        counters["num_steps"] += 1
        counters["num_draws"] = 0
        self._end_window()

    def _drop_window(self) -> None:
        """Non-finite gradient somewhere: discard the window on every rank, back off the scaler."""
        counters = self._counters
        counters["nonfinite_micro_batches"] += 1
        counters["dropped_windows"] += 1
        counters["dropped_micro_batches"] += counters["num_draws"]
        counters["num_draws"] = 0
        self._gradients.discard()
        self._noise.drop_window()
        self._end_window()

    # ------------------------------------------------------------------ algorithm interface
    def _settings(self) -> Dict[str, float]:
        """This rank's controller settings the rule reads; rank 0's are used everywhere."""
        return {}

    def _add_fields(self, packet: StatsPacket, inputs: dict) -> None:
        """Add algorithm-specific fields to the micro-step packet."""

    def _decide(self, stats: MicroStepStats) -> bool:
        raise NotImplementedError

    def _rescale_factor(self, stats: MicroStepStats) -> float:
        """Multiplier applied to the gradient before averaging (GNR); 1.0 otherwise."""
        return 1.0

    def _end_window(self) -> None:
        """Hook run after a step or a dropped window (clear per-window history)."""

    def _algorithm_state(self) -> Dict[str, Any]:
        """Algorithm state that checkpoints carry (plain Python values)."""
        return {}

    def _load_algorithm_state(self, state: Dict[str, Any]) -> None:
        """Restore what ``_algorithm_state`` returned."""

    def _algorithm_statistics(self) -> Dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ rank agreement
    def _state_checksum(self) -> int:
        local = (
            sorted((k, v) for k, v in self._counters.items() if k != "mean_grad_norm"),
            self._max_draws,
            sorted(self._settings().items()),
            repr(sorted(self._algorithm_state().items())),
        )
        return zlib.crc32(repr(local).encode())

    def _verify_agreement(self, decision: bool) -> None:
        verify_agreement(self.device, (float(decision), float(self._counters["num_draws"]),
                                       self._state_checksum()), self.num_batches, self._timeout_s)
