"""Running gqc-train as a user would (a subprocess per run) and comparing runs' metrics."""

import json
import os
import sys
from pathlib import Path

import pytest

from distributed_harness import run_launcher, torchrun_command

# The venv's python and console scripts (deepspeed, mpiexec) first on PATH: launchers started by
# the tests, and the hosts in virtual_cluster.py, run this same installation.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
       "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
REPO = Path(__file__).resolve().parent.parent


def records(out_dir, kind="step"):
    """The metrics.jsonl records of one kind ("step" or "val") of the run in ``out_dir``."""
    lines = Path(out_dir, "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def summary(out_dir) -> dict:
    """The run's summary.json."""
    return json.loads(Path(out_dir, "summary.json").read_text())


def gqc_train(*args, nproc=None, timeout=400):
    """``python -m gqc_dist.train *args`` (under torchrun with ``nproc`` ranks); returns stdout."""
    if nproc:
        command = torchrun_command(nproc, "-m", "gqc_dist.train", *args)
    else:
        command = [sys.executable, "-m", "gqc_dist.train", *args]
    finished = run_launcher(command, env=ENV, timeout=timeout)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return finished.stdout


def assert_same_run(reference, other, rel=1e-4):
    """``other`` took the same steps as ``reference``: equal draws and tokens per step; loss, mean
    grad norm and the final validation loss within ``rel``."""
    a, b = records(reference), records(other)
    assert len(a) == len(b) and a
    assert [r["draws"] for r in a] == [r["draws"] for r in b]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        assert x["loss"] == pytest.approx(y["loss"], rel=rel)
        assert x["mean_grad_norm"] == pytest.approx(y["mean_grad_norm"], rel=rel)
    assert records(reference, "val")[-1]["val_loss"] == pytest.approx(records(other, "val")[-1]["val_loss"], rel=rel)
