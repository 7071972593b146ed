"""The one contract every front end drives (gqc-train, ``gqc_dist.frontends.deepspeed``, the
Trainer, Accelerate and torchtitan integrations): :class:`GQCSession` owns the controller, its
value schedule, the micro-step call with its step notification, and one versioned per-rank
checkpoint envelope, :data:`FORMAT`, in ``<checkpoint folder>/gqc_state_rank<r>.pt``
(:func:`state_path`) or inside a framework's own state.

The envelope is ``{"format", "algorithm", "rank", "world_size", "wrapper", "schedule",
"values", "engine"}``: the controller's state without the optimizer (every framework saves its
optimizer itself), the value schedule's, the schedulable param-group values it last wrote (a
torch scheduler's ``load_state_dict`` does not write them back), and what the front end adds
(DeepSpeed: its ZeRO stage). The four envelopes of before (``gqc_dist.wrapper/1``,
``gqc_dist.deepspeed/1``, ``gqc_dist.integrations/1``, ``gqc_dist.torchtitan/1``) load through
:func:`upgrade`.
"""

import copy
import os
from typing import Any, Callable, Dict, Optional

import torch

from gqc_dist.atomic_file import replace_atomically
from gqc_dist.core import checkpoint_state
from gqc_dist.core.packet import world_rank_and_size
from gqc_dist.core.window import Decision
from gqc_dist.errors import CheckpointError

FORMAT = "gqc_dist.state/2"
LEGACY_FORMATS = ("gqc_dist.deepspeed/1", "gqc_dist.integrations/1", "gqc_dist.torchtitan/1",
                  checkpoint_state.FORMAT)


def state_path(directory: str, rank: int) -> str:
    """Rank ``rank``'s GQC state file in a checkpoint folder."""
    return os.path.join(directory, f"gqc_state_rank{rank}.pt")


def upgrade(state: Any) -> Dict[str, Any]:
    """``state`` as a :data:`FORMAT` envelope: the current one as it is, each earlier one converted
    (what it lacks is ``None``: not checked, not restored); :class:`CheckpointError` otherwise."""
    found = state.get("format") if isinstance(state, dict) else type(state).__name__
    if found == FORMAT:
        return state
    if found not in LEGACY_FORMATS:
        raise CheckpointError(f"not GQC state (format {found!r}, expected {FORMAT!r} or an earlier "
                              f"{', '.join(LEGACY_FORMATS)})")
    if found == checkpoint_state.FORMAT:  # a bare wrapper state dict, its optimizer included; whoever
        # saved it kept any schedule themselves ("schedule" absent: not compared, not restored)
        return {"format": FORMAT, "algorithm": state.get("algorithm"), "rank": None, "world_size": None,
                "wrapper": state, "values": None, "engine": {}}
    wrapper = state.get("wrapper")
    algorithm = state.get("algorithm", wrapper.get("algorithm") if isinstance(wrapper, dict) else None)
    engine = {key: state[key] for key in ("zero_stage", "stepped") if key in state}  # DeepSpeed's
    return {"format": FORMAT, "algorithm": algorithm, "rank": state.get("rank"), "world_size": state.get("world_size"),
            "wrapper": wrapper, "schedule": state.get("schedule"), "values": state.get("values"), "engine": engine}


