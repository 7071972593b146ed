"""Adapter for a plain ``torch.optim.Optimizer``: single process, DDP, FSDP2/HSDP, mixed MoE.

Gradients live in ``param.grad`` (DTensor under FSDP2). Pieces and their replication come from
``gqc_dist.core.reduction``; FSDP2 sync flags are checked every micro-step (``gqc_dist.engines.fsdp2``).
"""

import operator
import weakref
from typing import Optional

import torch

from gqc_dist.core import collectives
from gqc_dist.errors import CheckpointError, GQCUsageError
from gqc_dist.engines.fsdp2 import (check_gradient_sync, check_local_layout, fsdp2_param_groups_owning,
                          reduce_scatter_local_sums, unsharded_local_sums)
from gqc_dist.core.packet import world_rank_and_size
from gqc_dist.core.reduction import POLICY_KEY, Piece, group_policy, resolve_piece
from gqc_dist.engines.base import GradientAdapter, GradientState, clip_coefficient


class TorchOptimizerGradients(GradientAdapter):
    """``param.grad`` of the optimizer's parameters, with an optional AMP ``GradScaler`` and
    optional clipping of the gradient it hands the optimizer (the window's mean, or what the
    wrapper's ``window_gradient`` makes of it) to ``clip`` (exact global norm, torch's rule).

    The scaler is updated here, once per window, from the global overflow flag (GradScaler's own
    ``update()`` would use rank-local flags and let ranks' scales drift apart); the user must not
    call ``scaler.step`` or ``scaler.update``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, distributed_mode: Optional[str] = None,
                 grad_scaler: Optional[torch.amp.GradScaler] = None, clip: float = 0.0):
        self.optimizer = optimizer
        self.clip = clip  # max global norm of the gradient the optimizer steps on (0: no clipping)
        self.distributed_mode = distributed_mode
        self.grad_scaler = grad_scaler
        self._fsdp2_groups = None  # found at the first micro-step, after FSDP2's lazy init
        # (grads, policies) of the last micro-step when every gradient was a plain tensor:
        # gradients accumulate in place, so while the same tensor objects come back (and the
        # policies are unchanged) the same pieces are reused instead of resolved again.
        self._last_layout = None
        self._pieces = []  # the last micro-step's pieces: what apply_step scales
        self.layout_version = 0
        # each param.grad and its in-place version as last read in the open window (None: no window
        # open): what outside_changes() compares with
        self._seen = None
        self._cleared = 0  # what the last outside_changes() found cleared: an empty read is then no error
        self._restarted = 0  # gradients a backward found gone since the last read (_gradient_arrives)
        self._edited = 0  # gradients a backward found changed in place since the last read
        self._arrived = False  # a backward reached a watched parameter since the last read
        self._held = {}  # id(param) -> (param.grad, its version) at the last read, until a backward arrives
        self._hooks = None

    def params_changed(self) -> None:
        """Call after ``add_param_group``: FSDP2 ownership is looked up again."""
        self._fsdp2_groups = None
        self._forget_layout()

    def _forget_layout(self) -> None:
        self._last_layout = None  # let freed gradients go
        self._seen = None
        self._held = {}
        self._pieces = []
        self.layout_version += 1
        self._window_closed()

    def _fsdp2_owning(self):
        if self._fsdp2_groups is None:
            self._fsdp2_groups = fsdp2_param_groups_owning(
                p for group in self.optimizer.param_groups for p in group["params"])
        return self._fsdp2_groups

    def _local_fsdp2_groups(self):
        """Local mode: the FSDP2 groups holding the rank-local sums (``[]``: DDP or one process),
        their layout checked once, when they are found."""
        world = world_rank_and_size()[1]
        if world == 1:
            return []
        if self._fsdp2_groups is None:
            check_local_layout(self._fsdp2_owning(), world)
        return self._fsdp2_groups

    def _check_local_support(self) -> None:
        """DDP under ``no_sync()``, FSDP2 with gradient sync off, or one process."""

    def _flat_params(self):
        return [param for group in self.optimizer.param_groups for param in group["params"]]

    def _grads(self):
        return [param.grad for param in self._flat_params()]

    def _remember(self, grads) -> None:
        versions = list(map(_version, grads))
        self._seen = (grads, versions)
        self._held = {id(param): (grad, version) for param, grad, version in zip(self._flat_params(), grads, versions)
                      if grad is not None}
        self._restarted = self._edited = 0
        self._arrived = False
        if self._hooks is None:  # once: the parameters' gradient hooks (see _watch); FSDP2's sharded
            # parameters get theirs assigned by FSDP2, never from autograd: compared by identity instead
            self._hooks = [_watch(param, self) for param in self._flat_params()
                           if param.requires_grad and not hasattr(param, "device_mesh")]

    def _gradient_arrives(self, param) -> None:
        """A backward is about to accumulate into ``param.grad``. The first one since the last read
        in an open window checks what the read saw: a gradient gone means this backward starts it
        afresh (a ``zero_grad()`` since then); the same tensor at another in-place version was changed
        outside (``zero_grad(set_to_none=False)``, a clip). A view's version is its bucket's (DDP's
        ``gradient_as_bucket_view``): not compared."""
        if self._seen is None:
            return
        self._arrived = True
        held = self._held.pop(id(param), None)
        if held is None:
            return
        grad = param.grad
        if grad is None:
            self._restarted += 1
        elif grad is held[0] and grad._version != held[1] and not grad._is_view():
            self._edited += 1

    def outside_changes(self):
        """A window's gradient is cleared from outside when a gradient the last read saw is
        ``None`` now, or a backward since then found it ``None`` (``_gradient_arrives``: autograd
        then creates it afresh); FSDP2 adds into its sharded gradients in place, so there another
        tensor means replaced. It was changed in place from outside when a backward found it at
        another version, or, with no backward since, it is (watched parameters only: FSDP2's
        sharded ones are not). A window in which no gradient moved (tensor or in-place version)
        saw no backward. A tensor replaced by one the user computed (``p.grad = p.grad + g``)
        counts as moved, not cleared."""
        seen = self._seen
        if seen is None:
            return 0, 0, 0
        grads, (before, versions) = self._grads(), seen
        if len(grads) != len(before):
            return 0, 0, 0  # params added: nothing to compare
        same = all(map(operator.is_, grads, before))
        cleared, edited = self._restarted, self._edited
        if not same:
            cleared += sum(1 for g, b in zip(grads, before)
                           if b is not None and (g is None or (g is not b and hasattr(b, "_local_tensor"))))
        moved = list(map(_version, grads)) != versions
        if moved and self._hooks and not self._arrived:
            edited += sum(1 for g, b, v in zip(grads, before, versions)
                          if g is b and g is not None and _version(g) != v and not g._is_view())
        self._cleared = cleared + edited
        return cleared, int(same and not cleared and not moved), edited

    def local_pieces(self):
        if self.state is GradientState.LOCAL:
            return self._rank_local_pieces()
        distributed = world_rank_and_size()[1] > 1
        if distributed and self.state is GradientState.EXACT:  # local mode runs FSDP2 sync off on purpose
            check_gradient_sync(self._fsdp2_owning())
        groups = self.optimizer.param_groups
        policies = (distributed, *(group_policy(group, self.distributed_mode) for group in groups))
        grads = self._grads()
        self._remember(grads)
        last = self._last_layout
        if (last is not None and last[1] == policies and len(last[0]) == len(grads)
                and all(a is b for a, b in zip(last[0], grads))):
            return self._pieces
        self.layout_version += 1
        pieces = []
        for index, group in enumerate(groups):
            for param in group["params"]:
                if param.grad is not None:
                    pieces.append((index, resolve_piece(param.grad, policies[index + 1], distributed)))
        plain = all(grad is None or type(grad) is torch.Tensor for grad in grads)
        self._last_layout = (grads, policies) if plain else None
        self._pieces = pieces
        cleared, self._cleared = self._cleared, 0
        if not pieces and not cleared:  # cleared: every rank refuses together after the all-reduce
            raise GQCUsageError(
                "step() was called but no parameter of the wrapped optimizer has a gradient: call "
                "loss.backward() (or your engine's backward) before every step(). With FSDP2, "
                "gradients appear on the sharded parameters only when gradient sync is on."
            )
        return pieces

    def _rank_local_pieces(self):
        """Local mode between steps: each rank's own unreduced sums, counted once (``rho`` 1):
        ``param.grad`` under DDP's ``no_sync()``, the unsharded sums FSDP2 keeps with gradient
        sync off."""
        fsdp2_groups = self._local_fsdp2_groups()
        if fsdp2_groups:
            index = {id(p): i for i, group in enumerate(self.optimizer.param_groups) for p in group["params"]}
            pieces = [(index[id(param)], Piece(grad, 1, False))
                      for param, grad in unsharded_local_sums(fsdp2_groups) if id(param) in index]
        else:
            self._remember(self._grads())  # DDP under no_sync(): param.grad accumulates in place
            pieces = []
            for index, group in enumerate(self.optimizer.param_groups):
                if group.get(POLICY_KEY) is not None:  # experts etc.: not averaged over the world
                    raise GQCUsageError(f"local_accumulation supports data-parallel parameters only; param group "
                                        f"{index} has a '{POLICY_KEY}' policy")
                for param in group["params"]:
                    if param.grad is not None:
                        if type(param.grad) is not torch.Tensor:
                            raise GQCUsageError(
                                "local_accumulation supports DDP under no_sync() and FSDP2 with gradient sync "
                                f"off; got a {type(param.grad).__name__} gradient")
                        pieces.append((index, Piece(param.grad, 1, False)))
        if not pieces:
            raise GQCUsageError("step() was called but no parameter has a gradient: call backward() first")
        self._pieces = pieces
        self.layout_version += 1
        return pieces

    def _reduce_local(self) -> None:
        fsdp2_groups = self._local_fsdp2_groups()
        if fsdp2_groups:
            reduce_scatter_local_sums(fsdp2_groups)
        else:
            grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            for dtype in sorted({g.dtype for g in grads}, key=str):  # one bucket per dtype
                same = [g for g in grads if g.dtype == dtype]
                flat = torch.cat([g.reshape(-1) for g in same])
                collectives.all_reduce(flat, same[0].device)
                flat.div_(world_rank_and_size()[1])
                for grad, part in zip(same, flat.split([g.numel() for g in same])):
                    grad.copy_(part.view_as(grad))

    def _scaler_enabled(self) -> bool:
        return self.grad_scaler is not None and self.grad_scaler.is_enabled()

    def loss_scale(self):
        return self.grad_scaler._get_scale_async() if self._scaler_enabled() else None

    def apply_step(self, multiplier: float, num_draws: int, scale: float, mean_norm: float) -> None:
        pieces = [piece.tensor for _, piece in self._pieces]
        # average, unscale, rescale (GNR) and clip in one pass over the gradient; a plain average
        # divides (bit-for-bit the mean a hand-written loop takes)
        multiplier *= clip_coefficient(self.clip, mean_norm)
        divisor = float(num_draws) * scale
        if multiplier != 1.0:
            torch._foreach_mul_(pieces, multiplier / divisor)
        elif divisor != 1.0:
            torch._foreach_div_(pieces, divisor)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._forget_layout()
        self._update_scaler(found_inf=False)

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._forget_layout()
        self._update_scaler(found_inf=True)

    # ------------------------------------------------------------------ checkpoints
    def _params(self):
        return [group["params"] for group in self.optimizer.param_groups]

    def save_accumulated(self):
        """Per param group, per parameter: a detached copy of ``param.grad`` (or ``None``)."""
        if self.state is GradientState.LOCAL and self._local_fsdp2_groups():
            raise GQCUsageError("state_dict() mid-window is not supported with FSDP2 local_accumulation (the sums "
                                "live on FSDP2's unsharded parameters); save after a step (num_draws == 0)")
        return [[None if p.grad is None else p.grad.detach().clone() for p in params]
                for params in self._params()]

    def check_accumulated(self, saved) -> None:
        groups = self._params()
        if not isinstance(saved, list) or len(saved) != len(groups):
            raise CheckpointError(f"accumulated_grads must hold one list per param group ({len(groups)})")
        for g_index, (grads, params) in enumerate(zip(saved, groups)):
            if not isinstance(grads, list) or len(grads) != len(params):
                raise CheckpointError(f"accumulated_grads[{g_index}] must hold {len(params)} entries")
            for p_index, (grad, param) in enumerate(zip(grads, params)):
                if grad is not None and (not isinstance(grad, torch.Tensor) or grad.shape != param.shape
                                         or grad.dtype != param.dtype):
                    raise CheckpointError(
                        f"accumulated_grads[{g_index}][{p_index}] does not match parameter "
                        f"shape {tuple(param.shape)} / dtype {param.dtype}")

    def restore_accumulated(self, saved) -> None:
        for g_index, params in enumerate(self._params()):
            for p_index, param in enumerate(params):
                grad = None if saved is None else saved[g_index][p_index]
                param.grad = None if grad is None else grad.detach().clone().to(param.device)
        self._forget_layout()

    def _update_scaler(self, found_inf: bool) -> None:
        if not self._scaler_enabled():
            return
        scaler = self.grad_scaler
        scale = scaler._get_scale_async()
        found = torch.full((1,), float(found_inf), dtype=torch.float32, device=scale.device)
        torch._amp_update_scale_(scale, scaler._growth_tracker, found, scaler.get_growth_factor(),
                                 scaler.get_backoff_factor(), scaler.get_growth_interval())


def _version(grad) -> int:
    """The in-place version counter of a gradient (a DTensor's: its local shard's); host-side."""
    if grad is None:
        return -1
    local = getattr(grad, "_local_tensor", grad)
    return local._version


def _watch(param, adapter):
    """A hook on ``param``'s incoming gradient that tells ``adapter`` before autograd accumulates
    it. Both are held weakly: the hook lives on the parameter and must keep neither alive (a
    cycle through a parameter outlives the process group at interpreter exit, which aborts gloo)."""
    owner_ref, param_ref = weakref.ref(adapter), weakref.ref(param)

    def arriving(grad):
        owner, watched = owner_ref(), param_ref()
        if owner is not None and watched is not None:
            owner._gradient_arrives(watched)

    return param.register_hook(arriving)
