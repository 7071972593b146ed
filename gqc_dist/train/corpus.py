"""Byte-level corpus and batches for ``gqc-train``; needs no download.

The default corpus is this Python's own standard library: its ``.py`` source files (found at
run time under ``sysconfig.get_paths()["stdlib"]``, skipping ``site-packages``,
``dist-packages``, ``test``/``tests``, ``idlelib``, ``lib2to3`` and ``__pycache__``
directories at any depth), read as bytes. One token is one byte (vocabulary 256).

Everything is deterministic on a given machine (same Python installation, same files):
files are taken in sorted relative-path order, and a file goes to validation iff
``zlib.crc32(relative_path) % 1000 < val_fraction * 1000``.
"""

import math
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from gqc_dist.errors import GQCConfigError

SEPARATOR = 0
"""Byte (NUL) appended after every file when files are concatenated."""

SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})


def _stdlib_files() -> List[Tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS]
        for name in files:
            if name.endswith(".py"):
                full = Path(directory) / name
                found.append((full.relative_to(root).as_posix(), full))
    return sorted(found)


def _user_files(root: Path) -> List[Tuple[str, Path]]:
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d != "__pycache__"]
        for name in files:
            full = Path(directory) / name
            if not name.startswith(".") and full.is_file():
                found.append((full.relative_to(root).as_posix(), full))
    return sorted(found)


def corpus_files(path: Union[str, os.PathLike, None] = None) -> List[Tuple[str, Path]]:
    """``(relative_path, absolute_path)`` of the corpus files in the order they are read.

    ``path=None``: the standard library's ``.py`` files; a directory: every non-hidden regular
    file under it (any extension, hidden directories and ``__pycache__`` skipped); a file: that
    file alone (its relative path is its name).
    """
    if path is None:
        return _stdlib_files()
    root = Path(path)
    if root.is_file():
        return [(root.name, root)]
    if root.is_dir():
        return _user_files(root)
    raise GQCConfigError(f"corpus path {str(root)!r} is neither a file nor a directory")


def _is_validation(relative_path: str, val_fraction: float) -> bool:
    return zlib.crc32(relative_path.encode("utf-8")) % 1000 < val_fraction * 1000