def _is_dtensor(tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def _per_parameter(accumulated) -> bool:
    """The torch adapter's accumulated gradients (one list per param group; FSDP2's DTensors
    travel as local shards); other adapters keep their own form (DeepSpeed: partitions)."""
    return isinstance(accumulated, list) and all(isinstance(grads, list) for grads in accumulated)


class GQCSession:
    """A controller (a :class:`~gqc_dist.core.wrapper.GQCOptimizerWrapper`) and its value
    schedule (or ``None``), as every front end drives them.

    ``micro_step(loss)`` after each micro-batch's backward, on every rank; its decision tells
    the front end whether the optimizer stepped (the value schedule has then moved). ``state_dict()`` /
    ``load_state_dict()`` are this rank's envelope; ``write`` keeps it in a folder, :func:`read`
    reads it back.
    """

    def __init__(self, controller, schedule=None):
        self.controller = controller
        #: stepped once per optimizer step; a front end may replace it (gqc-train keys it by tokens)
        self.schedule = schedule
        #: the last :class:`~gqc_dist.core.window.Decision`, ``None`` before the first
        self.decision: Optional[Decision] = None

    def micro_step(self, loss=None) -> Decision:
        """The GQC decision on the micro-batch just backpropagated (every rank, same result).
        ``loss`` is this rank's micro-batch loss; the controller reads it only when its rule does
        (MHT), so passing it costs nothing otherwise. On a step the value schedule advances once."""
        decision = self.controller.after_backward(loss)
        if decision.stepped and self.schedule is not None:
            self.schedule.step()
        self.decision = decision
        return decision

    # ------------------------------------------------------------------ checkpoints
    def values(self):
        """The schedulable param-group values, per group (what the schedule last wrote)."""
        keys = self.controller.SCHEDULABLE
        return [{key: group[key] for key in keys if key in group} for group in self.controller.param_groups]

    def state_dict(self, engine: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """This rank's envelope (a deep copy): counters, noise estimate, schedule and values and,
        mid-window, this rank's accumulated gradient (FSDP2's DTensor shards as their local
        pieces, wrapped again on load). ``engine``: what the front end adds."""
        wrapper = self.controller.state_dict(include_optimizer=False)
        if _per_parameter(wrapper["accumulated_grads"]):
            wrapper["accumulated_grads"] = [[grad.to_local() if grad is not None and _is_dtensor(grad) else grad
                                             for grad in grads] for grads in wrapper["accumulated_grads"]]
        rank, world = world_rank_and_size()
        return {"format": FORMAT, "algorithm": self.controller.ALGORITHM, "rank": rank, "world_size": world,
                "wrapper": wrapper, "schedule": None if self.schedule is None else copy.deepcopy(self.schedule.state_dict()),
                "values": self.values(), "engine": dict(engine or {})}

    def check(self, state: Any, where: str = "the checkpoint", check_accumulated: Optional[Callable] = None):
        """``state`` upgraded (:func:`upgrade`) and checked against this session; changes nothing.
        Raises :class:`CheckpointError` naming ``where`` and what does not fit."""
        state = upgrade(state)
        controller = self.controller
        if state["algorithm"] != controller.ALGORITHM:
            raise CheckpointError(f"{where} was saved by GQC algorithm {state['algorithm']!r}; this run has "
                                  f"{controller.ALGORITHM!r}")
        wrapper = state["wrapper"]
        if not isinstance(wrapper, dict):
            raise CheckpointError(f"{where} has no wrapper state")
        world = world_rank_and_size()[1]
        mid_window = bool((wrapper.get("counters") or {}).get("num_draws"))
        if mid_window and state["world_size"] not in (None, world):
            raise CheckpointError(f"{where} was saved mid-window by {state['world_size']} ranks; its accumulated "
                                  f"gradient cannot be resumed on {world}")
        saved = state.get("schedule")
        if "schedule" in state:
            if (saved is None) != (self.schedule is None):
                raise CheckpointError(
                    f"{where} was saved {'without' if saved is None else 'with'} a gradient_quality_control.schedule; "
                    f"this run has {'one' if self.schedule is not None else 'none'}")
            if self.schedule is not None:
                expected = set(self.schedule.state_dict())  # tsa's SynchronousSchedule: one entry per key
                if not isinstance(saved, dict) or set(saved) != expected:
                    raise CheckpointError(f"{where} schedules {sorted(saved) if isinstance(saved, dict) else saved}, "
                                          f"this run {sorted(expected)}")
        values = state["values"]
        if values is not None and (not isinstance(values, list) or len(values) != len(controller.param_groups)
                                   or not all(isinstance(group, dict) for group in values)):
            raise CheckpointError(f"{where} holds values for {len(values) if isinstance(values, list) else 'no'} "
                                  f"param groups, this optimizer has {len(controller.param_groups)}")
        if check_accumulated is not None:
            checkpoint_state.validate(wrapper, controller.ALGORITHM, controller.max_draws, check_accumulated)
        return state

    def load_state_dict(self, state: Any, where: str = "the checkpoint") -> None:
        """Restore an envelope (any of the formats :func:`upgrade` reads): the controller
        (validated before anything changes), the schedule, the values."""
        state = self.check(state, where)
        wrapper = dict(state["wrapper"])
        if _per_parameter(wrapper.get("accumulated_grads")):
            from torch.distributed.tensor import DTensor

            groups = [group["params"] for group in self.controller.param_groups]
            wrapper["accumulated_grads"] = [
                [DTensor.from_local(grad.to(param.device), param.device_mesh, param.placements, run_check=False,
                                    shape=param.shape, stride=param.stride())
                 if grad is not None and _is_dtensor(param) else grad for grad, param in zip(grads, params)]
                for grads, params in zip(wrapper["accumulated_grads"], groups)]
        self.controller.load_state_dict(wrapper)
        if self.schedule is not None and state.get("schedule") is not None:
            self.schedule.load_state_dict(state["schedule"])
        for group, values in zip(self.controller.param_groups, state["values"] or ()):
            group.update(values)
        self.decision = None

    def write(self, directory: str, engine: Optional[Dict[str, Any]] = None) -> str:
        """Write this rank's envelope to ``directory`` (atomically); returns the path."""
        os.makedirs(directory, exist_ok=True)
        state = self.state_dict(engine)
        path = state_path(directory, state["rank"])
        replace_atomically(path, lambda handle: torch.save(state, handle))
        return path


def read(directory: str, missing: str = "saved without gradient_quality_control, or by another number of ranks"):
    """This rank's envelope in ``directory``, upgraded (not checked against a run: a front end may
    need it before its controller exists). ``missing``: why a missing file may be missing."""
    path = state_path(directory, world_rank_and_size()[0])
    if not os.path.isfile(path):
        raise CheckpointError(f"cannot resume GQC from {directory}: no {os.path.basename(path)} ({missing})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"cannot read GQC state {path}: {error}") from error
    try:
        return upgrade(state)
    except CheckpointError as error:
        raise CheckpointError(f"{path} is {error}") from error
