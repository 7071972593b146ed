"""Reusable multi-process harness for ``torch.distributed`` tests.

In the spirit of DeepSpeed's ``tests/unit/common.py::DistributedTest`` and
torch's ``MultiProcessTestCase``, but as one plain function::

    from distributed_harness import run_distributed

    def _body(rank, world_size, scale):          # module level => picklable
        t = torch.full((1,), float(rank + 1)) * scale
        dist.all_reduce(t)
        return t.item()

    def test_sum():
        assert run_distributed(_body, 2, 10.0) == [30.0, 30.0]

``run_distributed(fn, world_size, *args, timeout=120, env=None, **kwargs)``
starts ``world_size`` real OS processes. Each one

* sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` (a fresh port per call),
  ``OMP_NUM_THREADS=1`` (and ``torch.set_num_threads(1)``), plus ``env``;
* initialises ``torch.distributed`` (gloo by default) against a fresh
  rendezvous: the parent hosts a ``TCPStore`` on an OS-assigned free port for
  the duration of the call, so there is no port race between calls;
* runs ``fn(rank, world_size, *args, **kwargs)``;
* destroys the process group and sends the return value back.

The parent returns the per-rank results as a list in rank order.

Failure behaviour (never hangs pytest):

* a rank raising -> :class:`DistributedRankError` naming the rank and carrying
  the child's full traceback text; the surviving ranks are killed at once;
* a rank dying without a result (``os._exit``, signal, segfault) ->
  :class:`DistributedRankError` with its exit code;
* not all ranks done within ``timeout`` seconds -> every survivor is killed
  and :class:`DistributedTimeoutError` (a ``TimeoutError``) names the ranks
  that did not finish.

Requirements and notes:

* ``fn``, ``args``, ``kwargs`` and return values must be picklable; ``fn`` must
  be a module-level function in an importable module (a pytest test module in
  ``tests/`` is fine with pytest's default ``prepend`` import mode: the child
  gets the parent's ``sys.path``).  Lambdas and closures do not work.
* Return values are serialised with plain ``pickle`` (tensors are copied, not
  shared through shared memory), so returning tensors is safe even though the
  child exits right after sending.
* By default children are started with the ``forkserver`` start method with
  ``torch`` preloaded in the fork server: the first call pays one torch import
  (~2 s here), later calls fork from a process that already imported torch.
  Pass ``start_method="spawn"`` for a completely fresh interpreter per rank.
  Measured here (2 cores, loaded machine), trivial all_reduce body: first
  call ~2-4 s (fork server imports torch), then ~0.15 s for 2 ranks and
  ~0.3 s for 4 ranks; ``spawn`` costs 5-10 s (2 ranks) / ~15 s (4 ranks) per
  call. Heavy imports of the body's module (deepspeed, ...) are paid per rank
  per call unless listed with :func:`preload_in_forkserver`. ``env`` is applied
  in each rank before ``fn`` runs but *after* the preloaded imports, so an
  environment variable read at import time of a preloaded module (e.g.
  ``DS_ACCELERATOR`` for deepspeed) must be set in the parent before the
  first call, or use ``start_method="spawn"``.
* Harness options are keyword-only and reserved: ``timeout``, ``env``,
  ``backend``, ``init_process_group``, ``start_method``. Any other keyword
  argument goes to ``fn``.
* ``init_process_group=False`` skips the process-group setup: the harness
  only sets the environment (``MASTER_PORT`` is then a free port found by
  binding port 0) so ``fn`` can call ``init_process_group("gloo")`` with
  ``env://`` itself, e.g. to test launcher-environment detection.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "run_distributed",
    "DistributedRankError",
    "DistributedTimeoutError",
    "find_free_port",
    "preload_in_forkserver",
    "torchrun_command",
    "launched",
    "run_launcher",
    "children",
]

MASTER_ADDR = "127.0.0.1"
# Seconds to wait, after the first failure arrives, for other ranks' reports
# that are already on their way (they are included in the error message).
_FAILURE_GRACE_S = 0.2
_KILL_GRACE_S = 2.0


class DistributedRankError(RuntimeError):
    """A rank raised (or died). ``.rank`` is the root-cause rank (a rank that
    died without a result, else the earliest exception by the system-wide
    monotonic clock), ``.child_traceback`` its traceback text,
    ``.failures`` maps every rank
    that reported a failure before the others were killed to its text."""

    def __init__(self, rank: int, child_traceback: str, failures: dict[int, str]):
        self.rank = rank
        self.child_traceback = child_traceback
        self.failures = dict(failures)
        msg = [f"rank {rank} failed:\n{child_traceback.rstrip()}"]
        for other in sorted(failures):
            if other != rank:
                msg.append(f"(also) rank {other} failed:\n{failures[other].rstrip()}")
        super().__init__("\n\n".join(msg))


class DistributedTimeoutError(TimeoutError):
    """Not every rank finished within the timeout. ``.ranks`` lists the
    unfinished ranks (all of them were killed)."""

    def __init__(self, ranks: list[int], timeout: float, world_size: int):
        self.ranks = list(ranks)
        self.timeout = timeout
        super().__init__(
            f"ranks {self.ranks} of world_size {world_size} did not finish "
            f"within {timeout:g} s; all unfinished ranks were killed"
        )


def find_free_port(host: str = MASTER_ADDR) -> int:
    """A TCP port that was free a moment ago (bind to port 0, then close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# child side
# --------------------------------------------------------------------------

def _send(conn, payload) -> None:
    conn.send_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))


