"""Gradient Noise Scale (GNS): step when the micro-batch norm spread says the batch is big enough."""

import math
from typing import Optional, Tuple

import torch
import torch_schedule_anything as tsa

from gqc_dist.core import rules
from gqc_dist.errors import GQCUsageError
from gqc_dist.schedules import synchronous
from gqc_dist.validation import check_number, check_schedule_args
from gqc_dist.core.wrapper import GQCOptimizerWrapper, MicroStepStats
from gqc_dist.algorithms.spec import REQUIRED, AlgorithmSpec


class OptimizerWrapperGNS(GQCOptimizerWrapper):
    """Steps when ``var(|g_i|) / mean(|g_i|^2) <= n * noise_tolerance`` or at max draws.

    ``|g_i|`` are per-micro-batch gradient norms, measured by parameter hooks as each backward
    produces the micro-batch gradient (before it is added to the accumulator). Under DDP each
    rank's local micro-batch is one sample, so every micro-step adds ``world_size`` samples to the
    window's history (torch-gqc's replicated semantics), all delivered by the one all-reduce.
    Layouts that assign gradients without autograd hooks (FSDP2 sharded parameters) are refused.
    """

    ALGORITHM = "gns"
    SCHEDULABLE = {"noise_tolerance": 1.0}

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_batch_draws: int = 64,
        distributed_mode: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(optimizer, max_batch_draws, distributed_mode, **kwargs)
        self._history = []
        self._gns = None
        self._micro_batch_sq = {}  # param -> squared norm of its latest micro-batch gradient
        self._hooks = [
            param.register_hook(self._make_hook(param))
            for group in optimizer.param_groups
            for param in group["params"]
            if param.requires_grad
        ]

    def _make_hook(self, param):
        def hook(grad):
            norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
            self._micro_batch_sq[param] = norm * norm
            return grad

        return hook

    def _settings(self):
        return {"noise_tolerance": min(self._group_values("noise_tolerance"))}

    def _add_fields(self, packet, inputs):
        if not self._micro_batch_sq:
            raise GQCUsageError(
                "GNS measures each micro-batch gradient with parameter hooks, and none fired since "
                "the last step(): call backward() before step(). Layouts that set gradients "
                "without autograd (FSDP2 sharded parameters, DeepSpeed ZeRO) are not supported by "
                "GNS; use GNTS there."
            )
        squares = torch.stack([sq.to(packet.device) for sq in self._micro_batch_sq.values()])
        self._micro_batch_sq = {}
        packet.add_per_rank("micro_batch_sq", squares.sum())

    def _record(self, stats: MicroStepStats):
        scale_sq = stats.scale * stats.scale
        self._history += [math.sqrt(row[0] / scale_sq) for row in stats.fields["micro_batch_sq"]]
        self._gns = rules.gns_estimate(self._history)

    def _decide(self, stats: MicroStepStats) -> bool:
        return rules.gns_should_step(
            self._gns, stats.settings["noise_tolerance"], self.num_draws, stats.settings["max_draws"]
        )

    def _end_window(self):
        self._history = []

    def _algorithm_state(self):
        return {"history": list(self._history), "gns": self._gns}

    def _load_algorithm_state(self, state):
        self._history = list(state["history"])
        self._gns = state["gns"]

    def _algorithm_state_from_torch_gqc(self, values):
        return {"history": list(values.get("history", [])), "gns": None}

    def _algorithm_statistics(self):
        return {} if self._gns is None or math.isnan(self._gns) else {"gns": self._gns}


def _tolerance_schedule(wrapper, initial, final, num_warmup_steps, num_training_steps, warmup_multiplier):
    return tsa.cosine_annealing_with_inverse_warmup(
        wrapper, warmup_to_value=initial, anneal_to_value=final, num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps, warmup_multiplier=warmup_multiplier,
        schedule_target="noise_tolerance")


def _make_gns(optimizer, tolerance_schedule, num_training_steps, num_warmup_steps,
              max_batch_draws, distributed_mode, wrapper_kwargs):
    wrapper = OptimizerWrapperGNS(optimizer, max_batch_draws, distributed_mode, **wrapper_kwargs)
    lr = tsa.cosine_annealing_with_warmup(
        wrapper, 1.0, 0.0, num_warmup_steps, num_training_steps, schedule_target="lr")
    return wrapper, synchronous([lr, tolerance_schedule(wrapper)])


def make_gns_with_cosine_annealing_schedule(
    optimizer: torch.optim.Optimizer,
    initial_tolerance: float,
    final_tolerance: float,
    num_training_steps: int,
    num_warmup_steps: int,
    warmup_multiplier: float = 10,
    max_batch_draws: int = 64,
    distributed_mode: Optional[str] = None,
    **wrapper_kwargs,
) -> Tuple[OptimizerWrapperGNS, tsa.SynchronousSchedule]:
    """GNS with LR warmup then cosine anneal, tolerance inverse-warmup then cosine anneal."""
    check_schedule_args(num_training_steps, num_warmup_steps, warmup_multiplier,
                        initial_tolerance=initial_tolerance, final_tolerance=final_tolerance)
    return _make_gns(
        optimizer,
        lambda w: _tolerance_schedule(w, initial_tolerance, final_tolerance, num_warmup_steps,
                                      num_training_steps, warmup_multiplier),
        num_training_steps, num_warmup_steps, max_batch_draws, distributed_mode, wrapper_kwargs)


def make_gns_default(
    optimizer: torch.optim.Optimizer,
    tolerance: float,
    num_training_steps: int,
    num_warmup_steps: int,
    max_batch_draws: int = 64,
    distributed_mode: Optional[str] = None,
    **wrapper_kwargs,
) -> Tuple[OptimizerWrapperGNS, tsa.SynchronousSchedule]:
    """GNS with LR warmup then cosine anneal, tolerance inverse-warmup to a constant."""
    check_schedule_args(num_training_steps, num_warmup_steps, tolerance=tolerance)
    check_number("tolerance", tolerance, minimum=0)
    return _make_gns(
        optimizer,
        lambda w: tsa.constant_with_inverse_warmup(
            w, warmup_to_value=tolerance, num_warmup_steps=num_warmup_steps,
            schedule_target="noise_tolerance"),
        num_training_steps, num_warmup_steps, max_batch_draws, distributed_mode, wrapper_kwargs)


SPEC = AlgorithmSpec(
    name="gns",
    build=lambda optimizer, section, context, **kwargs: OptimizerWrapperGNS(
        optimizer, section["max_draws"], **kwargs),
    options={"max_draws": ("int+", 64)},
    values={"tolerance": ("num0", "noise_tolerance")},
    schedule={"initial_tolerance": ("num0", REQUIRED), "final_tolerance": ("num0", REQUIRED),
              "warmup_multiplier": ("num+", 10.0)},
    make_schedules=lambda wrapper, s: [_tolerance_schedule(
        wrapper, s["initial_tolerance"], s["final_tolerance"], s["num_warmup_steps"],
        s["num_training_steps"], s["warmup_multiplier"])],
    logged_value="noise_tolerance",
    engines=frozenset({"single", "ddp"}),
    unsupported="it measures each micro-batch's gradient with autograd hooks, which FSDP2 sharded "
                "parameters and DeepSpeed ZeRO do not run; use gnts",
)
