"""Metric Hypothesis Test (MHT): step when the confidence interval of a metric (e.g. loss) is tight."""

import math
from numbers import Number
from typing import Optional, Tuple

import torch
import torch_schedule_anything as tsa

from gqc_dist.core import rules
from gqc_dist.errors import GQCConfigError, GQCTypeError
from gqc_dist.schedules import lr_and_weight_decay, synchronous
from gqc_dist.validation import check_number, check_schedule_args
from gqc_dist.core.wrapper import GQCOptimizerWrapper, MicroStepStats
from gqc_dist.algorithms.spec import AlgorithmSpec


class OptimizerWrapperMHT(GQCOptimizerWrapper):
    """Steps when the t-interval (``confidence_level``) of the window's metric samples lies within
    ``running_mean * (1 +- percent_error_threshold)``, or at max draws.

    ``step(metric)`` takes this rank's metric for the micro-batch (a float or a 0-d tensor); every
    rank's value becomes one sample of the window (gathered by the micro-step's one all-reduce),
    as torch-gqc's replicated mode does.
    """

    ALGORITHM = "mht"
    SCHEDULABLE = {"confidence_level": 1.0, "percent_error_threshold": 1.0}

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_batch_draws: int = 64,
        distributed_mode: Optional[str] = None,
        update_beta: float = 0.01,
        **kwargs,
    ):
        check_number("update_beta", update_beta, minimum=0, allow_equal=False)
        if update_beta > 1:
            raise GQCConfigError(f"update_beta must be in (0, 1], got {update_beta!r}")
        super().__init__(optimizer, max_batch_draws, distributed_mode, **kwargs)
        self._update_beta = update_beta
        self._history = []
        self._running_mean = None

    @property
    def running_mean(self) -> Optional[float]:
        """Exponential running mean of the metric (``None`` before the first sample)."""
        return self._running_mean

    @property
    def update_beta(self) -> float:
        return self._update_beta

    def step(self, metric=None, closure=None) -> bool:
        """Account one micro-batch with its metric (after ``backward``; with ``closure``, the loss
        it returns unless ``metric`` is given); True when stepped."""
        loss = self._run_closure(closure)
        return self.after_backward(loss if metric is None else metric).stepped

    def _inputs(self, metric) -> dict:
        if metric is None:
            # a missing argument: a TypeError, as torch-gqc's step() without its metric raises
            raise GQCTypeError("MHT needs the micro-batch's metric: call step(loss) (a float or a 0-d tensor; "
                               "step(closure=...) uses the loss it returns) or after_backward(loss)")
        if isinstance(metric, torch.Tensor):
            if metric.numel() != 1 or metric.is_complex() or metric.dtype == torch.bool:
                raise GQCConfigError(f"metric must be a real scalar, got a {metric.dtype} tensor of shape "
                                     f"{tuple(metric.shape)}")
            return {"metric": metric.detach().reshape(1)}  # read with the packet: no host sync of its own
        if isinstance(metric, bool) or not isinstance(metric, Number):
            raise GQCConfigError(f"metric must be a number, got {type(metric).__name__}")
        return {"metric": [float(metric)]}

    def _settings(self):
        confidence = self._group_values("confidence_level")
        error = self._group_values("percent_error_threshold")
        return {
            "confidence_level": sum(confidence) / len(confidence),
            "percent_error_threshold": sum(error) / len(error),
            "update_beta": self._update_beta,
        }

    def _add_fields(self, packet, inputs):
        packet.add_per_rank("metric", inputs["metric"])

    def _record(self, stats: MicroStepStats):
        metrics = [row[0] for row in stats.fields["metric"]]
        self._history += metrics
        self._running_mean = rules.mht_running_mean(
            self._running_mean, metrics, stats.settings["update_beta"]
        )

    def _decide(self, stats: MicroStepStats) -> bool:
        return rules.mht_should_step(
            [self._running_mean] + self._history,
            self.num_draws,
            stats.settings["max_draws"],
            stats.settings["confidence_level"],
            stats.settings["percent_error_threshold"],
        )

    def _end_window(self):
        self._history = []

    def _validate_settings(self, settings):
        super()._validate_settings(settings)
        if not 0 <= settings["confidence_level"] <= 1:  # 0 during warmup: steps at once
            raise GQCConfigError(
                f"param group value 'confidence_level' must be in [0, 1], got {settings['confidence_level']!r}"
            )

    def _algorithm_state(self):
        return {"history": list(self._history), "running_mean": self._running_mean}

    def _load_algorithm_state(self, state):
        self._history = list(state["history"])
        self._running_mean = state["running_mean"]

    def _algorithm_state_from_torch_gqc(self, values):
        return {"history": list(values.get("history", [])), "running_mean": values.get("running_mean")}

    def _algorithm_statistics(self):
        stats = {"update_beta": self._update_beta}
        if self._running_mean is not None and math.isfinite(self._running_mean):
            stats["running_mean"] = self._running_mean
        return stats

    def _verbose_only_statistics(self):
        return ["update_beta"]


def make_mht_with_warmup_schedule(
    optimizer: torch.optim.Optimizer,
    confidence_level: float,
    percent_error_threshold: float,
    num_training_steps: int,
    num_warmup_steps: int,
    max_batch_draws: int = 64,
    distributed_mode: Optional[str] = None,
    **wrapper_kwargs,
) -> Tuple[OptimizerWrapperMHT, tsa.SynchronousSchedule]:
    """MHT with LR warmup then cosine anneal; confidence and error warm up to constants."""
    check_schedule_args(num_training_steps, num_warmup_steps, confidence_level=confidence_level,
                        percent_error_threshold=percent_error_threshold)
    if not 0 < confidence_level <= 1:
        raise GQCConfigError(f"confidence_level must be in (0, 1], got {confidence_level!r}")
    wrapper = OptimizerWrapperMHT(optimizer, max_batch_draws, distributed_mode, **wrapper_kwargs)
    schedules = lr_and_weight_decay(wrapper, num_warmup_steps, num_training_steps, conventional_lr=True)
    schedules += _warmups(wrapper, {"confidence_level": confidence_level,
                                    "percent_error_threshold": percent_error_threshold},
                          num_warmup_steps, num_training_steps)
    return wrapper, synchronous(schedules)


def _warmups(wrapper, values, num_warmup_steps, num_training_steps):
    """Each param-group value warms up from 0 to ``values[key]`` and stays there."""
    return [tsa.cosine_annealing_with_warmup(wrapper, value, value, num_warmup_steps, num_training_steps,
                                             schedule_target=key) for key, value in values.items()]


SPEC = AlgorithmSpec(
    name="mht",
    build=lambda optimizer, section, context, **kwargs: OptimizerWrapperMHT(
        optimizer, section["max_draws"], update_beta=section["update_beta"], **kwargs),
    options={"max_draws": ("int+", 64), "update_beta": ("prob", 0.01)},
    values={"confidence_level": ("prob", "confidence_level"),
            "percent_error_threshold": ("num0", "percent_error_threshold")},
    schedule={},  # only warms the values up over num_warmup_steps
    make_schedules=lambda wrapper, s: _warmups(wrapper, {"confidence_level": 1.0, "percent_error_threshold": 1.0},
                                              s["num_warmup_steps"], s["num_training_steps"]),
    all_values=True,
    needs_loss=True,
)
