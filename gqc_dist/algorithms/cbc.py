"""Critical Batch Controller (CBC): accumulate until the batch reaches ``kappa`` times the
measured gradient noise scale.

The gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` is the batch size above which more
samples per step stop paying for themselves (McCandlish et al. 2018); it grows as training
proceeds. CBC reads it from the windows' own exact norms (``gqc_dist.noise_scale``: no extra
communication) and steps once ``n >= ceil(kappa * B_simple)`` micro-batches, within
``[min_draws, max_draws]``. ``kappa`` is a plain ratio (1: the paper's efficient point), not a
gradient norm: nothing to tune per model.

Keeping the estimate fresh: before the first estimate every window takes 2 micro-batches, and
while the target is 1 micro-batch every ``probe_interval``-th window takes 2 (a window of one
micro-batch says nothing about the noise).
"""

import math
from typing import Optional, Tuple

import torch
import torch_schedule_anything as tsa

from ..errors import GQCConfigError
from ..schedules import synchronous
from ..validation import check_number, check_schedule_args
from ..wrapper import GQCOptimizerWrapper, MicroStepStats
from .spec import REQUIRED, AlgorithmSpec


def target_draws(noise_scale: Optional[float], kappa: float, windows: int, min_draws: int,
                 max_draws: int, probe_interval: int) -> int:
    """Micro-batches the window should take: ``ceil(kappa * noise_scale)`` (``noise_scale`` in
    micro-batches; ``None`` before an estimate) clamped to ``[min_draws, max_draws]``, at least 2
    without an estimate and on every ``probe_interval``-th window (``windows``: steps so far)."""
    if noise_scale is None:
        wanted = 2
    elif math.isinf(noise_scale):
        wanted = max_draws
    else:
        wanted = math.ceil(kappa * noise_scale - 1e-9)
    wanted = min(max(wanted, min_draws), max_draws)
    if wanted < 2 and windows % probe_interval == 0:
        wanted = 2
    return min(wanted, max_draws)


class OptimizerWrapperCBC(GQCOptimizerWrapper):
    """Steps when the window holds ``ceil(kappa * B_simple)`` micro-batches (see the module).

    Args:
        optimizer: the optimizer to drive; its param groups gain ``critical_batch_fraction``
            (``kappa``, mean over groups, rank 0's value; schedulable).
        max_batch_draws: most micro-batches per step (>= 1).
        distributed_mode: ``None`` (detect), ``"replicated"`` or ``"sharded"``.
        min_draws: fewest micro-batches per step (1 <= min_draws <= max_batch_draws).
        probe_interval: while the target is 1, every ``probe_interval``-th window takes 2.
        **kwargs: see :class:`gqc_dist.wrapper.GQCOptimizerWrapper` (``micro_batch_size``,
            ``noise_beta``, ``grad_scaler``, ``verify``, ``gradients``).
    """

    ALGORITHM = "cbc"
    SCHEDULABLE = {"critical_batch_fraction": 1.0}

    def __init__(self, optimizer: torch.optim.Optimizer, max_batch_draws: int = 64,
                 distributed_mode: Optional[str] = None, *, min_draws: int = 1, probe_interval: int = 4,
                 **kwargs):
        check_number("min_draws", min_draws, minimum=1, integer=True)
        check_number("probe_interval", probe_interval, minimum=1, integer=True)
        super().__init__(optimizer, max_batch_draws, distributed_mode, **kwargs)
        if min_draws > self.max_draws:
            raise GQCConfigError(f"min_draws ({min_draws}) must not exceed max_draws ({self.max_draws})")
        self._min_draws = min_draws
        self._probe_interval = probe_interval

    def _settings(self):
        kappas = self._group_values("critical_batch_fraction")
        return {"critical_batch_fraction": sum(kappas) / len(kappas)}

    def target_draws(self, kappa: Optional[float] = None, max_draws: Optional[int] = None) -> int:
        """Micro-batches the current window will take (every rank computes the same); ``kappa``
        and ``max_draws`` default to this rank's settings (decisions use rank 0's)."""
        kappa = self._settings()["critical_batch_fraction"] if kappa is None else kappa
        return target_draws(self._noise.noise_scale_micro_batches(), kappa, self.num_steps,
                            self._min_draws, max_draws or self.max_draws, self._probe_interval)

    def _decide(self, stats: MicroStepStats) -> bool:
        return self.num_draws >= self.target_draws(stats.settings["critical_batch_fraction"],
                                                   int(stats.settings["max_draws"]))

    def _algorithm_statistics(self):
        return {"target_draws": self.target_draws(), "min_draws": self._min_draws}

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


def _build(optimizer, section, context, **kwargs):
    return OptimizerWrapperCBC(optimizer, section["max_draws"], min_draws=section["min_draws"],
                               probe_interval=section["probe_interval"], **kwargs)


SPEC = AlgorithmSpec(
    name="cbc",
    build=_build,
    options={"max_draws": ("int+", 64), "min_draws": ("int+", 1), "probe_interval": ("int+", 4)},
    values={"kappa": ("num+", "critical_batch_fraction")},
    schedule={"initial_kappa": ("num+", REQUIRED), "final_kappa": ("num+", REQUIRED)},
    make_schedules=lambda wrapper, s: [_kappa_schedule(wrapper, s["initial_kappa"], s["final_kappa"],
                                                       s["num_warmup_steps"], s["num_training_steps"])],
    logged_value="critical_batch_fraction",
)
