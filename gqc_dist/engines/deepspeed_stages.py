"""Where a DeepSpeed engine keeps the accumulated gradient, stage by stage (ZeRO 0-3), for
:class:`gqc_dist.engines.deepspeed_zero.DeepSpeedGradients`.

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
* ZeRO-0/1 with ``local_accumulation`` (``gqc_dist.core.local_mode``): between steps the pieces are
  the rank-local sums themselves (no copy, no collective); at a step ``reduce_local`` runs
  DeepSpeed's own boundary reduction early (``allreduce_gradients`` under its unmanaged-mode
  boundary flag) so the exact norm can be read from what the optimizer will step with (ZeRO-0:
  ``param.grad``, replicated; ZeRO-1: this rank's ``averaged_gradients`` partitions), and the
  step then skips DeepSpeed's reduction (``enable_backward_allreduce`` off for that call). One
  full-size all-reduce per optimizer step, DeepSpeed's.

Each stage is a class of its own (:class:`Stage0`, :class:`Stage1`, :class:`Stage2`,
:class:`Stage3`): where its gradient lives in each :class:`~gqc_dist.engines.base.GradientState`,
what a step scales, what a checkpoint saves. :class:`DeepSpeedGradients` picks one and owns the
state machine, the step and the loss scale.
"""

from collections import OrderedDict
from typing import Any, List, Tuple

import torch
import torch.distributed as dist

from gqc_dist.core import collectives
from gqc_dist.core.reduction import Piece
from gqc_dist.engines.base import GradientState


def _is_expert(param) -> bool:
    return not getattr(param, "allreduce", True)


def _local_grad(param):
    """ZeRO-1 keeps low-precision accumulation in ``grad_accum``; otherwise ``.grad``."""
    grad = param.grad
    return grad if grad is not None else getattr(param, "grad_accum", None)


def _module_param_groups(optimizer) -> List[List[torch.nn.Parameter]]:
    """The model's parameters per optimizer param group (ZeRO keeps flat copies in the
    optimizer's own groups)."""
    for name in ("bit16_groups", "fp16_groups", "bf16_groups"):
        groups = getattr(optimizer, name, None)
        if groups is not None:
            return groups
    return [group["params"] for group in optimizer.param_groups]


def _data_parallel_size() -> int:
    from deepspeed.utils import groups

    return dist.get_world_size(groups._get_data_parallel_group())


class ZeroStage:
    """Where one ZeRO stage keeps the accumulated gradient (DeepSpeed 0.19.x internals)."""

    number = -1

    def __init__(self, engine):
        self.engine = engine
        self.optimizer = engine.optimizer

    def pieces(self, state: GradientState) -> List[Tuple[int, Piece]]:
        """This rank's gradient pieces in ``state``."""
        raise NotImplementedError

    def accumulators(self, state: GradientState) -> List[torch.Tensor]:
        """The tensors a step scales in place (the accumulated sum as the optimizer will read it)."""
        raise NotImplementedError

    def saved_tensors(self) -> Any:
        raise NotImplementedError

    def shapes(self) -> Any:
        """What :meth:`saved_tensors` holds, as ``(shape, dtype)``s (dtype ``None``: any), whether
        or not a backward has run yet."""
        raise NotImplementedError

    def restore_tensors(self, tensors: Any) -> None:
        raise NotImplementedError

    def micro_step(self):
        """Stage-specific position to checkpoint (ZeRO-3's), or ``None``."""
        return None

    def clear(self) -> None:
        """Zero the accumulated gradient (no window)."""
        for tensor in self.accumulators(GradientState.EXACT):
            tensor.zero_()

    def after_step(self) -> None:
        """What DeepSpeed's own step leaves undone."""


class Stage0(ZeroStage):
    """ZeRO-0: ``param.grad`` is a rank-local partial sum until the step reduces it. Exact mode
    all-reduces a *copy* every micro-step, with DeepSpeed's semantics (dense: sum over the
    data-parallel group / its size; experts: sum over their expert-data-parallel group / the
    data-parallel size), one collective per (param group, reduction group), so the step stays
    bit-for-bit DeepSpeed's own. Local mode reads the sums in place and, once reduced, the
    replicated ``param.grad``."""

    number = 0

    def pieces(self, state):
        if state is GradientState.EXACT:
            return self._reduced_copies()
        if state is GradientState.LOCAL:
            return self._param_grads(rho=1)
        return self._reduced_pieces()

    def _reduced_pieces(self):
        return self._param_grads(rho=_data_parallel_size())

    def _param_grads(self, rho: int):
        """Per-parameter gradients as pieces held by ``rho`` ranks each."""
        return [(index, Piece(grad, rho, False)) for index, params in enumerate(_module_param_groups(self.optimizer))
                for grad in map(_local_grad, params) if grad is not None]

    def _reduced_copies(self):
        from deepspeed.utils import groups

        dp_group = groups._get_data_parallel_group()
        dp_size = dist.get_world_size(dp_group)
        buckets = OrderedDict()
        for index, params in enumerate(_module_param_groups(self.optimizer)):
            for param in params:
                grad = _local_grad(param)
                if grad is None:
                    if not param.requires_grad:
                        continue
                    # zeros, so that every rank issues the same collectives even where this rank's
                    # gradient is missing (cleared from outside: refused on every rank after them)
                    grad = torch.zeros_like(param)
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

    def accumulators(self, state):
        grads = [_local_grad(p) for group in _module_param_groups(self.optimizer) for p in group]
        return [g for g in grads if g is not None]

    def saved_tensors(self):
        return [[None if _local_grad(p) is None else _local_grad(p).detach().clone() for p in group]
                for group in _module_param_groups(self.optimizer)]

    def shapes(self):
        return [[(tuple(p.shape), None) for p in group] for group in _module_param_groups(self.optimizer)]

    def restore_tensors(self, tensors):
        for group, grads in zip(_module_param_groups(self.optimizer), tensors):
            for param, grad in zip(group, grads):
                param.grad = None if grad is None else grad.clone().to(param.device)