class _Reported(Exception):
    """fn raised and the error was already sent to the parent."""


def _worker(rank, world_size, fn, args, kwargs, conn, port, env, backend,
            init_pg, pg_timeout_s):
    try:
        os.environ.update(
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
                "GROUP_RANK": "0",
                "MASTER_ADDR": MASTER_ADDR,
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }
        )
        if env:
            os.environ.update({k: str(v) for k, v in env.items()})

        import torch
        import torch.distributed as dist

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

        if init_pg:
            store = dist.TCPStore(
                MASTER_ADDR, port, world_size, is_master=False,
                timeout=timedelta(seconds=pg_timeout_s),
            )
            dist.init_process_group(
                backend=backend, store=store, rank=rank, world_size=world_size,
                timeout=timedelta(seconds=pg_timeout_s),
            )
        try:
            result = fn(rank, world_size, *args, **kwargs)
        except BaseException:  # noqa: BLE001 - report everything
            # Report before tearing the group down: destroying it closes the
            # gloo sockets, which makes peers fail with secondary errors.
            _send(conn, ("err", traceback.format_exc(), time.monotonic()))
            raise _Reported()
        if dist.is_initialized():
            dist.destroy_process_group()
        _send(conn, ("ok", result))
    except _Reported:
        pass
    except BaseException:  # noqa: BLE001 - setup or result pickling failed
        try:
            _send(conn, ("err", traceback.format_exc(), time.monotonic()))
        except BaseException:  # pragma: no cover - e.g. broken pipe
            pass
    finally:
        try:
            conn.close()
        except Exception:  # pragma: no cover
            pass


# --------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------

_CONTEXTS: dict[str, Any] = {}
# FSDP2/DTensor and torch._dynamo (which FSDP2 imports lazily in its first
# backward) cost ~3 s per rank to import here: import them once in the server.
_PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.tensor",
    "torch.distributed.fsdp",
    "torch._dynamo",
    "torch.nn.parallel",
    __name__,
]


def preload_in_forkserver(*modules: str) -> None:
    """Import ``modules`` once in the fork server instead of in every rank of
    every call (e.g. ``"deepspeed"``, ``"gqc_dist"``). Effective only if called
    before the first :func:`run_distributed` call of the process (a
    ``conftest.py`` is a good place); import errors there are ignored."""
    for m in modules:
        if m not in _PRELOAD:
            _PRELOAD.append(m)
    if "forkserver" in _CONTEXTS:
        _CONTEXTS["forkserver"].set_forkserver_preload(list(_PRELOAD))


