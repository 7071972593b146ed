#!/usr/bin/env bash
# What only a GPU can show, on a machine with one NVIDIA GPU, in under 10 minutes:
#   1. the CUDA tests one GPU allows (tests/test_gpu.py: CPU/CUDA parity of the wrapper, the
#      loop's host syncs counted by CUDA's own sync debug mode, the collectives' device check;
#      tests/test_train.py's bf16/fp16 runs on CUDA);
#   2. gqc-train on the GPU in bf16: tokens/s and MFU;
#   3. gqc-train with 2 ranks sharing the GPU (DDP; NCCL first, gloo on CUDA tensors when NCCL
#      refuses two ranks on one device): every collective on the GPU, tokens/s;
#   4. benchmarks/overhead.py on CUDA (one process): what GQC adds per micro-step;
#   5. the GPU-scale sweep (configs/sweep_gpu.json: 22.4 M parameters, 100 M tokens in bf16; fixed
#      k = 1, fixed k = 2 at two learning rates, the default), 4 runs side by side on the GPU,
#      sized for at most 8 minutes; its result JSONs land in benchmarks/results/sweep-gpu/.
# PART=checks runs steps 1-4 (under 10 minutes), PART=sweep step 5 alone (each fits one device
# call), PART=all (default) both.
# Each step prints its figure on a line starting "gpu_check:"; a failing step is reported and the
# next one runs; the script exits 1 if any step failed, and at once (exit 2) on a machine without
# an NVIDIA GPU.
#
#   bash benchmarks/gpu_check.sh                    # from the repository, gqc_dist installed
#
# Knobs:
#   OUT      where the runs go (default: a new temporary directory)
#   PYTHON   the Python with gqc_dist, torch (CUDA build) and pytest (default: python3)
#   STEPS    optimizer steps of the bf16 run of step 2 (default 300)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d -t gqc-gpu-check.XXXXXX)}
STEPS=${STEPS:-300}
PART=${PART:-all}
started=$SECONDS

say() { printf 'gpu_check: %s\n' "$*"; }
failed=()
fail() { say "FAILED: $*" >&2; failed+=("$*"); }

# --- 0. a GPU, and a torch that sees it ------------------------------------------------------
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    say "no NVIDIA GPU here (nvidia-smi missing or lists none): this check needs one GPU" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    say "$PY's torch sees no CUDA device (a CPU build of torch?): install torch==2.13.0 from the CUDA index" >&2
    exit 2
fi
say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed -n 1p); runs in $OUT"

# Figures of a finished run, from its summary.json.
figures() {
    "$PY" - "$1" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1] + "/summary.json"))
mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "n/a (unknown GPU peak: --peak-tflops)"
steps = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
share = sorted(r["gqc_fraction"] for r in steps if r.get("kind") == "step" and r.get("gqc_fraction") is not None)
share = f"{100 * share[len(share) // 2]:.1f}% (median over {len(share)} steps)" if share else "not sampled"
print(f"{s['tokens_per_s']:,.0f} tokens/s ({s['tokens_per_s_per_rank']:,.0f} per rank), MFU {mfu}, "
      f"GQC statistics {share} of a micro-step, val loss {s['val_loss']:.4f}, {s['optimizer_steps']} steps, "
      f"{s['wall_time']:.0f} s on {s['device']}")
EOF
}

if [ "$PART" != sweep ]; then
# --- 1. CUDA tests ---------------------------------------------------------------------------
say "1/4 CUDA tests"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_train.py -k "gpu or cuda" \
    || fail "CUDA tests"

# --- 2. one GPU, bf16 ------------------------------------------------------------------------
say "2/4 gqc-train, one GPU, bf16, $STEPS steps (width 512, 6 layers, 256-token sequences, 32 per micro-batch)"
model=(--set model.dim=512 --set model.layers=6 --set model.heads=8 --set model.seq_len=256
       --set data.micro_batch_size=32 --set train.tokens=null --set "train.optimizer_steps=$STEPS"
       --set train.max_micro_steps=100000 --set train.eval_interval=100 --set train.checkpoint_interval=100)
if timeout 240 "$PY" -m gqc_dist.train --device cuda --precision bf16 --no-progress "${model[@]}" \
        --out-dir "$OUT/single-bf16"; then
    say "one GPU, bf16: $(figures "$OUT/single-bf16")"
else
    fail "gqc-train on one GPU"
fi

# --- 3. two ranks sharing the GPU ------------------------------------------------------------
say "3/4 gqc-train, 2 DDP ranks on one GPU"
two_ranks() {  # $1: backend, $2: out dir
    GQC_TRAIN_SHARE_GPUS=1 GQC_TRAIN_BACKEND=$1 timeout 150 "$PY" -m torch.distributed.run --nproc_per_node 2 \
        -m gqc_dist.train --engine ddp --device cuda --precision bf16 --no-progress --quick \
        --set train.optimizer_steps=60 --set train.max_micro_steps=2000 --collective-timeout 60 --out-dir "$2"
}
if two_ranks nccl "$OUT/two-nccl" >"$OUT/two-nccl.log" 2>&1; then
    say "2 ranks, NCCL: $(figures "$OUT/two-nccl")"
else
    say "NCCL refused 2 ranks on one GPU ($(grep -m1 '^gqc-train:' "$OUT/two-nccl.log" || echo "see $OUT/two-nccl.log")): gloo on CUDA tensors"
    if two_ranks gloo "$OUT/two-gloo"; then
        say "2 ranks, gloo on CUDA tensors: $(figures "$OUT/two-gloo")"
    else
        fail "2 ranks with gloo on one GPU"
    fi
fi

# --- 4. overhead on CUDA ---------------------------------------------------------------------
say "4/4 benchmarks/overhead.py --quick, one process on CUDA"
if timeout 180 "$PY" benchmarks/overhead.py --quick --engines single | tee "$OUT/overhead.txt"; then
    say "overhead, one process on CUDA: $(sed -n '/^---/{n;p;q;}' "$OUT/overhead.txt")"
else
    fail "overhead.py"
fi
fi

# --- 5. the GPU-scale sweep ------------------------------------------------------------------
if [ "$PART" != checks ]; then
    say "5/5 gqc-train sweep configs/sweep_gpu.json --jobs 4 (4 runs on one GPU, at most 8 minutes)"
    if timeout 560 "$PY" -m gqc_dist.train sweep configs/sweep_gpu.json --jobs 4 >"$OUT/sweep.log" 2>&1; then
        say "sweep: $(tail -n 1 "$OUT/sweep.log"); report in benchmarks/results/sweep-gpu/report.md"
    else
        tail -n 20 "$OUT/sweep.log" >&2
        fail "the GPU sweep (finished runs are kept; rerun PART=sweep to finish it)"
    fi
fi

say "done in $((SECONDS - started)) s"
if [ "${#failed[@]}" -gt 0 ]; then
    say "${#failed[@]} step(s) failed: ${failed[*]}" >&2
    exit 1
fi
