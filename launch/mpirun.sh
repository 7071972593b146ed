#!/usr/bin/env bash
# gqc-train under MPI: MPICH (the mpich wheel's mpiexec, Intel MPI, MVAPICH: Hydra) or Open MPI.
# Each rank asks MPI itself (mpi4py, gqc_dist[mpi]) for its rank, the world size, its local rank and
# rank 0's rendezvous address, whichever MPI this is; with --device auto it takes GPU LOCAL_RANK and
# NCCL on CUDA.
#
#   NP=2 launch/mpirun.sh --engine ddp
#   NP=2 launch/mpirun.sh --config configs/train_deepspeed.json
#   Multi-node (one hostfile line per node; MASTER_ADDR defaults to its first host):
#     NP=16 HOSTFILE=hosts launch/mpirun.sh --config configs/train_fsdp2.json
#     MPICH hostfile lines: `node1:8`     Open MPI hostfile lines: `node1 slots=8`
# Every argument goes to gqc-train (e.g. --device auto|cpu|cuda, --precision fp32|bf16|fp16).
#
# Knobs (environment variables):
#   NP               total ranks over all hosts (default 2). On GPUs: nodes x GPUs per node.
#   HOSTFILE         hosts to run on (MPICH: -f FILE, Open MPI: --hostfile FILE); default: this host.
#   MASTER_ADDR      address of the host of rank 0, for torch.distributed's rendezvous (default:
#                    the first host in HOSTFILE, else 127.0.0.1). Must be reachable from every host.
#   MASTER_PORT      rendezvous port (default 29500).
#   OMP_NUM_THREADS  CPU threads per rank (default 1).
#   MPI_FLAVOR       mpich | openmpi: skip detecting it from `mpiexec --version`.
#   MPIEXEC          the mpiexec to run (default: mpiexec on PATH; the venv's comes from the mpich wheel).
#   MPI_EXPORT       extra variable names to pass to every rank, space-separated (e.g. "NCCL_DEBUG
#                    NCCL_SOCKET_IFNAME"). Open MPI passes only what is named (-x); MPICH's Hydra
#                    passes the whole environment anyway.
#   MPI_ARGS         extra mpiexec arguments, space-separated (e.g. "--oversubscribe", "-ppn 8").
#   PYTHON           the Python that has gqc_dist installed (default: python on PATH).
# Open MPI run as root (e.g. in a container) gets --allow-run-as-root.
set -euo pipefail

mpiexec=${MPIEXEC:-mpiexec}
flavor=${MPI_FLAVOR:-}
if [ -z "$flavor" ]; then
    version=$("$mpiexec" --version 2>&1 || true)
    case "$version" in
        *"Open MPI"* | *OpenRTE* | *open-mpi.org*) flavor=openmpi ;;
        *HYDRA* | *MPICH* | *"Intel(R) MPI"* | *MVAPICH*) flavor=mpich ;;
        *)
            echo "launch/mpirun.sh: cannot tell which MPI '$mpiexec --version' is; set MPI_FLAVOR=mpich or MPI_FLAVOR=openmpi" >&2
            printf '%s\n' "$version" | sed -n 1,5p >&2
            exit 2
            ;;
    esac
fi

if [ -z "${MASTER_ADDR:-}" ] && [ -n "${HOSTFILE:-}" ]; then
    # First host of the hostfile: "node1:8" (MPICH) or "node1 slots=8" (Open MPI); comments skipped.
    # (awk reads to the end: an early exit would SIGPIPE sed, which pipefail turns into a failure.)
    MASTER_ADDR=$(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF && !found { print $1; found = 1 }' | cut -d: -f1)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500}

names=(OMP_NUM_THREADS MASTER_ADDR MASTER_PORT PATH)
for name in LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV DS_ACCELERATOR TORCH_EXTENSIONS_DIR; do
    if [ -n "${!name+set}" ]; then names+=("$name"); fi
done
read -ra extra_names <<<"${MPI_EXPORT:-}"
for name in "${extra_names[@]}"; do
    if [ -n "${!name+set}" ]; then names+=("$name"); else echo "launch/mpirun.sh: MPI_EXPORT names $name, which is not set" >&2; fi
done

# Hydra wants its global options (-f, -genv) before the -n of the executable's section.
args=()
case "$flavor" in
    openmpi)
        if [ "$(id -u)" = 0 ]; then args+=(--allow-run-as-root); fi
        if [ -n "${HOSTFILE:-}" ]; then args+=(--hostfile "$HOSTFILE"); fi
        for name in "${names[@]}"; do args+=(-x "$name=${!name}"); done
        ;;
    mpich)
        if [ -n "${HOSTFILE:-}" ]; then args+=(-f "$HOSTFILE"); fi
        for name in "${names[@]}"; do args+=(-genv "$name" "${!name}"); done
        ;;
    *)
        echo "launch/mpirun.sh: MPI_FLAVOR must be mpich or openmpi, not '$flavor'" >&2
        exit 2
        ;;
esac
read -ra user_args <<<"${MPI_ARGS:-}"
args+=("${user_args[@]}" -n "${NP:-2}")

exec "$mpiexec" "${args[@]}" "${PYTHON:-python}" -m gqc_dist.train "$@"
