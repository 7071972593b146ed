#!/usr/bin/env bash
# gqc-train with the deepspeed launcher, on one node or on the hosts of a hostfile.
#
#   One node:     NPROC=2 launch/deepspeed.sh --config configs/train_deepspeed.json
#   Multi-node, started once on the first host; it reaches the others with pdsh over passwordless ssh
#   (hostfile lines: `node1 slots=8`):
#     HOSTFILE=hosts launch/deepspeed.sh --config configs/train_deepspeed.json
#   Multi-node without ssh (containers, clusters without ssh between nodes): run on every node,
#   with its NODE_RANK and the same HOSTFILE and MASTER_ADDR:
#     NO_SSH=1 NODE_RANK=0 HOSTFILE=hosts MASTER_ADDR=10.0.0.1 launch/deepspeed.sh --config ...
# Every argument goes to gqc-train (e.g. --device auto|cpu|cuda, --precision fp32|bf16|fp16).
#
# Knobs (environment variables):
#   NPROC            ranks per node (deepspeed --num_gpus). Default: with HOSTFILE, its slots; on a
#                    GPU node, every visible GPU (CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`); on a
#                    CPU (DS_ACCELERATOR=cpu, or no GPU visible), 2.
#   HOSTFILE         deepspeed hostfile (--hostfile) for several nodes; default: this node only.
#   NUM_NODES        use only the first NUM_NODES hosts of HOSTFILE (--num_nodes).
#   MASTER_ADDR      address of rank 0's node (--master_addr); required with NO_SSH. Default:
#                    127.0.0.1 on one node; with a hostfile, deepspeed asks the first host over ssh.
#   MASTER_PORT      rendezvous port (--master_port, default 29500).
#   NO_SSH=1         start this node's ranks only (--no_ssh --node_rank NODE_RANK).
#   NODE_RANK        this node's index in HOSTFILE, with NO_SSH (default 0).
#   DS_LAUNCHER      multi-node backend (--launcher): pdsh (default), openmpi, mpich, impi, slurm, mvapich.
#   DS_ARGS          extra deepspeed launcher arguments, space-separated (e.g. "--ssh_port 2222").
#   DS_ACCELERATOR   cpu on machines without GPUs; leave unset on GPUs (deepspeed then picks CUDA).
#   OMP_NUM_THREADS  CPU threads per rank (default 1).
# Across nodes pdsh forwards only NCCL_*, PYTHON*, UCX_*, MV2_*, MLFLOW_* and the lines of
# ~/.deepspeed_env or ./.deepspeed_env (VAR=value, one a line; DS_ENV_FILE names another file):
# put OMP_NUM_THREADS, DS_ACCELERATOR, PATH there when the remote nodes need them.
set -euo pipefail

# GPUs this node may use: CUDA_VISIBLE_DEVICES when set (empty -> 0), else nvidia-smi's list.
visible_gpus() {
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        local ids
        case "$CUDA_VISIBLE_DEVICES" in NoDevFiles | -1) echo 0; return ;; esac
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
args=(--master_port "${MASTER_PORT:-29500}")
if [ -n "${NPROC:-}" ]; then
    args+=(--num_gpus "$NPROC")
elif [ -z "${HOSTFILE:-}" ] && { [ "${DS_ACCELERATOR:-}" = cpu ] || [ "$(visible_gpus)" -eq 0 ]; }; then
    args+=(--num_gpus 2)  # CPU ranks; on GPUs deepspeed itself takes every visible GPU
fi
if [ -n "${HOSTFILE:-}" ]; then args+=(--hostfile "$HOSTFILE"); fi
if [ -n "${NUM_NODES:-}" ]; then args+=(--num_nodes "$NUM_NODES"); fi
if [ -n "${MASTER_ADDR:-}" ]; then args+=(--master_addr "$MASTER_ADDR"); fi
if [ -n "${DS_LAUNCHER:-}" ]; then args+=(--launcher "$DS_LAUNCHER"); fi
if [ "${NO_SSH:-0}" = 1 ]; then
    if [ -z "${HOSTFILE:-}" ] || [ -z "${MASTER_ADDR:-}" ]; then
        echo "launch/deepspeed.sh: NO_SSH=1 needs HOSTFILE and MASTER_ADDR (and NODE_RANK on every node but the first)" >&2
        exit 2
    fi
    args+=(--no_ssh --node_rank "${NODE_RANK:-0}")
fi
read -ra user_args <<<"${DS_ARGS:-}"
args+=("${user_args[@]}")

exec deepspeed "${args[@]}" --module gqc_dist.train "$@"
