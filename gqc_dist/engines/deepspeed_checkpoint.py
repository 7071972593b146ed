"""GQC state in DeepSpeed checkpoints: ``engine.save_checkpoint`` / ``load_checkpoint`` of an
engine from ``gqc_dist.frontends.deepspeed.initialize`` carry the controller with no extra call.

Each rank writes its :class:`~gqc_dist.core.session.GQCSession` envelope to
``<save_dir>/<tag>/gqc_state_rank{r}.pt`` (atomically, before DeepSpeed's own files, so
``latest`` only names complete checkpoints): the wrapper state without the torch optimizer
(DeepSpeed saves that itself, per rank and partitioned; rank 0's copy loaded on every rank was
what made hand-made resumes drift), the value schedule and the schedulable values, and
the accumulated window when saved mid-window (the adapter's partitions, ZeRO-3's micro-step id).
Loading checks every rank's file before DeepSpeed loads anything, and one rank's refusal is
every rank's (a lone refusal would leave the others in DeepSpeed's collective load).
"""

import os
from typing import Any, Dict, Optional

from gqc_dist.core import collectives, session as gqc_session
from gqc_dist.core.packet import world_rank_and_size
from gqc_dist.errors import CheckpointError


def engine_state(engine) -> Dict[str, Any]:
    """What DeepSpeed adds to the envelope: its ZeRO stage and whether the last call stepped."""
    return {"zero_stage": int(engine.zero_optimization_stage()), "stepped": bool(engine.gqc_stepped)}


def latest_tag(engine, load_dir) -> Optional[str]:
    """DeepSpeed's rule for ``tag=None``: the tag in ``latest`` (``latest_universal`` when the
    engine loads universal checkpoints; ``engine`` ``None``: before there is one)."""
    name = "latest_universal" if engine is not None and engine.load_universal_checkpoint() else "latest"
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


def read_gqc_state(checkpoint_dir, session, adapter) -> Dict[str, Any]:
    """This rank's GQC envelope of the checkpoint in ``checkpoint_dir``, checked against this
    engine's ``session``; changes nothing."""
    if os.path.isdir(checkpoint_dir):
        others = sorted(name for name in os.listdir(checkpoint_dir) if name.startswith("gqc_state_rank"))
        why = (f"it has {len(others)} GQC state files, saved by another number of ranks" if others else
               "it has no gradient_quality_control state: saved by plain DeepSpeed (or by deepspeed.initialize "
               "without a gradient_quality_control section)")
    else:
        why = "the directory does not exist"
    state = gqc_session.read(checkpoint_dir, why)
    where = f"DeepSpeed checkpoint {checkpoint_dir}"
    state = session.check(state, where, adapter.check_accumulated)
    if state["wrapper"].get("optimizer") is not None:
        path = gqc_session.state_path(checkpoint_dir, world_rank_and_size()[0])
        raise CheckpointError(f"{path} carries a torch optimizer state; DeepSpeed's own is the one to load")
    return state
