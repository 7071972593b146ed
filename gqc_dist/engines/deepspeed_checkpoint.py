"""GQC state in DeepSpeed checkpoints: ``engine.save_checkpoint`` / ``load_checkpoint`` of an
engine from ``gqc_dist.frontends.deepspeed.initialize`` carry the controller with no extra call.

Each rank writes ``<save_dir>/<tag>/gqc_state_rank{r}.pt`` (atomically, before DeepSpeed's own
files, so ``latest`` only names complete checkpoints): the wrapper state without the torch
optimizer (DeepSpeed saves that itself, per rank and partitioned; rank 0's copy loaded on every
rank was what made hand-made resumes drift), the value schedule and the schedulable values, and
the accumulated window when saved mid-window (the adapter's partitions, ZeRO-3's micro-step id).
Loading checks every rank's file before DeepSpeed loads anything, and one rank's refusal is
every rank's (a lone refusal would leave the others in DeepSpeed's collective load).
"""

import copy
import os
from typing import Any, Dict, Optional

import torch

from gqc_dist.core import checkpoint_state, collectives
from gqc_dist.atomic_file import replace_atomically
from gqc_dist.errors import CheckpointError
from gqc_dist.core.packet import world_rank_and_size
from gqc_dist.core.state_files import state_path

#: format of the per-rank GQC file next to DeepSpeed's checkpoint files
STATE_FORMAT = "gqc_dist.deepspeed/1"


def state_file(checkpoint_dir: str, rank: int) -> str:
    """This rank's GQC state file inside DeepSpeed's ``<save_dir>/<tag>`` directory."""
    return state_path(checkpoint_dir, rank)


def _schedulable_values(controller):
    return [{key: group[key] for key in controller.SCHEDULABLE if key in group}
            for group in controller.param_groups]


def gqc_state(engine, controller) -> Dict[str, Any]:
    # DeepSpeed saves and loads the torch optimizer itself, per rank and partitioned; the wrapper's
    # copy would be rank 0's partition state loaded over every rank's (and on ZeRO-3 the torch
    # optimizer's own state_dict() raises: its state holds sub-group tensors its groups lack)
    wrapper = controller.state_dict(include_optimizer=False)
    schedule = engine.gqc_schedule
    rank, world = world_rank_and_size()
    return {
        "format": STATE_FORMAT,
        "algorithm": controller.ALGORITHM,
        "rank": rank,
        "world_size": world,
        "zero_stage": int(engine.zero_optimization_stage()),
        "wrapper": wrapper,
        "schedule": None if schedule is None else copy.deepcopy(schedule.state_dict()),
        "values": _schedulable_values(controller),
        "stepped": bool(engine.gqc_stepped),
    }


def write_gqc_state(checkpoint_dir: str, state: Dict[str, Any]) -> None:
    os.makedirs(checkpoint_dir, exist_ok=True)
    replace_atomically(state_file(checkpoint_dir, state["rank"]), lambda handle: torch.save(state, handle))


def latest_tag(engine, load_dir) -> Optional[str]:
    """DeepSpeed's rule for ``tag=None``: the tag in ``latest`` (``latest_universal``)."""
    name = "latest_universal" if engine.load_universal_checkpoint() else "latest"
    try:
        with open(os.path.join(load_dir, name)) as handle:
            return handle.read().strip()
    except OSError:
        return None


def agreed(read):
    """``read()`` on every rank; if any rank raises a :class:`CheckpointError`, every rank raises
    one naming that rank's problem (a lone refusal would leave the others waiting in DeepSpeed's
    collective load)."""
    state, error = None, None
    try:
        state = read()
    except CheckpointError as caught:
        error = str(caught)
    except Exception as caught:  # noqa: BLE001 -- any failure must reach the other ranks too
        error = f"{type(caught).__name__}: {caught}"
    world = world_rank_and_size()[1]
    if world > 1:
        errors = collectives.gather_objects(error)
        failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
        if failed and error is None:
            rank, message = failed[0]
            raise CheckpointError(f"rank {rank} refused the checkpoint: {message}")
    if error is not None:
        raise CheckpointError(error)
    return state


