#!/usr/bin/env bash
# Entrypoint of the gqc_dist images (docker/Dockerfile), run in /opt/gqc_dist:
#   docker run IMAGE                          -> gqc-train (the embedded default run)
#   docker run IMAGE --quick --precision bf16 -> gqc-train --quick --precision bf16
#   docker run IMAGE launch/torchrun.sh ...   -> that command, as given (also bash, python, ...)
# Knobs: OMP_NUM_THREADS (default 1). Everything else is the launch scripts' and gqc-train's.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$#" -eq 0 ]; then
    set -- gqc-train
elif [ "${1#-}" != "$1" ]; then
    set -- gqc-train "$@"
fi
exec "$@"
