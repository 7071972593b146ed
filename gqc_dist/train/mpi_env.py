"""Rank, world and rendezvous from MPI itself, for gqc-train under ``mpirun`` / ``mpiexec``.

Any MPI launcher (MPICH's Hydra, Intel MPI, MVAPICH, Open MPI, PMIx under Slurm) leaves a marker
in each rank's environment (:data:`MARKERS`); the values themselves come from MPI through mpi4py
(``gqc_dist[mpi]``), the same way for every implementation: the rank and size of
``COMM_WORLD``, the local rank within the node's shared-memory communicator, and the rendezvous
that rank 0 offers (``127.0.0.1`` when every rank is on its host, else its address; a free port
it found), broadcast to all. ``MASTER_ADDR`` / ``MASTER_PORT`` already set win.
"""

import os
import socket
from typing import Dict, Optional

MARKERS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def launched_by_mpi() -> bool:
    """Whether an MPI launcher started this process (and no torch launcher set RANK)."""
    return "RANK" not in os.environ and any(key in os.environ for key in MARKERS)


def discover() -> Dict[str, str]:
    """``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` from MPI."""
    from gqc_dist.extras import require

    MPI = require("mpi4py.MPI", "mpi", "gqc-train under mpirun")
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    local_rank = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank).Get_rank()
    hosts = world.allgather(socket.gethostname())
    offer: Optional[Dict[str, str]] = None
    if rank == 0:
        offer = {"MASTER_ADDR": os.environ.get("MASTER_ADDR") or _address(hosts), "MASTER_PORT":
                 os.environ.get("MASTER_PORT") or str(_free_port())}
    offer = world.bcast(offer, root=0)
    return {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(local_rank), **offer}


def _address(hosts) -> str:
    """Where the other ranks reach rank 0: loopback when they all share its host."""
    if all(host == hosts[0] for host in hosts):
        return "127.0.0.1"
    return socket.gethostbyname(hosts[0])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]