class Stage1(Stage0):
    """ZeRO-1: as ZeRO-0 between steps; once reduced (local mode), this rank's partition of
    each group in ``averaged_gradients`` (padding views are zeros)."""

    number = 1

    def _partitions(self):
        return [(i, t) for i, tensors in self.optimizer.averaged_gradients.items() if tensors is not None
                for t in tensors]

    def _reduced_pieces(self):
        return [(i, Piece(t, 1, False)) for i, t in self._partitions()]

    def accumulators(self, state):
        if state is GradientState.REDUCED:
            return [t for _, t in self._partitions()]
        return super().accumulators(state)


class Stage2(ZeroStage):
    """ZeRO-2: reduce-scattered every backward; this rank's partition of each param group is
    ``get_flat_partition(...)`` over ``all_grad_tensors`` (``rho`` 1: every element of a dense
    group is held by one rank, and expert groups are partitioned over their expert-data-parallel
    group while expert-parallel ranks hold different experts)."""

    number = 2

    def pieces(self, state):
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

    def accumulators(self, state):
        return [t for tensors in self.optimizer.all_grad_tensors.values() if tensors is not None for t in tensors]

    def saved_tensors(self):
        return {i: None if t is None else [g.detach().clone() for g in t]
                for i, t in self.optimizer.all_grad_tensors.items()}

    def shapes(self):
        return {i: [(tuple(p.shape), None) for p in params]
                for i, params in enumerate(self.optimizer.params_in_partition)}

    def restore_tensors(self, tensors):
        o = self.optimizer  # the next backward adds into these lists (DeepSpeed's ipg epilogue)
        for i, grads in tensors.items():
            o.all_grad_tensors[i] = None if grads is None else [g.clone().to(o.device) for g in grads]


class Stage3(ZeroStage):
    """ZeRO-3: reduce-scattered every backward; this rank's partitions are views of
    ``grad_partitions_flat_buffer``."""

    number = 3

    def pieces(self, state):
        o = self.optimizer
        views = o._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
        return [(i, Piece(views[param.ds_id], 1, False)) for i, group in enumerate(o.fp16_groups)
                for param in group if views.get(param.ds_id) is not None]

    def accumulators(self, state):
        return [self.optimizer.grad_partitions_flat_buffer]

    def saved_tensors(self):
        return [self.optimizer.grad_partitions_flat_buffer.detach().clone()]

    def shapes(self):
        buffer = self.optimizer.grad_partitions_flat_buffer
        return [(tuple(buffer.shape), buffer.dtype)]

    def micro_step(self):
        """``micro_step_id`` 0 makes the next backward *copy* into the buffer instead of adding:
        a fresh engine resumed mid-window would drop the window's earlier micro-batches."""
        o = self.optimizer
        return [int(o.micro_step_id), bool(getattr(o, "_epilogue_ran_this_backward", False))]

    def restore_tensors(self, tensors, micro_step=None):
        o = self.optimizer
        o.grad_partitions_flat_buffer.copy_(tensors[0])
        micro_step_id, epilogue_ran = micro_step or (1, False)  # the next backward adds to the window
        o.micro_step_id = micro_step_id if micro_step_id or epilogue_ran else 1
        o._epilogue_ran_this_backward = epilogue_ran

    def clear(self):
        super().clear()
        self.optimizer.micro_step_id = 0  # as after DeepSpeed's own step
        self.optimizer._epilogue_ran_this_backward = False

    def after_step(self):
        # DeepSpeed 0.19's ZeRO-3 step() leaves grad_partitions_flat_buffer as it was; a
        # parameter without a gradient in the next window's first micro-batch would then
        # accumulate onto the old values (measured: params off by 1e-2).
        self.optimizer.grad_partitions_flat_buffer.zero_()


STAGES = {stage.number: stage for stage in (Stage0, Stage1, Stage2, Stage3)}
