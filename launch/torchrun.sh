#!/usr/bin/env bash
# gqc-train under torchrun (torch.distributed.run), one node or several with a static rendezvous.
#
#   Single node:  NPROC=4 launch/torchrun.sh --config configs/train_fsdp2.json
#   Multi-node, run on every node with its own NODE_RANK (same MASTER_ADDR/MASTER_PORT everywhere):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun.sh --config configs/train_fsdp2.json
#     NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun.sh --config configs/train_fsdp2.json
# Every argument goes to gqc-train (e.g. --device auto|cpu|cuda, --precision fp32|bf16|fp16).
#
# Knobs (environment variables):
#   NPROC            ranks on this node. Default: one per visible GPU (CUDA_VISIBLE_DEVICES if set,
#                    else `nvidia-smi -L`), or 2 when the node has no GPU (CPU ranks, gloo).
#   NNODES           number of nodes (default 1).
#   NODE_RANK        this node's index, 0..NNODES-1 (default 0).
#   MASTER_ADDR      address of node 0, reachable from every node (default 127.0.0.1).
#   MASTER_PORT      rendezvous port on node 0 (default 29500).
#   OMP_NUM_THREADS  CPU threads per rank (default 1).
#   PYTHON           the Python that has gqc_dist installed (default: python on PATH).
# With --device auto each rank takes GPU LOCAL_RANK (set by torchrun) and NCCL when CUDA is present.
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

if [ -z "${NPROC:-}" ]; then
    NPROC=$(visible_gpus)
    [ "${NPROC:-0}" -gt 0 ] || NPROC=2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m gqc_dist.train "$@"
