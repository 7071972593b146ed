"""Signals a gqc-train rank acts on: a polite stop (SIGTERM, SIGUSR1) and its launcher's death.

* SIGTERM (Slurm at the time limit or on preemption, torchrun passing on its own) and SIGUSR1
  (what ``#SBATCH --signal=USR1@120`` sends ahead of the limit) only set a flag: the training loop
  sends it along with the micro-step's statistics all-reduce, so every rank sees that some rank
  was asked to stop at the same micro-step, and all of them checkpoint and exit together
  (``StopRequest``). A second signal changes nothing: Slurm signals every process of a step,
  and torchrun passes its own on, so a rank often gets two.
* A rank whose launcher dies (SIGKILL, the OOM killer) must not train on into the run directory:
  torchrun starts each rank in a session of its own, so nothing else ends it. Under a launcher
  each rank asks the kernel for SIGKILL when its parent exits (Linux ``PR_SET_PDEATHSIG``), and
  exits at once if the parent is already gone.
"""

import ctypes
import os
import signal
import sys
from typing import Callable

# the launcher environments gqc-train recognises (see engines.init_distributed)
_LAUNCHED_BY = ("TORCHELASTIC_RUN_ID", "RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
_PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunStopped(Exception):
    """Every rank stopped on a stop signal (after the checkpoint); ``str()`` is the line to print,
    ``code`` the exit status (128 + the signal's number, as a shell reports a signal)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class StopRequest:
    """The stop signal this process received (``signum``), if any; see :func:`install`."""

    def __init__(self):
        self.signum = 0

    def handle(self, signum, frame) -> None:  # noqa: ARG002 -- a signal handler's signature
        if not self.signum:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return bool(self.signum)


STOP = StopRequest()


def install() -> Callable[[], None]:
    """Turn SIGTERM and SIGUSR1 into a stop request (:data:`STOP`, cleared here); returns what
    puts the previous handlers back (an in-process caller, a test runner, keeps its own). Off
    the main thread (an embedding application) nothing is installed."""
    STOP.signum = 0
    previous = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, STOP.handle)
    except ValueError:  # not the main thread
        pass

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


def signal_name(signum: float) -> str:
    """``SIGTERM`` for 15; anything else (ranks asked with different signals): ``SIGTERM/SIGUSR1``."""
    if float(signum).is_integer() and int(signum) in [int(s) for s in STOP_SIGNALS]:
        return signal.Signals(int(signum)).name
    return "/".join(s.name for s in STOP_SIGNALS)


def launched() -> bool:
    """Whether a launcher (torchrun, mpirun, srun, deepspeed) started this process."""
    return any(key in os.environ for key in _LAUNCHED_BY)


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent (the launcher) exits; exit now if
    it has exited already. Linux only (elsewhere: ``False``, nothing done).

    Called early in the rank's life and only under a launcher: a run started from a shell must
    survive its shell (nohup). The parent is read before and after the request, so a launcher
    that died in between is noticed too."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # a launcher that died between the two reads; one that died before the first is not seen
    # (pid 1 is no sign: in a container the launcher itself may be pid 1)
    if os.getppid() != parent:
        print("gqc-train: the launcher of this rank is gone; exiting without touching the run directory",
              file=sys.stderr, flush=True)
        os._exit(1)
    return True
