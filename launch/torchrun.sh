#!/usr/bin/env bash
# gqc-train under torchrun. Single node:   NPROC=4 launch/torchrun.sh --config configs/train_fsdp2.json
# Multi-node (static rendezvous), run on every node with its NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun.sh --config configs/train_fsdp2.json
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m torch.distributed.run \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC:-2}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m gqc_dist.train "$@"
