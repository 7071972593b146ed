"""What a GQC wrapper reports: its counters, ``statistics()`` and ``vital_statistics()`` (a mixin of
:class:`gqc_dist.core.wrapper.GQCOptimizerWrapper`, reading its counters, noise estimate, costs
and param groups)."""

from typing import Any, Dict, List, Optional

from gqc_dist.errors import GQCConfigError


class WrapperReporting:
    """The counters (read-only properties) and ``statistics()`` / ``vital_statistics()``: plain
    numbers, identical on every rank."""

    @property
    def local_accumulation(self) -> bool:
        """Whether gradients accumulate rank-locally (decisions from a predicted norm)."""
        return self._local is not None

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

    # ------------------------------------------------------------------ the micro-step
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
        out.update(self._noise.statistics())
        out.update(self._costs.statistics())
        if self._local is not None:
            out.update(self._local.statistics())
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
