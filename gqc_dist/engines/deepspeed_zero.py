"""Adapter for a DeepSpeed engine in caller-owned accumulation mode (ZeRO stages 0-3).

With ``"managed_gradient_accumulation": false`` and ``gradient_accumulation_steps`` 1,
``engine.backward`` only accumulates a *sum* and every ``engine.step()`` is a boundary. Where the
accumulated gradient lives after each backward (DeepSpeed 0.19.x internals, pinned in setup.py):

* ZeRO-2: already reduce-scattered every backward; this rank's partition of each param group is
  ``optimizer.get_flat_partition(...)`` over ``all_grad_tensors`` (``rho`` = 1: every element
  of a dense group is held by one rank, and expert groups are partitioned over their
  expert-data-parallel group while expert-parallel ranks hold different experts).
* ZeRO-3: already reduce-scattered; this rank's partitions are views of
  ``grad_partitions_flat_buffer`` (``rho`` = 1).
* ZeRO-0/1: ``param.grad`` is a rank-local partial sum until ``step()`` reduces it. For an
  exact norm every micro-step, a *copy* is all-reduced with DeepSpeed's own semantics (dense:
  sum over the data-parallel group / its size; experts: sum over their expert-data-parallel
  group / the data-parallel size), bucketed into one collective per (param group, reduction
  group). This costs one full-size all-reduce of the gradient per micro-step (what DDP pays
  without ``no_sync``) plus a temporary copy; DeepSpeed's boundary reduction is untouched, so
  the step is bit-for-bit DeepSpeed's own.
* ZeRO-0/1 with ``local_accumulation`` (``gqc_dist.local_mode``): between steps the pieces are
  the rank-local sums themselves (no copy, no collective); at a step ``reduce_local`` runs
  DeepSpeed's own boundary reduction early (``allreduce_gradients`` under its unmanaged-mode
  boundary flag) so the exact norm can be read from what the optimizer will step with (ZeRO-0:
  ``param.grad``, replicated; ZeRO-1: this rank's ``averaged_gradients`` partitions), and the
  step then skips DeepSpeed's reduction (``enable_backward_allreduce`` off for that call). One
  full-size all-reduce per optimizer step, DeepSpeed's.

Stepping scales the accumulated sum by ``multiplier / n`` and by the clip coefficient in place,
then calls DeepSpeed's own ``step()`` (which unscales fp16, steps the optimizer and the lr
scheduler, advances ``global_steps`` / ``global_samples`` and zeroes the gradients).

Clipping (``gradient_clipping``) is applied here, with torch's rule ``min(1, clip / (norm +
1e-6))`` on the exact global norm of the mean gradient, and DeepSpeed's own clipping is turned
off: DeepSpeed's stage-0/1 norm averages per-rank norms and is wrong with MoE.
"""

from collections import OrderedDict
from typing import List, Tuple

import torch
import torch.distributed as dist

from .. import collectives
from ..errors import CheckpointError
from ..reduction import Piece
from .base import GradientAdapter, clip_coefficient


def _is_expert(param) -> bool:
    return not getattr(param, "allreduce", True)


def _local_grad(param):
    """ZeRO-1 keeps low-precision accumulation in ``grad_accum``; otherwise ``.grad``."""
    grad = param.grad
    return grad if grad is not None else getattr(param, "grad_accum", None)


