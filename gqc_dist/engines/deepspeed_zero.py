"""Adapter for a DeepSpeed engine in caller-owned accumulation mode (ZeRO stages 0-3).

With ``"managed_gradient_accumulation": false`` and ``gradient_accumulation_steps`` 1,
``engine.backward`` only accumulates a *sum* and every ``engine.step()`` is a boundary. Where the
accumulated gradient lives after each backward, stage by stage (DeepSpeed 0.19.x internals,
pinned in setup.py), is :mod:`gqc_dist.engines.deepspeed_stages`; :class:`DeepSpeedGradients`
picks one stage and owns the state machine, the step and the loss scale.

the clip coefficient in place,
then calls DeepSpeed's own ``step()`` (which unscales fp16, steps the optimizer and the lr
scheduler, advances ``global_steps`` / ``global_samples`` and zeroes the gradients).

Clipping (``gradient_clipping``) is applied here, with torch's rule ``min(1, clip / (norm +
1e-6))`` on the exact global norm of the mean gradient, and DeepSpeed's own clipping is turned
off: DeepSpeed's stage-0/1 norm averages per-rank norms and is wrong with MoE.
"""

from typing import List, Tuple

import torch

from gqc_dist.core.reduction import Piece
from gqc_dist.engines.base import GradientAdapter, GradientState, clip_coefficient
from gqc_dist.engines.deepspeed_stages import STAGES
from gqc_dist.errors import CheckpointError, GQCUsageError


