"""The optimizer wrapper every GQC algorithm shares.

Per micro-step (one ``step()`` call after one ``backward``) data flows one way:

    gradients -> rank-local fused sums (grad_norms) -> one all-reduce (packet) -> decision (rules)
    -> optimizer step or keep accumulating

Exactly one host synchronisation and at most one collective per micro-step (two with
``verify=True``). The decision is a pure function of values the collective delivered
identically to every rank (global squared norms, rank 0's settings) and of counters that
advance identically, so ranks cannot disagree.

Policies this wrapper implements (documented in README.md):

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

import copy
import math
import zlib
from typing import Any, Dict, List, Optional, Tuple

import torch

from .errors import (
    CheckpointError,
    GQCConfigError,
    GQCTypeError,
    GQCUsageError,
    PartialGradientError,
    RankDivergenceError,
)
from .engines import GradientAdapter, TorchOptimizerGradients
from .grad_norms import WeightCache, local_group_sums
from .packet import StatsPacket, world_rank_and_size
from .reduction import POLICY_KEY, group_policy
from .validation import check_number

CHECKPOINT_FORMAT = "gqc_dist.wrapper/1"

_COUNTERS = (
    "num_batches",
    "num_steps",
    "num_draws",
    "last_num_draws",
    "last_grad_norm",
    "mean_grad_norm",
    "nonfinite_micro_batches",
    "dropped_windows",
    "dropped_micro_batches",
)


class MicroStepStats:
    """Global statistics of one micro-step, identical on every rank.

    Attributes:
        group_sq_norms: exact squared L2 norm of each param group's accumulated gradient
            ``G_n`` (sum over the ``n`` micro-batches, unscaled), counted once per element.
        total_norm: ``sqrt(sum(group_sq_norms))``, the global norm of ``G_n``.
        mean_grad_norm: ``total_norm / n`` (GNTS's ``||G_n|| / n``).
        nonfinite: True when a gradient piece on some rank holds inf or NaN.
        settings: rank 0's controller settings (``max_draws``, thresholds, ...).
        scale: the AMP loss scale the gradients still carry (1.0 without a GradScaler).
        fields: the algorithm's own reduced fields (per-rank fields: one list per rank).
        pieces: this rank's local gradient tensors (for in-place scaling, not for the decision).
    """

    def __init__(self, group_sq_norms, num_draws, nonfinite, settings, scale, fields, pieces):
        self.group_sq_norms = group_sq_norms
        self.total_norm = math.sqrt(sum(group_sq_norms))
        self.mean_grad_norm = self.total_norm / num_draws
        self.nonfinite = nonfinite
        self.settings = settings
        self.scale = scale
        self.fields = fields
        self.pieces = pieces


class GQCOptimizerWrapper:
    """Base of the GQC optimizer wrappers (subclasses implement one decision rule each).

    Args:
        optimizer: the ``torch.optim.Optimizer`` to drive; its ``param_groups`` gain the
            algorithm's schedulable keys (e.g. ``gradient_norm_threshold``) so that
            torch-schedule-anything schedules can drive them.
        max_draws: micro-batches after which a step is forced (>= 1).
        distributed_mode: torch-gqc's ``"replicated"`` / ``"sharded"`` (applied to param groups
            without an explicit ``"gqc_reduction"`` policy), or ``None`` to detect the layout.
        grad_scaler: an enabled ``torch.amp.GradScaler`` when training with AMP fp16.
        verify: all-gather ``(decision, draws, state checksum)`` every micro-step and raise
            :class:`RankDivergenceError` naming the ranks that disagree (one extra collective).
        gradients: the engine adapter that holds the gradients (default: ``param.grad`` of
            ``optimizer``, see :class:`gqc_dist.engines.TorchOptimizerGradients`).

    The wrapper duck-types as the optimizer (``param_groups``, ``state``, ``add_param_group`` ...)
    but owns ``zero_grad``: calling it raises :class:`GQCUsageError`.
    """

    ALGORITHM = "base"
    #: schedulable param-group keys the algorithm adds, with their initial values
    SCHEDULABLE: Dict[str, float] = {}

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_draws: int = 64,
        distributed_mode: Optional[str] = None,
        *,
        grad_scaler: Optional[torch.amp.GradScaler] = None,
        verify: bool = False,
        gradients: Optional[GradientAdapter] = None,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise GQCTypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, GQCOptimizerWrapper):  # pragma: no cover - not an Optimizer
            raise GQCTypeError("optimizer is already a GQC wrapper")
        check_number("max_draws", max_draws, minimum=1, integer=True)
        if distributed_mode not in (None, "replicated", "sharded"):
            raise GQCConfigError(
                "distributed_mode must be None, 'replicated' or 'sharded', "
                f"got {distributed_mode!r}"
            )
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise GQCTypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
            )
        if not isinstance(verify, bool):
            raise GQCTypeError(f"verify must be a bool, got {type(verify).__name__}")
        for group in optimizer.param_groups:
            group_policy(group, distributed_mode)  # validates explicit policies up front
        if gradients is not None and not isinstance(gradients, GradientAdapter):
            raise GQCTypeError(f"gradients must be a GradientAdapter, got {type(gradients).__name__}")
        self._optimizer = optimizer
        self._max_draws = max_draws
        self._distributed_mode = distributed_mode
        self._verify = verify
        self._gradients = gradients or TorchOptimizerGradients(optimizer, distributed_mode, grad_scaler)
        self._weights = WeightCache()
        self._counters: Dict[str, Any] = {name: 0 for name in _COUNTERS}
        for name in ("last_num_draws", "last_grad_norm", "mean_grad_norm"):
            self._counters[name] = None
        self._extend_param_groups(optimizer.param_groups)

    # ------------------------------------------------------------------ optimizer duck-typing
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._optimizer

    @property
    def param_groups(self) -> List[dict]:
        """The wrapped optimizer's param groups (schedules write thresholds here)."""
        return self._optimizer.param_groups

    @property
    def state(self):
        return self._optimizer.state

    @property
    def defaults(self):
        return self._optimizer.defaults

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group to the wrapped optimizer, with the algorithm's schedulable keys."""
        group_policy(param_group, self._distributed_mode)
        self._optimizer.add_param_group(param_group)
        self._extend_param_groups(self._optimizer.param_groups[-1:])
        if isinstance(self._gradients, TorchOptimizerGradients):
            self._gradients.params_changed()

    def __getattr__(self, name: str):
        # Only reached for attributes the wrapper lacks: forward them to the optimizer.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._optimizer, name)

    def zero_grad(self, *args, **kwargs) -> None:
        """Refused: the wrapper zeroes gradients itself after each optimizer step."""
        raise GQCUsageError(
            "zero_grad() must not be called on a GQC wrapper: it accumulates gradients across "
            "micro-batches and zeroes them itself after each optimizer step. Remove the "
            "zero_grad() call from the training loop."
        )

    def _extend_param_groups(self, groups) -> None:
        for name, initial in self.SCHEDULABLE.items():
            for index, group in enumerate(groups):
                if name in group:
                    check_number(f"param_groups[{index}]['{name}']", group[name], minimum=0)
                else:
                    group[name] = initial

    # ------------------------------------------------------------------ counters
    @property
    def num_batches(self) -> int:
        """Micro-batches received since creation (``step()`` calls)."""
        return self._counters["num_batches"]

    @property
    def num_steps(self) -> int:
        """Optimizer steps taken."""
        return self._counters["num_steps"]

    @property
    def num_draws(self) -> int:
        """Micro-batches accumulated in the current window."""
        return self._counters["num_draws"]

    @property
    def max_draws(self) -> int:
        """Micro-batches after which a step is forced."""
        return self._max_draws

    @property
    def last_num_draws(self) -> Optional[int]:
        """Micro-batches in the most recent optimizer step; ``None`` before the first."""
        return self._counters["last_num_draws"]

    @property
    def last_grad_norm(self) -> Optional[float]:
        """Global L2 norm of the gradient the optimizer last stepped with (after averaging)."""
        return self._counters["last_grad_norm"]

    @property
    def distributed_mode(self) -> Optional[str]:
        return self._distributed_mode

    @property
    def device(self) -> torch.device:
        """Device of the first parameter."""
        return self._optimizer.param_groups[0]["params"][0].device

    @property
    def valid_schedule_targets(self) -> List[str]:
        """Numeric param-group keys present in every group: what schedules may target."""
        return [name for name, _ in self._scalar_group_values()]

    # ------------------------------------------------------------------ the micro-step
    def step(self) -> bool:  # subclasses document their own signature
        """Account one micro-batch and step the optimizer when the rule says so."""
        return self._micro_step()

    def _micro_step(self, **inputs) -> bool:
        counters = self._counters
        counters["num_batches"] += 1
        counters["num_draws"] += 1
        stats = self._gather(inputs)
        counters["mean_grad_norm"] = stats.mean_grad_norm
        if stats.nonfinite:
            self._drop_window()
            decision = False
        else:
            self._record(stats)
            decision = bool(self._decide(stats))
        if self._verify:
            self._verify_agreement(decision)
        if decision:
            self._take_step(stats)
        return decision

    def _gather(self, inputs: dict) -> MicroStepStats:
        """Local sums -> one collective -> global statistics (one host sync)."""
        distributed = world_rank_and_size()[1] > 1
        pieces = self._gradients.local_pieces()
        device = pieces[0][1].tensor.device if pieces else self.device  # a rank may hold none
        weighted, fingerprint = local_group_sums(pieces, len(self._optimizer.param_groups), device, self._weights)

        settings = {"max_draws": self._max_draws, **self._settings()}
        packet = StatsPacket(device)
        packet.add_sum("group_sq", weighted)
        packet.add_root("settings", list(settings.values()))
        loss_scale = self._gradients.loss_scale()
        if loss_scale is not None:
            packet.add_root("scale", loss_scale if isinstance(loss_scale, torch.Tensor) else [loss_scale])
        if distributed:
            packet.add_per_rank("fingerprint", fingerprint)
        self._add_fields(packet, inputs)
        reduced = packet.reduce()

        scale = reduced["scale"][0] if loss_scale is not None else 1.0
        rank0_settings = dict(zip(settings, reduced["settings"]))
        # an inf or NaN in any rank's piece reaches its group's reduced sum (grad_norms)
        nonfinite = not all(math.isfinite(v) for v in reduced["group_sq"])
        if distributed and not nonfinite:
            self._check_replicated(reduced["fingerprint"])
        self._validate_settings(rank0_settings)
        fields = {name: reduced[name] for name in reduced if name not in _BASE_FIELDS}
        return MicroStepStats(
            [v / (scale * scale) for v in reduced["group_sq"]],
            self._counters["num_draws"],
            nonfinite,
            rank0_settings,
            scale,
            fields,
            [piece.tensor for _, piece in pieces],
        )

    @staticmethod
    def _check_replicated(fingerprints: List[List[float]]) -> None:
        values = [f[0] for f in fingerprints]
        bad = [rank for rank, value in enumerate(values) if value != values[0]]
        if bad:
            raise PartialGradientError(
                "gradients treated as replicated differ across ranks (ranks "
                f"{bad} disagree with rank 0: squared norms {[values[0]] + [values[r] for r in bad]}). "
                "They are rank-local partial sums, e.g. DDP under no_sync(), or sharded/expert "
                "parameters without a policy. Synchronise gradients every micro-step (no "
                "no_sync()), or set the param-group key 'gqc_reduction' to "
                "gqc_dist.Sharded(group) / gqc_dist.Replicated(group) for such parameters."
            )

    def _validate_settings(self, settings: Dict[str, float]) -> None:
        for name, value in settings.items():
            if name != "max_draws":
                check_number(f"param group value '{name}'", value, minimum=0)

    def _record(self, stats: MicroStepStats) -> None:
        """Hook for algorithms that keep history; runs before the decision on finite data."""

    def _take_step(self, stats: MicroStepStats) -> None:
        """Average (and unscale) the accumulated gradient, step, zero, advance counters."""
        num_draws = self._counters["num_draws"]
        multiplier = self._rescale_factor(stats)
        step_norm = stats.mean_grad_norm * abs(multiplier)
        self._gradients.apply_step(stats.pieces, multiplier, num_draws, stats.scale, step_norm)
        counters = self._counters
        counters["last_num_draws"] = num_draws
        counters["last_grad_norm"] = step_norm
        counters["num_steps"] += 1
        counters["num_draws"] = 0
        self._weights.release()
        self._end_window()

    def _drop_window(self) -> None:
        """Non-finite gradient somewhere: discard the window on every rank, back off the scaler."""
        counters = self._counters
        counters["nonfinite_micro_batches"] += 1
        counters["dropped_windows"] += 1
        counters["dropped_micro_batches"] += counters["num_draws"]
        counters["num_draws"] = 0
        self._gradients.discard()
        self._weights.release()
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

    def _group_values(self, name: str) -> List[float]:
        return [group[name] for group in self._optimizer.param_groups]

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
        packet = StatsPacket(self.device)
        packet.add_per_rank(
            "verify", [float(decision), float(self._counters["num_draws"]), self._state_checksum()]
        )
        rows = packet.reduce()["verify"]
        bad = [rank for rank, row in enumerate(rows) if row != rows[0]]
        if bad:
            raise RankDivergenceError(
                f"ranks {bad} disagree with rank 0 at micro-batch {self.num_batches}: "
                f"(decision, num_draws, state checksum) rank 0 {tuple(rows[0])}, "
                + ", ".join(f"rank {r} {tuple(rows[r])}" for r in bad)
                + ". Their settings or counters diverged (e.g. a different threshold or "
                "max_draws on one rank).",
                ranks=bad,
            )

    # ------------------------------------------------------------------ reporting
    def _scalar_group_values(self) -> List[Tuple[str, List[float]]]:
        groups = self._optimizer.param_groups
        out = []
        for name, value in groups[0].items():
            if name == "params" or isinstance(value, bool):
                continue
            values = [group.get(name) for group in groups]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                out.append((name, values))
        return out

    def statistics(self, behavior: str = "verbose", aggregate_behavior: str = "mean") -> Dict[str, Any]:
        """Counters, the last decision's norms and the schedulable values, as plain numbers.

        Always has ``num_batches``, ``num_steps``, ``num_draws``, ``last_num_draws`` (after the
        first step) and ``mean_grad_norm``: the global L2 norm of the accumulated gradient divided
        by the draws, as used by the last decision (unscaled under AMP). Param-group values that
        differ across groups are aggregated with ``aggregate_behavior`` and get a ``*`` suffix.
        ``behavior="vital"`` is the short form of :meth:`vital_statistics`.
        """
        if behavior not in ("verbose", "vital"):
            raise GQCConfigError(f"behavior must be 'verbose' or 'vital', got {behavior!r}")
        aggregate = {"mean": lambda v: sum(v) / len(v), "max": max, "min": min}.get(aggregate_behavior)
        if aggregate is None:
            raise GQCConfigError(
                f"aggregate_behavior must be 'mean', 'max' or 'min', got {aggregate_behavior!r}"
            )
        if behavior == "vital":
            return self.vital_statistics(aggregate_behavior)
        out = {name: value for name, value in self._counters.items() if value is not None}
        out["max_draws"] = self._max_draws
        out.update(self._algorithm_statistics())
        for name, values in self._scalar_group_values():
            if all(v == values[0] for v in values):
                out[name] = values[0]
            else:
                out[name + "*"] = aggregate(values)
        return out

    def vital_statistics(self, aggregate_behavior: str = "mean") -> Dict[str, Any]:
        """The monitoring subset (e.g. a tqdm postfix): counters, the last decision's norms, the
        algorithm's vital values and the param-group values (lr, thresholds, ...); a superset of
        torch-gqc's vital statistics."""
        full = self.statistics("verbose", aggregate_behavior)
        hidden = {"nonfinite_micro_batches", "dropped_windows", "dropped_micro_batches", "max_draws"}
        hidden.update(self._verbose_only_statistics())
        return {key: value for key, value in full.items() if key not in hidden}

    def _verbose_only_statistics(self) -> List[str]:
        """Keys of ``statistics()`` that ``vital_statistics()`` leaves out."""
        return []

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """A deep copy of the wrapper, optimizer and accumulated-gradient state.

        Mid-window (``num_draws > 0``) it carries this rank's accumulated gradients, so that
        ``load_state_dict`` resumes exactly where the run stopped. Each rank saves its own
        (under FSDP2, its own shards). Process-group policies are not saved.
        """
        optimizer_state = self._optimizer.state_dict()
        optimizer_state["param_groups"] = [
            {k: v for k, v in group.items() if k != POLICY_KEY}
            for group in optimizer_state["param_groups"]
        ]
        grads = None
        if self._counters["num_draws"] > 0:
            grads = [
                [None if p.grad is None else p.grad.detach().clone() for p in group["params"]]
                for group in self._optimizer.param_groups
            ]
        return {
            "format": CHECKPOINT_FORMAT,
            "algorithm": self.ALGORITHM,
            "max_draws": self._max_draws,
            "counters": dict(self._counters),
            "algorithm_state": copy.deepcopy(self._algorithm_state()),
            "optimizer": copy.deepcopy(optimizer_state),
            "accumulated_grads": grads,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; validates everything before changing anything.

        Also accepts torch-gqc's ``{"wrapper_states", "optimizer_states"}`` saved at a step
        boundary. Raises :class:`CheckpointError` naming what is wrong otherwise.
        """
        state_dict = self._upgrade_checkpoint(state_dict)
        self._validate_checkpoint(state_dict)
        policies = [group.get(POLICY_KEY) for group in self._optimizer.param_groups]
        try:
            self._optimizer.load_state_dict(copy.deepcopy(state_dict["optimizer"]))
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"optimizer state does not fit this optimizer: {error}") from error
        for group, policy in zip(self._optimizer.param_groups, policies):
            if policy is not None:
                group[POLICY_KEY] = policy
        grads = state_dict["accumulated_grads"]
        for g_index, group in enumerate(self._optimizer.param_groups):
            for p_index, param in enumerate(group["params"]):
                saved = None if grads is None else grads[g_index][p_index]
                param.grad = None if saved is None else saved.detach().clone().to(param.device)
        self._counters = dict(state_dict["counters"])
        self._load_algorithm_state(copy.deepcopy(state_dict["algorithm_state"]))

    def _upgrade_checkpoint(self, state_dict):
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"state dict must be a dict, got {type(state_dict).__name__}")
        if "wrapper_states" not in state_dict:
            return state_dict
        try:  # torch-gqc 0.10 format
            values = {k: v["value"] for k, v in state_dict["wrapper_states"].items()}
            optimizer_state = state_dict["optimizer_states"]
        except (KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"torch-gqc state dict is malformed: {error!r}") from error
        if values.get("num_draws", 0):
            raise CheckpointError(
                f"torch-gqc checkpoint was saved mid-window (num_draws={values['num_draws']}) and "
                "carries no gradients; resume from one saved right after a step"
            )
        counters = {name: 0 for name in _COUNTERS}
        counters.update({k: values[k] for k in _COUNTERS if k in values})
        counters["mean_grad_norm"] = None
        return {
            "format": CHECKPOINT_FORMAT,
            "algorithm": self.ALGORITHM,
            "max_draws": self._max_draws,
            "counters": counters,
            "algorithm_state": self._algorithm_state_from_torch_gqc(values),
            "optimizer": optimizer_state,
            "accumulated_grads": None,
        }

    def _algorithm_state_from_torch_gqc(self, values: Dict[str, Any]) -> Dict[str, Any]:
        return self._algorithm_state()

    def _validate_checkpoint(self, sd: Dict[str, Any]) -> None:
        required = ("format", "algorithm", "max_draws", "counters", "algorithm_state", "optimizer",
                    "accumulated_grads")
        missing = [key for key in required if key not in sd]
        if missing:
            raise CheckpointError(f"state dict is missing keys {missing}")
        if sd["format"] != CHECKPOINT_FORMAT:
            raise CheckpointError(f"unknown state dict format {sd['format']!r}, expected {CHECKPOINT_FORMAT!r}")
        if sd["algorithm"] != self.ALGORITHM:
            raise CheckpointError(
                f"state dict was saved by algorithm {sd['algorithm']!r}, this wrapper is {self.ALGORITHM!r}"
            )
        counters = sd["counters"]
        if not isinstance(counters, dict) or set(counters) != set(_COUNTERS):
            raise CheckpointError(f"state dict 'counters' must have exactly the keys {list(_COUNTERS)}")
        for name in ("num_batches", "num_steps", "num_draws", "nonfinite_micro_batches",
                     "dropped_windows", "dropped_micro_batches"):
            value = counters[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(f"state dict counter '{name}' must be an int >= 0, got {value!r}")
        if counters["num_draws"] >= self._max_draws:
            raise CheckpointError(
                f"state dict has num_draws={counters['num_draws']} but this wrapper's max_draws is "
                f"{self._max_draws}"
            )
        grads = sd["accumulated_grads"]
        if (counters["num_draws"] > 0) != (grads is not None):
            raise CheckpointError(
                f"state dict has num_draws={counters['num_draws']} but "
                f"{'no' if grads is None else 'unexpected'} accumulated gradients"
            )
        if grads is not None:
            self._validate_saved_grads(grads)

    def _validate_saved_grads(self, grads) -> None:
        groups = self._optimizer.param_groups
        if not isinstance(grads, list) or len(grads) != len(groups):
            raise CheckpointError(
                f"accumulated_grads must hold one list per param group ({len(groups)})"
            )
        for g_index, (saved, group) in enumerate(zip(grads, groups)):
            if not isinstance(saved, list) or len(saved) != len(group["params"]):
                raise CheckpointError(
                    f"accumulated_grads[{g_index}] must hold {len(group['params'])} entries"
                )
            for p_index, (grad, param) in enumerate(zip(saved, group["params"])):
                if grad is None:
                    continue
                if not isinstance(grad, torch.Tensor) or grad.shape != param.shape or grad.dtype != param.dtype:
                    raise CheckpointError(
                        f"accumulated_grads[{g_index}][{p_index}] does not match parameter "
                        f"shape {tuple(param.shape)} / dtype {param.dtype}"
                    )


_BASE_FIELDS = frozenset({"group_sq", "settings", "scale", "fingerprint"})

