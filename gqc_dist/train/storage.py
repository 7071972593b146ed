"""Writing a run's files so that a failure is one clear line and never half a file.

Every write of gqc-train goes through here: a failure (disk full, read-only file system,
permission denied, a directory that vanished, quota) raises :class:`RunFileError` naming the path
and the cause in words, and leaves the previous version of the file in place (the atomic
replacement itself is the library's, :mod:`gqc_dist.atomic_file`).
"""

import contextlib
import errno
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from gqc_dist.atomic_file import replace_atomically
from gqc_dist.errors import TrainError

# errno -> what the user reads; anything else gets the system's own strerror
_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory (was the run directory moved or removed?)",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EISDIR: "is a directory",
    errno.EIO: "input/output error",
    errno.ESTALE: "stale file handle (the shared file system lost the file)",
    errno.EFBIG: "file too large",
}
# what torch.save raises (a RuntimeError without an errno) when its writes fail
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


class RunFileError(TrainError):
    """A run file could not be written (or read back); the message names the path and cause."""

    def __init__(self, message: str, path: Path, cause: str):
        super().__init__(message)
        self.path, self.cause = Path(path), cause


def cause_of(error: BaseException, path: Optional[Path] = None) -> str:
    """The cause of a failed file operation in a few words (``no space left on device``)."""
    code = getattr(error, "errno", None)
    if code in _CAUSES:
        return _CAUSES[code]
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if path is not None and any(marker in text for marker in _TORCH_WRITE_FAILURES) and _full(path):
        return _CAUSES[errno.ENOSPC]
    return text


def _full(path: Path) -> bool:
    """Whether the file system holding ``path`` has (next to) no space left for us."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 1 << 20


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Turn a failure inside the block into :class:`RunFileError` ("cannot write <what> <path>:
    <cause>"); a :class:`RunFileError` raised inside passes unchanged."""
    try:
        yield
    except RunFileError:
        raise
    except OSError as error:  # named by the file the user knows, not by a temporary one
        raise _error(what, path, error) from error
    except RuntimeError as error:
        if not any(marker in str(error) for marker in _TORCH_WRITE_FAILURES):
            raise
        raise _error(what, path, error) from error


def _error(what: str, path: Path, error: BaseException) -> RunFileError:
    cause = cause_of(error, path)
    return RunFileError(f"cannot write {what} {path}: {cause}", path, cause)


def _replace_atomically(path: Path, write: Callable[[object], None], what: str) -> None:
    """:func:`gqc_dist.atomic_file.replace_atomically`, a failure named by ``path`` and ``what``."""
    with writing(path, what):
        replace_atomically(path, write)


def write_atomic(path: Path, text: str, what: str = "file") -> None:
    """Write ``text`` to ``path`` so that a kill or a full disk leaves the old file or the new one,
    never half; a failure is a :class:`RunFileError` naming ``path``."""
    _replace_atomically(Path(path), lambda handle: handle.write(text.encode()), what)


class _RecordingWriter:
    """A file for ``torch.save`` that keeps the first ``OSError``: torch turns a failed write into
    a RuntimeError without the errno ("unexpected pos ..."), and the cause is what the user needs."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_tensors(obj, path: Path, what: str = "checkpoint") -> None:
    """``torch.save(obj)`` to ``path`` atomically (temporary file, fsync, rename); a failed write
    (a full disk included) is a :class:`RunFileError` naming ``path`` and the cause."""

    def write(handle):
        writer = _RecordingWriter(handle)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise

    _replace_atomically(Path(path), write, what)


class Appender:
    """An append-only text file written line by line and flushed at once (``metrics.jsonl``):
    each line reaches the file system when written, and a failure is a :class:`RunFileError`."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what
        with writing(self.path, what):
            self._handle = open(self.path, "a")

    def write_line(self, line: str) -> None:
        with writing(self.path, self.what):
            self._handle.write(line + "\n")
            self._handle.flush()

    def close(self) -> None:
        with writing(self.path, self.what):
            self._handle.close()