class DeepSpeedGradients(GradientAdapter):
    """Accumulated gradients of a DeepSpeed engine; ``original_step`` is the engine's own step."""

    def __init__(self, engine, original_step, clip: float = 0.0):
        self.engine = engine
        self.original_step = original_step
        self.clip = clip
        self.zero = STAGES[int(engine.zero_optimization_stage())](engine)
        self.stage = self.zero.number
        self.fp16 = bool(engine.fp16_enabled())
        self._seen = None  # ZeRO-0/1's param.grad tensors at the last read in the open window

    def _grads(self):
        return [p.grad for p in self.engine.module.parameters()] if self.stage in (0, 1) else []

    def outside_changes(self):
        """ZeRO-0/1 accumulate in ``param.grad`` (in place), so a gradient that became ``None``
        or another tensor was cleared from outside (``engine.zero_grad()``); ZeRO-2/3 keep the
        window in their reduced partitions, which a ``zero_grad()`` does not touch. (A step with
        no backward is refused by ``gqc_dist.frontends.deepspeed``'s ``engine.step()`` before it gets here.)"""
        if self._seen is None:
            return 0, 0, 0
        cleared = sum(1 for grad, before in zip(self._grads(), self._seen) if before is not None and grad is not before)
        return cleared, 0, 0

    def _window_closed(self) -> None:
        super()._window_closed()
        self._seen = None

    def _check_local_support(self) -> None:
        if self.stage not in (0, 1):
            raise GQCUsageError(f"rank-local accumulation needs ZeRO stage 0 or 1, the engine runs stage {self.stage}")

    # ------------------------------------------------------------------ reading
    def local_pieces(self) -> List[Tuple[int, Piece]]:
        self._seen = self._grads()
        return self.zero.pieces(self.state)

    def _reduce_local(self) -> None:
        """DeepSpeed's own boundary reduction, run early (its unmanaged-mode boundary flag)."""
        engine = self.engine
        engine._running_engine_step = True
        try:
            engine.allreduce_gradients()
        finally:
            engine._running_engine_step = False

    def loss_scale(self):
        if not self.fp16:
            return None
        scale = self.engine._get_optimizer_loss_scale()
        if scale is None:  # FP16_UnfusedOptimizer keeps it in its loss scaler
            scale = self.engine.optimizer.loss_scaler.cur_scale
        return float(scale)

    # ------------------------------------------------------------------ writing
    def apply_step(self, multiplier: float, num_draws: int, scale: float, mean_norm: float) -> None:
        factor = multiplier / num_draws  # DeepSpeed removes the fp16 loss scale itself
        factor *= clip_coefficient(self.clip, mean_norm)
        if factor != 1.0:
            torch._foreach_mul_(self.zero.accumulators(self.state), factor)
        try:
            if self.state is GradientState.REDUCED:
                self._step_without_reduction()
            else:
                self.original_step()
        finally:
            self._window_closed()
        self.zero.after_step()

    def _step_without_reduction(self):
        """DeepSpeed's step, minus the boundary reduction ``reduce_local`` already ran."""
        engine, enabled = self.engine, self.engine.enable_backward_allreduce
        engine.enable_backward_allreduce = False
        try:
            self.original_step()
        finally:
            engine.enable_backward_allreduce = enabled

    def discard(self) -> None:
        try:
            if self.fp16:
                # DeepSpeed's own overflow path: skips the update, backs off the scale, zeroes.
                self.original_step()
                self.zero.after_step()
                return
            for tensor in self.zero.accumulators(self.state):
                tensor.zero_()
            self.engine.optimizer.zero_grad()
            self.engine._unmanaged_backward_count = 0  # dropped samples are not trained on
        finally:
            self._window_closed()

    # ------------------------------------------------------------------ checkpoints
    def save_accumulated(self):
        """This rank's accumulated partitions (ZeRO-2/3) or local sums (ZeRO-0/1), DeepSpeed's
        count of backwards since the last step (it sizes ``global_samples``) and, on ZeRO-3, the
        optimizer's micro-step position."""
        return {"stage": self.stage, "tensors": self.zero.saved_tensors(),
                "backward_count": int(self.engine._unmanaged_backward_count), "micro_step": self.zero.micro_step()}

    def check_accumulated(self, saved) -> None:
        required = {"stage", "tensors", "backward_count"}
        if not isinstance(saved, dict) or not required <= set(saved) <= required | {"micro_step"}:
            raise CheckpointError("accumulated gradient state is not a DeepSpeed adapter's")
        count, micro_step = saved["backward_count"], saved.get("micro_step")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise CheckpointError(f"accumulated gradient state has backward_count {count!r}, expected an int >= 0")
        if micro_step is not None and not (
                isinstance(micro_step, (list, tuple)) and len(micro_step) == 2
                and isinstance(micro_step[0], int) and not isinstance(micro_step[0], bool)
                and micro_step[0] >= 0 and isinstance(micro_step[1], bool)):
            raise CheckpointError(f"accumulated gradient state has micro_step {micro_step!r}, "
                                  "expected [int >= 0, bool]")
        if saved["stage"] != self.stage:
            raise CheckpointError(f"accumulated gradients were saved on ZeRO stage {saved['stage']}, "
                                  f"this engine runs stage {self.stage}")
        if not _fits(saved["tensors"], self.zero.shapes()):
            raise CheckpointError(f"accumulated gradients of ZeRO stage {self.stage} do not match this "
                                  "engine's partitions (another model or world size)")

    def restore_accumulated(self, saved) -> None:
        if saved is None:
            self.zero.clear()
        elif self.stage == 3:
            self.zero.restore_tensors(saved["tensors"], saved.get("micro_step"))
        else:
            self.zero.restore_tensors(saved["tensors"])
        self.engine._unmanaged_backward_count = 0 if saved is None else saved["backward_count"]
        self._window_closed()


def _fits(saved, expected) -> bool:
    """``saved`` has ``expected``'s structure, a tensor of the expected shape (and dtype, unless
    ``None``) or ``None`` where a tensor may be."""
    if isinstance(expected, dict):
        return (isinstance(saved, dict) and set(saved) <= set(expected)
                and all(_fits(saved[key], expected[key]) for key in saved))
    if isinstance(expected, list):
        return (saved is None or isinstance(saved, list) and len(saved) == len(expected)
                and all(_fits(a, b) for a, b in zip(saved, expected)))
    shape, dtype = expected
    return saved is None or (isinstance(saved, torch.Tensor) and tuple(saved.shape) == shape
                             and (dtype is None or saved.dtype == dtype))
