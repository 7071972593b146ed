"""Replacing a file so that a reader, a crash or a full disk sees the old version or the new one,
never half of one: every checkpoint and state file the library and gqc-train write goes through
:func:`replace_atomically`.

The temporary file carries the writer's host, pid and a random suffix, so two writers (another
rank, another job writing the same directory by mistake) never collide on one temporary name, and
a failed write removes its own temporary file (which also gives back the space it took).
"""

import contextlib
import os
import secrets
import socket
from pathlib import Path
from typing import BinaryIO, Callable, Union


def temporary_name(path: Union[str, Path]) -> Path:
    """A temporary name beside ``path`` that no other writer can pick: host, pid, random."""
    path = Path(path)
    host = socket.gethostname().split(".")[0] or "host"
    return path.with_name(f".{path.name}.{host}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def replace_atomically(path: Union[str, Path], write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` into a temporary file beside ``path``, flush it to the device, rename it
    over ``path``. Any failure (the ``OSError`` of a full disk, whatever ``write`` raises) removes
    the temporary file and propagates unchanged; ``path`` keeps its previous content."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
