"""A gqc-train run directory: what a run leaves there, how it is protected and resumed.

* A new run refuses a directory that already holds a run (``--resume`` continues it,
  ``--overwrite`` replaces it) and a path that is a file; every rank agrees before any writes.
* One run at a time: :func:`claim` takes the directory's lock (``run_lock``) once the run is
  ready to write, re-checks under it, and only then clears a run being overwritten.
* ``checkpoints/step_NNNNNN/rank{r}.pt`` (each rank its own state, written atomically) and the
  ``checkpoints/latest`` pointer (renamed into place once every rank's file is complete: a
  checkpoint whose writing failed on any rank is never named by it). A checkpoint taken between
  optimizer steps (a stop signal) is ``step_NNNNNN_micro_MMMMMMMM``. A diverged run points
  ``latest`` back at its last good checkpoint (``health``), the newer folders left in place.
* Checkpoints load with ``torch.load(weights_only=True)``: tensors and plain containers only,
  nothing that runs code. A missing, truncated, corrupt or foreign checkpoint is a
  :class:`TrainError` naming the file, raised before anything in the directory changes.
* Every write goes through ``storage``: a full disk, a read-only or vanished directory is a
  :class:`storage.RunFileError` naming the path and the cause, on every rank.
"""

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from gqc_dist.core import collectives
from gqc_dist.errors import GQCError, TrainError
from gqc_dist.train.run_lock import LOCK_NAME, RunLock
from gqc_dist.train.storage import RunFileError, save_tensors, write_atomic, writing

__all__ = ["prepare", "claim", "saved_config", "Checkpoints", "truncate_metrics", "write_atomic", "RUN_FILES"]

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "training.png", "checkpoints")


def prepare(out_dir: Path, resume: bool, overwrite: bool, rank: int) -> None:
    """Check ``out_dir`` for a new run (or a resumed one) on every rank and agree; writes nothing
    (:func:`claim` takes the directory once the run is ready). Raises :class:`TrainError` on
    every rank, naming the path."""
    problem = next((p for p in collectives.gather_objects(_problem(out_dir, resume, overwrite)) if p), None)
    if problem:
        raise TrainError(problem)