def read_gqc_state(checkpoint_dir, engine, controller, adapter) -> Dict[str, Any]:
    """This rank's GQC state of the checkpoint in ``checkpoint_dir``, checked against this engine;
    changes nothing."""
    rank, world = world_rank_and_size()
    path = state_file(checkpoint_dir, rank)
    if not os.path.isfile(path):
        others = sorted(name for name in os.listdir(checkpoint_dir)
                        if name.startswith("gqc_state_rank")) if os.path.isdir(checkpoint_dir) else []
        if not os.path.isdir(checkpoint_dir):
            why = "the directory does not exist"
        elif others:
            why = f"it has {len(others)} GQC state files, saved by another number of ranks"
        else:
            why = ("it has no gradient_quality_control state: saved by plain DeepSpeed (or by "
                   "deepspeed.initialize without a gradient_quality_control section)")
        raise CheckpointError(f"cannot resume GQC from DeepSpeed checkpoint {checkpoint_dir}: no {os.path.basename(path)}, "
                              f"{why}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"cannot read GQC state {path}: {error}") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not GQC DeepSpeed state (format {found!r}, expected {STATE_FORMAT!r})")
    if state.get("algorithm") != controller.ALGORITHM:
        raise CheckpointError(
            f"DeepSpeed checkpoint {checkpoint_dir} was saved by GQC algorithm {state.get('algorithm')!r}; "
            f"this engine runs {controller.ALGORITHM!r}")
    wrapper = state.get("wrapper")
    if not isinstance(wrapper, dict):
        raise CheckpointError(f"{path} has no wrapper state")
    mid_window = bool((wrapper.get("counters") or {}).get("num_draws"))
    if mid_window and state.get("world_size") != world:
        raise CheckpointError(
            f"DeepSpeed checkpoint {checkpoint_dir} was saved mid-window by {state.get('world_size')} ranks; "
            f"its accumulated gradient partitions cannot be resumed on {world}")
    saved_schedule, schedule = state.get("schedule"), engine.gqc_schedule
    if (saved_schedule is None) != (schedule is None):
        raise CheckpointError(
            f"DeepSpeed checkpoint {checkpoint_dir} was saved {'without' if saved_schedule is None else 'with'} "
            f"a gradient_quality_control.schedule; this engine runs {'with' if schedule is not None else 'without'} one")
    if schedule is not None:
        expected = set(schedule.state_dict())  # tsa's SynchronousSchedule: one entry per scheduled key
        if not isinstance(saved_schedule, dict) or set(saved_schedule) != expected:
            raise CheckpointError(
                f"DeepSpeed checkpoint {checkpoint_dir} schedules "
                f"{sorted(saved_schedule) if isinstance(saved_schedule, dict) else saved_schedule}, "
                f"this engine's schedule {sorted(expected)}")
    values = state.get("values")
    if (not isinstance(values, list) or len(values) != len(controller.param_groups)
            or not all(isinstance(group, dict) for group in values)):
        raise CheckpointError(f"{path} holds values for {len(values) if isinstance(values, list) else 'no'} "
                              f"param groups, this optimizer has {len(controller.param_groups)}")
    if wrapper.get("optimizer") is not None:
        raise CheckpointError(f"{path} carries a torch optimizer state; DeepSpeed's own is the one to load")
    checkpoint_state.validate(wrapper, controller.ALGORITHM, controller.max_draws, adapter.check_accumulated)
    return state


def restore_gqc_state(engine, controller, state) -> None:
    """After DeepSpeed loaded its own state: the controller, its schedule and values."""
    controller.load_state_dict(state["wrapper"])  # "optimizer" None: DeepSpeed restored it
    if engine.gqc_schedule is not None:
        engine.gqc_schedule.load_state_dict(state["schedule"])
        # a torch scheduler's load_state_dict does not write its value back into the param
        # groups, and DeepSpeed may not restore them (elastic checkpoints, load_optimizer_states
        # False): the schedule's position is the values it last wrote
        for group, values in zip(controller.param_groups, state["values"]):
            group.update(values)
    engine.gqc_stepped = bool(state.get("stepped", False))