def load_corpus(max_bytes: Optional[int] = 4_000_000, val_fraction: float = 0.05,
                path: Union[str, os.PathLike, None] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load the corpus as ``(train, val)``: 1-D ``torch.uint8`` tensors of bytes (= tokens).

    Args:
        max_bytes: cap on the bytes read, train and validation together, separators included
            (``None``: no cap). Files are taken in sorted relative-path order until the cap;
            the last one is cut short. Only the files needed are read.
        val_fraction: in ``(0, 1)``. With several files, a file is validation iff
            ``zlib.crc32(relative_path) % 1000 < val_fraction * 1000`` (whole files, so the
            validation share of bytes is only about ``val_fraction``). A single file
            (``path`` naming a file) is split by bytes instead: its last
            ``ceil(val_fraction * n)`` bytes (after the cap) are validation.
        path: a directory or a file of your own text, instead of the standard library
            (see :func:`corpus_files`).

    Each file's bytes are followed by one :data:`SEPARATOR` byte. Raises ``ValueError`` if the
    corpus is empty or the train or validation split ends up empty.
    """
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                  or max_bytes < 1):
        raise GQCConfigError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 < val_fraction < 1.0:
        raise GQCConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    files = corpus_files(path)
    source = "the standard library" if path is None else repr(str(path))
    single_file = path is not None and Path(path).is_file()

    parts: Dict[bool, List[bytes]] = {False: [], True: []}
    total = text = 0
    for relative, full in files:
        if max_bytes is not None and total >= max_bytes:
            break
        content = full.read_bytes()
        text += len(content)
        data = content + bytes([SEPARATOR])
        if max_bytes is not None:
            data = data[: max_bytes - total]
        total += len(data)
        parts[not single_file and _is_validation(relative, val_fraction)].append(data)
    if text == 0:
        raise GQCConfigError(f"corpus from {source} is empty ({len(files)} files, 0 bytes of text)")
    if single_file:
        data = parts[False][0]
        cut = len(data) - max(1, math.ceil(val_fraction * len(data)))
        parts = {False: [data[:cut]], True: [data[cut:]]}
    train, val = b"".join(parts[False]), b"".join(parts[True])
    if not val:
        raise GQCConfigError(
            f"validation split of the corpus from {source} is empty ({len(files)} files, "
            f"{total} bytes read, val_fraction={val_fraction}): raise val_fraction or max_bytes, "
            f"or use more files")
    if not train:
        raise GQCConfigError(f"training split of the corpus from {source} is empty ({total} bytes "
                         f"read, val_fraction={val_fraction}): lower val_fraction")
    return (torch.frombuffer(bytearray(train), dtype=torch.uint8),
            torch.frombuffer(bytearray(val), dtype=torch.uint8))


def _check_data(data: torch.Tensor, seq_len: int) -> None:
    if not isinstance(data, torch.Tensor) or data.dim() != 1:
        raise GQCConfigError("data must be a 1-D tensor of byte tokens")
    if data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool:
        raise GQCConfigError(f"data must hold integer tokens, got dtype {data.dtype}")
    if data.numel() < seq_len + 1:
        raise GQCConfigError(f"data holds {data.numel()} tokens; seq_len={seq_len} needs at least "
                         f"{seq_len + 1}")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GQCConfigError(f"{name} must be a positive int, got {value!r}")


def _windows(data: torch.Tensor, offsets: torch.Tensor, seq_len: int):
    seq = data[offsets.unsqueeze(1) + torch.arange(seq_len + 1)].long()
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


class ByteBatches:
    """Random ``seq_len``-byte windows of ``data``; this rank's share of one global stream.

    Each :meth:`next` draws one GLOBAL batch: ``batch_size * world_size`` offsets, uniform in
    ``[0, len(data) - seq_len - 1]``, from a ``torch.Generator`` seeded with ``seed``; rank
    ``r`` takes rows ``[r * batch_size, (r + 1) * batch_size)``. Ranks ``0..W-1`` concatenated
    therefore equal the single-process batch of ``batch_size * world_size`` rows, whatever the
    world size. ``len(data)`` must be at least ``seq_len + 1`` tokens.

    Attributes:
        tokens_per_draw: global tokens (= bytes) per draw, ``batch_size * world_size * seq_len``.
        draws: how many batches have been drawn.
    """

    def __init__(self, data: torch.Tensor, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                            ("world_size", world_size)):
            _positive(name, value)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise GQCConfigError(f"seed must be a non-negative int, got {seed!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise GQCConfigError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        _check_data(data, seq_len)
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch_size = batch_size * world_size
        self.tokens_per_draw = self.global_batch_size * seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = 0

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(x, y)``: int64 CPU tensors ``[batch_size, seq_len]``, ``y`` = ``x``
        shifted one byte ahead."""
        offsets = torch.randint(0, self.data.numel() - self.seq_len, (self.global_batch_size,),
                                generator=self.generator)
        self.draws += 1
        mine = offsets[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return _windows(self.data, mine, self.seq_len)

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """Generator state and draw counter (plus the shape that defines the stream)."""
        return {"generator": self.generator.get_state(), "draws": self.draws, "seed": self.seed,
                "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
                "data_tokens": self.data.numel()}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next draws equal those the saved run would have made. Raises
        ``ValueError`` if the state is malformed or was saved with a different ``seq_len``,
        global batch size (``batch_size * world_size``) or data length."""
        if not isinstance(state, dict) or not {"generator", "draws"} <= set(state):
            raise GQCConfigError("ByteBatches state must be a dict with 'generator' and 'draws'")
        for key, mine in (("seq_len", self.seq_len), ("global_batch_size", self.global_batch_size),
                          ("data_tokens", self.data.numel())):
            if key in state and state[key] != mine:
                raise GQCConfigError(f"ByteBatches state has {key}={state[key]}, this stream has {mine}")
        generator = state["generator"]
        if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8:
            raise GQCConfigError("ByteBatches state 'generator' must be a uint8 tensor")
        self.generator.set_state(generator.clone())
        self.draws = int(state["draws"])


def evaluate_batches(data: torch.Tensor, seq_len: int, batch_size: int,
                     num_batches: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of ``num_batches`` validation batches ``(x, y)`` (int64
    ``[batch_size, seq_len]``): ``num_batches * batch_size`` windows at evenly spaced offsets
    from ``0`` to ``len(data) - seq_len - 1`` (windows overlap if ``data`` is short)."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                        ("num_batches", num_batches)):
        _positive(name, value)
    _check_data(data, seq_len)
    count = num_batches * batch_size
    last = data.numel() - seq_len - 1
    offsets = (torch.arange(count, dtype=torch.float64) * (last / max(count - 1, 1))).long()
    return [_windows(data, chunk, seq_len) for chunk in offsets.split(batch_size)]
