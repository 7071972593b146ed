#!/usr/bin/env bash
# gqc-train with the deepspeed launcher (DS_ACCELERATOR=cpu on machines without GPUs).
#   NPROC=2 launch/deepspeed.sh --config configs/train_deepspeed.json
set -euo pipefail
exec deepspeed --num_gpus "${NPROC:-2}" --master_port "${MASTER_PORT:-29500}" --module gqc_dist.train "$@"