class DeepSpeedGradients(GradientAdapter):
    """Accumulated gradients of a DeepSpeed engine; ``original_step`` is the engine's own step."""

    def __init__(self, engine, original_step, clip: float = 0.0):
        self.engine = engine
        self.original_step = original_step
        self.clip = clip
        self.stage = int(engine.zero_optimization_stage())
        self.fp16 = bool(engine.fp16_enabled())
        self.optimizer = engine.optimizer

    # ------------------------------------------------------------------ reading
    def local_pieces(self) -> List[Tuple[int, Piece]]:
        if self.stage == 3:
            return self._stage3_pieces()
        if self.stage == 2:
            return self._stage2_pieces()
        if self.local_reduced is None:
            return self._reduced_copies()
        return self._boundary_pieces() if self.local_reduced else self._param_grads(rho=1)

    def _stage2_pieces(self):
        o = self.optimizer
        pieces = []
        for i in range(len(o.bit16_groups)):
            if o.all_grad_tensors.get(i) is None:
                continue
            tensors = o.get_flat_partition(
                o.params_in_partition[i], o.first_offset[i], o.partition_size[i],
                dtype=o.gradient_accumulation_dtype, device=o.device, param_group_idx=i,
                return_tensor_list=True)
            pieces += [(i, Piece(t, 1, False)) for t in tensors]
        return pieces

    def _stage3_pieces(self):
        o = self.optimizer
        views = o._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
        pieces = []
        for i, group in enumerate(o.fp16_groups):
            for param in group:
                view = views.get(param.ds_id)
                if view is not None:
                    pieces.append((i, Piece(view, 1, False)))
        return pieces

    def _reduced_copies(self):
        """ZeRO-0/1: all-reduce copies of the local sums, one bucket per (group, reduction)."""
        from deepspeed.utils import groups

        dp_group = groups._get_data_parallel_group()
        dp_size = dist.get_world_size(dp_group)
        buckets = OrderedDict()
        for index, params in enumerate(self._module_param_groups()):
            for param in params:
                grad = _local_grad(param)
                if grad is None:
                    continue
                key = (index, param.group_name if _is_expert(param) else None)
                buckets.setdefault(key, []).append(grad)
        pieces = []
        for (index, expert_group), grads in buckets.items():
            flat = torch.cat([g.detach().reshape(-1).float() for g in grads])
            group = dp_group if expert_group is None else groups._get_expert_data_parallel_group(expert_group)
            collectives.all_reduce(flat, grads[0].device, group=group)
            flat.div_(dp_size)
            rho = dp_size if expert_group is None else dist.get_world_size(group)
            pieces.append((index, Piece(flat, rho, False)))
        return pieces

    def _param_grads(self, rho: int):
        """ZeRO-0/1's per-parameter gradients as pieces held by ``rho`` ranks each (local mode:
        1 for the rank-local sums between steps, the data-parallel size once ZeRO-0 reduced)."""
        return [(index, Piece(grad, rho, False)) for index, params in enumerate(self._module_param_groups())
                for grad in map(_local_grad, params) if grad is not None]

    def _boundary_pieces(self):
        """Local mode, after ``reduce_local``: what DeepSpeed's reduction left for its step."""
        if self.stage == 1:  # this rank's partition of each group (padding views are zeros)
            return [(i, Piece(t, 1, False)) for i, tensors in self.optimizer.averaged_gradients.items()
                    if tensors is not None for t in tensors]
        from deepspeed.utils import groups

        return self._param_grads(rho=dist.get_world_size(groups._get_data_parallel_group()))

    def reduce_local(self) -> None:
        engine = self.engine
        engine._running_engine_step = True  # DeepSpeed's unmanaged-mode boundary flag
        try:
            engine.allreduce_gradients()
        finally:
            engine._running_engine_step = False
        self.local_reduced = True

    def _module_param_groups(self) -> List[List[torch.nn.Parameter]]:
        """The model's parameters per optimizer param group (ZeRO keeps flat copies in the
        optimizer's own groups)."""
        o = self.optimizer
        for name in ("bit16_groups", "fp16_groups", "bf16_groups"):
            groups = getattr(o, name, None)
            if groups is not None:
                return groups
        return [group["params"] for group in o.param_groups]

    def loss_scale(self):
        if not self.fp16:
            return None
        scale = self.engine._get_optimizer_loss_scale()
        if scale is None:  # FP16_UnfusedOptimizer keeps it in its loss scaler
            scale = self.engine.optimizer.loss_scaler.cur_scale
        return float(scale)

    # ------------------------------------------------------------------ writing
    def _accumulators(self) -> List[torch.Tensor]:
        o = self.optimizer
        if self.stage == 3:
            return [o.grad_partitions_flat_buffer]
        if self.stage == 2:
            return [t for tensors in o.all_grad_tensors.values() if tensors is not None for t in tensors]
        if self.stage == 1 and self.local_reduced:
            return [t for tensors in o.averaged_gradients.values() if tensors is not None for t in tensors]
        grads = [_local_grad(p) for group in self._module_param_groups() for p in group]
        return [g for g in grads if g is not None]

    def apply_step(self, multiplier: float, num_draws: int, scale: float, mean_norm: float) -> None:
        factor = multiplier / num_draws  # DeepSpeed removes the fp16 loss scale itself
        factor *= clip_coefficient(self.clip, mean_norm)
        if factor != 1.0:
            torch._foreach_mul_(self._accumulators(), factor)
        if self.local_reduced:
            self._step_without_reduction()
        else:
            self.original_step()
        self._clear_stage3_partitions()

    def _step_without_reduction(self):
        """DeepSpeed's step, minus the boundary reduction ``reduce_local`` already ran."""
        engine, enabled = self.engine, self.engine.enable_backward_allreduce
        engine.enable_backward_allreduce = False
        try:
            self.original_step()
        finally:
            engine.enable_backward_allreduce = enabled
            self.local_reduced = False

    def _clear_stage3_partitions(self):
        # DeepSpeed 0.19's ZeRO-3 step() leaves grad_partitions_flat_buffer as it was; a
        # parameter without a gradient in the next window's first micro-batch would then
        # accumulate onto the old values (measured: params off by 1e-2).
        if self.stage == 3:
            self.optimizer.grad_partitions_flat_buffer.zero_()

    def discard(self) -> None:
        if self.fp16:
            # DeepSpeed's own overflow path: skips the update, backs off the scale, zeroes.
            self.original_step()
            self._clear_stage3_partitions()
            return
        for tensor in self._accumulators():
            tensor.zero_()
        self.engine.optimizer.zero_grad()
        self.engine._unmanaged_backward_count = 0  # dropped samples are not trained on

    # ------------------------------------------------------------------ checkpoints
    def save_accumulated(self):
        """This rank's accumulated partitions (ZeRO-2/3) or local sums (ZeRO-0/1), DeepSpeed's
        count of backwards since the last step (it sizes ``global_samples``) and, on ZeRO-3, the
        optimizer's micro-step position (``micro_step_id`` 0 makes the next backward *copy* into
        ``grad_partitions_flat_buffer`` instead of adding: a fresh engine resumed mid-window
        would drop the window's earlier micro-batches)."""
        o = self.optimizer
        if self.stage == 3:
            tensors = [o.grad_partitions_flat_buffer.detach().clone()]
        elif self.stage == 2:
            tensors = {i: None if t is None else [g.detach().clone() for g in t]
                       for i, t in o.all_grad_tensors.items()}
        else:
            tensors = [[None if _local_grad(p) is None else _local_grad(p).detach().clone() for p in group]
                       for group in self._module_param_groups()]
        micro_step = None
        if self.stage == 3:
            micro_step = [int(o.micro_step_id), bool(getattr(o, "_epilogue_ran_this_backward", False))]
        return {"stage": self.stage, "tensors": tensors,
                "backward_count": int(self.engine._unmanaged_backward_count), "micro_step": micro_step}

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
        if not _fits(saved["tensors"], self._accumulator_shapes()):
            raise CheckpointError(f"accumulated gradients of ZeRO stage {self.stage} do not match this "
                                  "engine's partitions (another model or world size)")

    def _accumulator_shapes(self):
        """What ``save_accumulated()['tensors']`` holds, as ``(shape, dtype)``s, whether or not a
        backward has run yet."""
        o = self.optimizer
        if self.stage == 3:
            buffer = o.grad_partitions_flat_buffer
            return [(tuple(buffer.shape), buffer.dtype)]
        if self.stage == 2:
            return {i: [(tuple(p.shape), None) for p in params]
                    for i, params in enumerate(o.params_in_partition)}
        return [[(tuple(p.shape), None) for p in group] for group in self._module_param_groups()]

    def restore_accumulated(self, saved) -> None:
        o = self.optimizer
        if saved is None:
            for tensor in self._accumulators():
                tensor.zero_()
            self.engine._unmanaged_backward_count = 0
            if self.stage == 3:  # as after DeepSpeed's own step
                o.micro_step_id = 0
                o._epilogue_ran_this_backward = False
            return
        tensors = saved["tensors"]
        if self.stage == 3:
            o.grad_partitions_flat_buffer.copy_(tensors[0])
            # the next backward must add to the restored window (micro_step_id 0 copies)
            micro_step_id, epilogue_ran = saved.get("micro_step") or (1, False)
            o.micro_step_id = micro_step_id if micro_step_id or epilogue_ran else 1
            o._epilogue_ran_this_backward = epilogue_ran
        elif self.stage == 2:
            # the next backward adds its gradients into these lists (DeepSpeed's ipg epilogue)
            for i, grads in tensors.items():
                o.all_grad_tensors[i] = None if grads is None else [g.clone().to(o.device) for g in grads]
        else:
            for group, grads in zip(self._module_param_groups(), tensors):
                for param, grad in zip(group, grads):
                    param.grad = None if grad is None else grad.clone().to(param.device)
        self.engine._unmanaged_backward_count = saved["backward_count"]


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
