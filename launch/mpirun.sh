#!/usr/bin/env bash
# gqc-train under MPI (the mpich wheel's mpiexec, or a system MPI). Ranks come from PMI_* /
# OMPI_COMM_WORLD_*; on several hosts set MASTER_ADDR to the first host.
#   NP=2 launch/mpirun.sh --engine ddp          NP=2 launch/mpirun.sh --config configs/train_deepspeed.json
set -euo pipefail
exec mpiexec -n "${NP:-2}" -env OMP_NUM_THREADS "${OMP_NUM_THREADS:-1}" \
    -env MASTER_ADDR "${MASTER_ADDR:-127.0.0.1}" -env MASTER_PORT "${MASTER_PORT:-29500}" \
    python -m gqc_dist.train "$@"
