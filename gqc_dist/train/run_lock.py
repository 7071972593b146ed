"""One run at a time in a run directory: a lock that the kernel drops when its holder dies.

``<out_dir>/gqc-train.lock`` is locked with POSIX record locks (``fcntl.lockf``), which work on
local file systems and on NFS (through its lock manager), and which the kernel releases when the
holding process exits, however it exits: a crashed or killed run never leaves the directory
locked. While held, the file records the holder (host, pid, start time, command line) for the
refusal message; it is emptied again on release, so a refused start changes no byte of the run.

Two byte ranges, so that every rank of a job holds a share of the directory:

* byte 0, exclusive: rank 0 of the run that owns the directory;
* byte 1, shared: every rank of that run (rank 0 first checks that no rank of an earlier run
  still holds it, for instance a survivor whose launcher died).

POSIX locks belong to the process, and closing any descriptor of the file drops them: only this
module opens the lock file, once per process. A file system without locks (some Lustre mounts)
gets a warning, not a refusal.
"""

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import List, Optional

from gqc_dist.errors import TrainError
from gqc_dist.train.storage import cause_of

LOCK_NAME = "gqc-train.lock"
_OWNER, _MEMBERS = 0, 1  # byte offsets
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class _Held(Exception):
    """The range is locked by another process."""


class RunDirectoryInUse(TrainError):
    """Another gqc-train run holds the run directory."""


_RECORD_WAIT_S = 2.0  # how long a refused start waits for the holder's record to appear


def _describe(holder: str) -> Optional[str]:
    try:
        owner = json.loads(holder)
        return (f"gqc-train pid {owner['pid']} on host {owner['host']} (started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner['started']))})")
    except (ValueError, KeyError, TypeError):
        return None


def _holder(fd: int, fallback: str) -> str:
    """Who holds the lock, from its record. The holder writes the record just after it takes
    the lock, so a start refused in that instant waits briefly for it (a run that just ended has
    emptied it: then ``fallback``)."""
    deadline = time.monotonic() + _RECORD_WAIT_S
    while True:
        described = _describe(RunLock._read(fd))
        if described or time.monotonic() >= deadline:
            return described or fallback
        time.sleep(0.02)


class RunLock:
    """The lock of one run directory, held by this process until :meth:`release` (or exit)."""

    _held: List["RunLock"] = []  # this process's locks, for release_all()

    @classmethod
    def held(cls, out_dir: Path) -> "RunLock":
        """A lock for ``out_dir`` that :func:`release_all` gives up (the CLI calls it when a run
        ends, however it ends, so that an in-process caller can run again)."""
        lock = cls(out_dir)
        cls._held.append(lock)
        return lock

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: Optional[int] = None
        self._owner = False
        self.supported = True

    def acquire_owner(self) -> None:
        """Rank 0: create the directory and the lock file if needed, take the directory, check
        that no rank of an earlier run is alive in it, record this process. Raises
        :class:`RunDirectoryInUse` naming the holder, or a :class:`TrainError` naming the path
        and cause when the directory cannot be written (read-only, full, permission)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise TrainError(f"cannot lock the run directory: cannot write {self.path}: "
                             f"{cause_of(error, self.path)}") from error
        try:
            self._lock(fd, fcntl.LOCK_EX, _OWNER)
        except _Held:
            holder = _holder(fd, "another gqc-train process")
            os.close(fd)
            raise RunDirectoryInUse(f"{self.path.parent} is in use by {holder}: one run at a time per "
                                    "directory (wait for it to end, stop it, or choose another --out-dir)") from None
        except OSError as error:
            if error.errno in _UNSUPPORTED:
                self._unsupported(fd, error)
                return
            os.close(fd)
            raise TrainError(f"cannot lock {self.path}: {cause_of(error, self.path)}") from error
        try:  # no rank of an earlier run may still be alive here (its launcher may have died)
            self._lock(fd, fcntl.LOCK_EX, _MEMBERS)
        except _Held:
            # the owner lock was free, so no holder is about to write a record: read it as it is
            holder = _describe(self._read(fd)) or "its rank 0 is gone"
            os.close(fd)
            raise RunDirectoryInUse(f"{self.path.parent} is in use: ranks of an earlier run are still running in "
                                    f"it ({holder}); stop them first") from None
        self._lock(fd, fcntl.LOCK_SH, _MEMBERS)  # a share, like every other rank of this run
        self._fd, self._owner = fd, True
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "command": " ".join(sys.argv)[:400]}
        data = (json.dumps(record) + "\n").encode()
        try:  # write, then cut the tail of a killed holder's longer record (readers wait for valid JSON)
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except OSError as error:
            self.release()
            raise TrainError(f"cannot write {self.path}: {cause_of(error, self.path)}") from error

    def join(self) -> None:
        """Ranks other than 0, after rank 0 took the directory: hold a share of it, so that no
        new run can start here while this rank lives. A rank that does not see the file (a
        node-local directory on another host) holds nothing; that is not an error."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        try:
            self._lock(fd, fcntl.LOCK_SH, _MEMBERS)
        except (_Held, OSError):
            os.close(fd)
            return
        self._fd = fd

    def release(self) -> None:
        """Give the directory up (rank 0 empties the record first). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._owner:
                os.ftruncate(fd, 0)
        except OSError:
            pass  # a read-only or full file system: the lock still goes with the descriptor
        finally:
            self._owner = False
            os.close(fd)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _lock(fd: int, kind: int, offset: int) -> None:
        try:
            fcntl.lockf(fd, kind | fcntl.LOCK_NB, 1, offset, os.SEEK_SET)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EAGAIN):  # POSIX allows either for "held"
                raise _Held() from None
            raise

    @staticmethod
    def _read(fd: int) -> str:
        try:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip()
        except OSError:
            return ""

    def _unsupported(self, fd: int, error: OSError) -> None:
        os.close(fd)
        self.supported = False
        print(f"gqc-train: warning: the file system of {self.path.parent} does not support locks "
              f"({cause_of(error)}): a second run started into this directory would not be refused",
              file=sys.stderr)


def release_all() -> None:
    """Release every lock :meth:`RunLock.held` handed out in this process."""
    while RunLock._held:
        RunLock._held.pop().release()