def _get_context(start_method: str):
    ctx = _CONTEXTS.get(start_method)
    if ctx is None:
        ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # Import torch once in the fork server; children fork from it.
            ctx.set_forkserver_preload(list(_PRELOAD))
        _CONTEXTS[start_method] = ctx
    return ctx


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + _KILL_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(1.0)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    env: dict[str, Any] | None = None,
    backend: str = "gloo",
    init_process_group: bool = True,
    start_method: str = "forkserver",
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` real
    processes with an initialised process group; return results in rank order.

    Raises :class:`DistributedRankError` if a rank raises or dies,
    :class:`DistributedTimeoutError` (a ``TimeoutError``) if ranks are still
    running after ``timeout`` seconds. Survivors are always killed.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if getattr(fn, "__name__", "") == "<lambda>" or "<locals>" in getattr(
        fn, "__qualname__", ""
    ):
        raise TypeError(
            f"fn must be a module-level function (picklable), got {fn!r}"
        )

    store = None
    if init_process_group:
        import torch.distributed as dist

        # Parent hosts the rendezvous store on an OS-assigned port: fresh per
        # call, no race between "find a free port" and "bind it".
        store = dist.TCPStore(
            MASTER_ADDR, 0, world_size, is_master=True,
            timeout=timedelta(seconds=timeout), wait_for_workers=False,
        )
        port = store.port
    else:
        port = find_free_port()

    ctx = _get_context(start_method)
    procs: list[Any] = []
    readers: list[Any] = []
    try:
        for rank in range(world_size):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_worker,
                args=(rank, world_size, fn, args, kwargs, w, port, env, backend,
                      init_process_group, timeout),
                name=f"dist-rank-{rank}",
                daemon=True,
            )
            try:
                p.start()
            except Exception as e:
                raise TypeError(
                    f"could not start rank {rank}: fn/args/kwargs must be "
                    f"picklable and fn module-level ({e!r})"
                ) from e
            w.close()  # parent keeps only the read end
            procs.append(p)
            readers.append(r)

        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        failed_at: dict[int, float] = {}  # CLOCK_MONOTONIC is system-wide
        pending = set(range(world_size))
        deadline = time.monotonic() + timeout
        grace_end: float | None = None

        def _collect(rank: int) -> None:
            pending.discard(rank)
            conn = readers[rank]
            payload = None
            try:
                if conn.poll():
                    payload = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                payload = None
            except Exception:  # unpickling failed in the parent
                payload = ("err", "parent could not unpickle the result:\n"
                           + traceback.format_exc(), time.monotonic())
            if payload is None:
                procs[rank].join(1.0)
                # A rank that died on its own (os._exit, signal, segfault) is
                # taken as the root cause: rank peers only see its sockets
                # close, and its death time is unknown.
                payload = ("err", f"rank {rank} exited without a result "
                           f"(exitcode {procs[rank].exitcode})",
                           float("-inf"))
            if payload[0] == "ok":
                results[rank] = payload[1]
            else:
                failures[rank] = payload[1]
                failed_at[rank] = payload[2]

        while pending:
            now = time.monotonic()
            end = deadline if grace_end is None else min(deadline, grace_end)
            if now >= end:
                break
            waitables = {}
            for rank in pending:
                waitables[readers[rank]] = rank
                waitables[procs[rank].sentinel] = rank
            ready = multiprocessing.connection.wait(
                list(waitables), timeout=end - now
            )
            for obj in ready:
                rank = waitables[obj]
                if rank in pending:
                    _collect(rank)
            if failures and grace_end is None:
                grace_end = time.monotonic() + _FAILURE_GRACE_S

        if failures:
            # Root cause = the rank whose exception happened first; peers
            # usually fail afterwards with secondary "connection closed" errors.
            first_failed = min(failures, key=lambda r: (failed_at[r], r))
            raise DistributedRankError(
                first_failed, failures[first_failed], failures
            )
        if pending:
            raise DistributedTimeoutError(sorted(pending), timeout, world_size)
        return [results[r] for r in range(world_size)]
    finally:
        _stop(procs)
        for r in readers:
            r.close()
        del store


def torchrun_command(nproc: int, *args) -> list:
    """``python -m torch.distributed.run`` with ``nproc`` local ranks on a free master port,
    followed by ``args`` (e.g. ``"-m", "gqc_dist.train", ...``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(find_free_port()), *map(str, args)]


@contextlib.contextmanager
def launched(command, **popen_kwargs):
    """``subprocess.Popen(command)`` in its own process group. On leaving the block the whole group
    (the launcher and every rank it started) is killed if the launcher is still running, so no
    rank outlives the test whatever went wrong."""
    process = subprocess.Popen(command, start_new_session=True, **popen_kwargs)
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def children(pid: int) -> list:
    """The pids whose parent is ``pid`` (a launcher's ranks), read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def run_launcher(command, env=None, timeout=300):
    """Run a launcher command line (torchrun, mpiexec, ...) in its own process group.

    Returns the ``subprocess.CompletedProcess``. On timeout the whole group is killed before
    ``subprocess.TimeoutExpired`` is raised.
    """
    with launched(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
