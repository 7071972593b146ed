"""The per-rank GQC state file, ``<checkpoint folder>/gqc_state_rank<r>.pt``, of the front ends
whose framework saves the model and optimizer itself (the Trainer, Accelerate's ``save_state``;
DeepSpeed's checkpoints hold theirs, in their own format, under the same name): counters, noise
estimate, value schedule and, mid-window, the accumulated gradient. No framework is imported."""

import os
from typing import Any, Dict

import torch

from gqc_dist.atomic_file import replace_atomically
from gqc_dist.core.packet import world_rank_and_size
from gqc_dist.errors import CheckpointError

#: format of the per-rank GQC file in Trainer / ``save_state`` checkpoints (DeepSpeed: its own)
STATE_FORMAT = "gqc_dist.integrations/1"


def state_path(directory: str, rank: int) -> str:
    """Rank ``rank``'s GQC state file in a checkpoint folder (every front end's, DeepSpeed's too)."""
    return os.path.join(directory, f"gqc_state_rank{rank}.pt")


def _is_dtensor(tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def controller_state(controller, schedule) -> Dict[str, Any]:
    """This rank's GQC state for a framework that saves the optimizer itself: counters, noise
    estimate, value schedule, and mid-window the accumulated gradient (FSDP2's DTensor shards as
    their local pieces, re-wrapped on load)."""
    wrapper = controller.state_dict(include_optimizer=False)
    if wrapper["accumulated_grads"] is not None:
        wrapper["accumulated_grads"] = [[grad.to_local() if grad is not None and _is_dtensor(grad) else grad
                                         for grad in grads] for grads in wrapper["accumulated_grads"]]
    rank, world = world_rank_and_size()
    return {"format": STATE_FORMAT, "algorithm": controller.ALGORITHM, "rank": rank, "world_size": world,
            "wrapper": wrapper, "schedule": None if schedule is None else schedule.state_dict()}


def write_state(directory: str, controller, schedule) -> str:
    """Write this rank's :func:`controller_state` to ``directory`` (atomically); returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = state_path(directory, world_rank_and_size()[0])
    state = controller_state(controller, schedule)
    replace_atomically(path, lambda handle: torch.save(state, handle))
    return path


def read_state(directory: str) -> Dict[str, Any]:
    """This rank's GQC state file in ``directory``; :class:`CheckpointError` naming what is wrong."""
    rank, world = world_rank_and_size()
    path = state_path(directory, rank)
    if not os.path.isfile(path):
        raise CheckpointError(f"cannot resume GQC from {directory}: no {os.path.basename(path)} (saved without "
                              "gradient_quality_control, or by another number of ranks)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"cannot read GQC state {path}: {error}") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not GQC state (format {STATE_FORMAT!r} expected)")
    mid_window = bool(state["wrapper"]["counters"].get("num_draws"))
    if mid_window and state.get("world_size") != world:
        raise CheckpointError(f"{path} was saved mid-window by {state.get('world_size')} ranks; its accumulated "
                              f"gradient cannot be resumed on {world}")
    return state


def restore_state(controller, schedule, state: Dict[str, Any]) -> None:
    """Load :func:`read_state`'s state into ``controller`` (accumulated gradients included)."""
    wrapper = dict(state["wrapper"])
    if wrapper["accumulated_grads"] is not None:
        from torch.distributed.tensor import DTensor

        groups = [group["params"] for group in controller.param_groups]
        wrapper["accumulated_grads"] = [
            [DTensor.from_local(grad.to(param.device), param.device_mesh, param.placements, run_check=False,
                                shape=param.shape, stride=param.stride())
             if grad is not None and _is_dtensor(param) else grad for grad, param in zip(grads, params)]
            for grads, params in zip(wrapper["accumulated_grads"], groups)]
    if (state.get("schedule") is None) != (schedule is None):
        raise CheckpointError("the checkpoint's GQC state and this run disagree on gradient_quality_control.schedule")
    controller.load_state_dict(wrapper)
    if schedule is not None:
        schedule.load_state_dict(state["schedule"])
