"""A gqc-train run directory: what a run leaves there, how it is protected and resumed.

* A new run refuses a directory that already holds a run (``--resume`` continues it,
  ``--overwrite`` replaces it) and a path that is a file; every rank agrees before any writes.
* ``checkpoints/step_NNNNNN/rank{r}.pt`` (each rank its own state, written atomically) and the
  ``checkpoints/latest`` pointer (renamed into place once every rank's file is complete).
* Checkpoints load with ``torch.load(weights_only=True)``: tensors and plain containers only,
  nothing that runs code. A missing, truncated, corrupt or foreign checkpoint is a
  :class:`TrainError` naming the file, raised before anything in the directory changes.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..errors import GQCError, TrainError

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "training.png", "checkpoints")


def prepare(out_dir: Path, resume: bool, overwrite: bool, rank: int) -> None:
    """Check ``out_dir`` for a new run (or a resumed one) on every rank, agree, then (rank 0)
    clear it when ``overwrite``. Raises :class:`TrainError` on every rank, naming the path."""
    problem = _problem(out_dir, resume, overwrite)
    if dist.is_initialized():  # every rank checks before rank 0 writes, and all agree
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, problem)
        problem = next((p for p in flags if p), None)
    if problem:
        raise TrainError(problem)
    if overwrite and rank == 0 and out_dir.exists():
        for name in RUN_FILES:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    if dist.is_initialized():
        dist.barrier()


def _problem(out_dir: Path, resume: bool, overwrite: bool) -> Optional[str]:
    if out_dir.exists() and not out_dir.is_dir():
        return f"--out-dir {out_dir} is a file, not a directory"
    held = sorted(name for name in RUN_FILES if (out_dir / name).exists()) if out_dir.is_dir() else []
    if resume:
        if overwrite:
            return "--resume and --overwrite exclude each other"
        if not (out_dir / "config.json").exists():
            return f"--resume: {out_dir} holds no run (no config.json)"
        return None
    if held and not overwrite:
        return (f"{out_dir} already holds a run ({', '.join(held)}): pass --resume to continue it, "
                "--overwrite to replace it, or choose another --out-dir")
    if out_dir.is_dir() and not held and any(out_dir.iterdir()) and overwrite:
        return f"--overwrite: {out_dir} is not empty and holds no run; refusing to clear it"
    return None


def saved_config(out_dir: Path) -> Dict[str, Any]:
    """The config a run was started with (its ``config.json``)."""
    path = out_dir / "config.json"
    if not path.is_file():
        raise TrainError(f"--resume: {out_dir} holds no run (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise TrainError(f"--resume: cannot read {path}: {error}") from error
    if not isinstance(config, dict):
        raise TrainError(f"--resume: {path} does not hold a config object")
    return config


class Checkpoints:
    """Per-rank checkpoint files under ``out_dir/checkpoints`` and the ``latest`` pointer."""

    def __init__(self, out_dir: Path, rank: int, world: int):
        self.root = out_dir / "checkpoints"
        self.rank, self.world = rank, world

    def save(self, step: int, engine, extra: Dict[str, Any]) -> None:
        folder = self.root / f"step_{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        state = {"world_size": self.world, "extra": extra}
        if engine.ds_engine is not None:
            engine.ds_engine.save_checkpoint(str(folder / "deepspeed"), tag="state")
        state["engine"] = engine.state_dict()
        if engine.resharding:  # model and optimizer resharded by DCP; the rest is rank-independent
            dcp.save(engine.sharded_state_dict(), checkpoint_id=str(folder / "dcp"))
            name = "state.pt"
        else:
            name = f"rank{self.rank}.pt"
        if self.rank == 0 or not engine.resharding:
            tmp = folder / (name + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, folder / name)
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:  # after every rank's file is complete; atomic, so a kill never leaves half a name
            write_atomic(self.root / "latest", folder.name + "\n")

    def load_latest(self, engine) -> Optional[Dict[str, Any]]:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        folder = self.root / pointer.read_text().strip()
        resharded = (folder / "state.pt").is_file()
        path = folder / ("state.pt" if resharded else f"rank{self.rank}.pt")
        if resharded != engine.resharding:
            raise TrainError(f"--resume: {folder} was saved {'with' if resharded else 'without'} "
                             "torch.distributed.checkpoint, this engine saves the other way")
        if not path.is_file():
            raise TrainError(f"--resume: {pointer} names {folder.name}, which has no {path.name}")
        try:
            state = torch.load(path, weights_only=True, map_location=engine.device)
        except Exception as error:  # noqa: BLE001 -- a corrupt file makes the unpickler raise anything
            raise TrainError(f"--resume: checkpoint {path} cannot be read (truncated, corrupt or not a "
                             f"gqc-train checkpoint): {str(error).splitlines()[0]}") from error
        if not isinstance(state, dict) or not {"world_size", "extra", "engine"} <= set(state):
            raise TrainError(f"--resume: {path} is not a gqc-train checkpoint")
        if state.get("world_size") != self.world and not resharded:
            raise TrainError(f"--resume: checkpoint {folder} was written by {state.get('world_size')} ranks, "
                             f"this run has {self.world} (only dense FSDP2 checkpoints reshard)")
        try:
            if engine.ds_engine is not None:
                engine.ds_engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
            if resharded:
                sharded = engine.sharded_state_dict()  # this world's layout, filled in place
                dcp.load(sharded, checkpoint_id=str(folder / "dcp"))
                engine.load_sharded_state_dict(sharded)
            engine.load_state_dict(state["engine"])
        except GQCError as error:
            raise TrainError(f"--resume: checkpoint {path} does not fit this run: {error}") from error
        except (RuntimeError, KeyError, ValueError) as error:
            raise TrainError(f"--resume: checkpoint {path} does not fit this run (another model, "
                             f"engine or algorithm?): {str(error).splitlines()[0]}") from error
        return state["extra"]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics records up to optimizer step ``step`` (the checkpoint resumed from). A last
    line cut short by a killed run is dropped; a malformed line before it is an error."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise TrainError(f"--resume: {path} line {number} is not JSON: {line[:80]!r}") from None
        if record["step"] <= step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a kill leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