def claim(out_dir: Path, lock: RunLock, resume: bool, overwrite: bool, rank: int,
          resumed_from: Optional[str], device: torch.device) -> None:
    """Take ``out_dir`` for this run: rank 0 locks it (refused, naming the holder, while another
    run lives there) and re-checks what :func:`prepare` checked, now that no other run can
    start (a resume also checks that ``latest`` still names ``resumed_from``); every rank agrees;
    the other ranks then hold a share of the lock; with ``overwrite`` rank 0 clears the old
    run. Raises :class:`TrainError` on every rank."""
    problem = None
    if rank == 0:
        try:
            lock.acquire_owner()
            problem = _problem(out_dir, resume, overwrite)
            latest = Checkpoints.latest_name(out_dir)
            if problem is None and resume and latest != resumed_from:
                problem = (f"--resume: {out_dir} changed while this run was starting (latest checkpoint "
                           f"{resumed_from} became {latest}): start it again")
        except TrainError as error:
            problem = str(error)
    failed = next((p for p in collectives.gather_objects(problem) if p), None)
    if failed:
        lock.release()
        raise TrainError(failed)
    if rank != 0:
        lock.join()
    if overwrite and rank == 0:
        with writing(out_dir, "(clearing the run being overwritten)"):
            for name in RUN_FILES:
                path = out_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    collectives.barrier(device)


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
    foreign = out_dir.is_dir() and any(path.name != LOCK_NAME for path in out_dir.iterdir())
    if not held and foreign and overwrite:
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

    def __init__(self, out_dir: Path, rank: int, world: int, device: Optional[torch.device] = None):
        self.root = out_dir / "checkpoints"
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")
        #: the folder the run resumed from (``load_latest``)
        self.loaded: Optional[str] = None

    @staticmethod
    def latest_name(out_dir: Path) -> Optional[str]:
        """The folder ``out_dir/checkpoints/latest`` names, or ``None``."""
        try:
            return (out_dir / "checkpoints" / "latest").read_text().strip() or None
        except OSError:
            return None

    @staticmethod
    def folder_name(step: int, micro_step: Optional[int] = None) -> str:
        """``step_000012`` right after optimizer step 12; ``step_000012_micro_00000031`` at
        micro-step 31, between steps (a stop signal): never the name of another checkpoint."""
        return f"step_{step:06d}" + (f"_micro_{micro_step:08d}" if micro_step is not None else "")

    def save(self, step: int, engine, extra: Dict[str, Any], micro_step: Optional[int] = None) -> Path:
        """Write this rank's part of the checkpoint after optimizer step ``step`` (or at
        ``micro_step``, between steps); then, once every rank's part is complete, rank 0 points
        ``latest`` at it. A failed write on any rank is a :class:`RunFileError` on every rank and
        leaves ``latest`` as it was. Returns the checkpoint's folder."""
        folder = self.root / self.folder_name(step, micro_step)
        error = None
        try:
            with writing(folder, "checkpoint"):
                # not parents=True: a run directory removed under a running job must not be recreated
                self.root.mkdir(exist_ok=True)
                folder.mkdir(exist_ok=True)
                self._write(folder, engine, extra)
        except RunFileError as caught:
            error = str(caught)
        self._agree(error)
        if self.rank == 0:  # after every rank's file is complete; atomic, so a kill never leaves half a name
            try:
                write_atomic(self.root / "latest", folder.name + "\n", "the checkpoint pointer")
            except RunFileError as caught:
                error = str(caught)
        self._agree(error)
        return folder

    def point_latest(self, name: str) -> None:
        """Rank 0 only: point ``latest`` back at the checkpoint ``name`` (a diverged run's last good
        one, so that ``--resume`` continues from it; the newer folders stay, unnamed). A failure is a
        :class:`RunFileError` on this rank alone: call it where no collective follows."""
        write_atomic(self.root / "latest", name + "\n", "the checkpoint pointer")

    def _write(self, folder: Path, engine, extra: Dict[str, Any]) -> None:
        state = {"world_size": self.world, "extra": extra}
        engine.save_files(folder)  # DeepSpeed's checkpoint, or the resharding model and optimizer (DCP)
        state["engine"] = engine.state_dict()
        # resharded: the rest of the state is rank-independent, rank 0 writes it
        name = "state.pt" if engine.resharding else f"rank{self.rank}.pt"
        if self.rank == 0 or not engine.resharding:
            save_tensors(state, folder / name)

    def _agree(self, error: Optional[str]) -> None:
        """Every rank raises the first failing rank's error (a lone failure would leave the other
        ranks waiting in the next collective)."""
        failures = [(rank, message) for rank, message in enumerate(collectives.gather_objects(error)) if message]
        if failures:
            rank, message = failures[0]
            prefix = f"rank {rank}: " if self.world > 1 else ""
            raise RunFileError(prefix + message, self.root, message)

    def load_latest(self, engine) -> Optional[Dict[str, Any]]:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        folder = self.root / pointer.read_text().strip()
        self.loaded = folder.name
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
            engine.load_files(folder)
            engine.load_state_dict(state["engine"])
        except GQCError as error:
            raise TrainError(f"--resume: checkpoint {path} does not fit this run: {error}") from error
        except (RuntimeError, KeyError, ValueError) as error:
            raise TrainError(f"--resume: checkpoint {path} does not fit this run (another model, "
                             f"engine or algorithm?): {str(error).splitlines()[0]}") from error
        return state["extra"]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics records up to optimizer step ``step`` (the checkpoint resumed from), less a
    finished run's final evaluation. A last line cut short by a killed run (or a full disk) is
    dropped; a malformed line before it is an error."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise TrainError(f"--resume: {path} line {number} is not JSON: {line[:80]!r}") from None
        if record["step"] <= step and not (record["kind"] == "val" and "batches" in record):
            kept.append(line)  # not a finished run's final evaluation: the resumed run ends with its own
    write_atomic(path, "".join(line + "\n" for line in kept), "metrics")


