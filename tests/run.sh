#!/usr/bin/env bash
# Runs the test suite on a fresh machine: creates .venv, installs what the tests need, runs pytest.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k parity`).
set -euo pipefail
cd "$(dirname "$0")/.."
# The multi-node launch tests start a real Slurm cluster (slurm-wlm, munge) on network namespaces
# (iproute2). They need root; without it or without the packages they are skipped, saying why.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
        && ! { command -v slurmctld && command -v munged && command -v ip; } >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge iproute2; } >/dev/null \
        || echo "tests/run.sh: could not install slurm-wlm, munge, iproute2: the Slurm tests will be skipped" >&2
fi
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
# torch first and pinned: the CPU wheel. An unpinned torch (asked for by deepspeed) would pull a
# multi-GB CUDA build on a machine without one.
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
# DeepSpeed JIT-builds its CPU comm op under TORCH_EXTENSIONS_DIR. Keep it inside this checkout's
# venv, so a lock left by a killed earlier run here (which would block every later DeepSpeed init
# forever) can be cleared safely, and the user's own cache is never touched.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null || true
# Undefined names and dead imports fail fast, before the multi-process tests start.
python -m pyflakes gqc_dist tests benchmarks/*.py setup.py  # not benchmarks/out/: copied corpora
python -m pytest -q tests "$@"
