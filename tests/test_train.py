"""gqc-train end to end: the shortened default run, resume, baseline/compare, config errors,
and 2-rank FSDP2 and DeepSpeed runs against the single-process run on the same data."""

import json
import os
import sys
from pathlib import Path

import matplotlib.image
import pytest

from distributed_harness import find_free_port, run_launcher

from gqc_dist.train.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _records(out_dir, kind="step"):
    lines = Path(out_dir, "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _gqc_train(*args, nproc=None, timeout=400):
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(find_free_port()),
                   "-m", "gqc_dist.train", *args]
    else:
        command = [sys.executable, "-m", "gqc_dist.train", *args]
    finished = run_launcher(command, env=ENV, timeout=timeout)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return finished.stdout


def test_shortened_default_run_writes_metrics_checkpoint_and_plot(tmp_path):
    out = tmp_path / "run"
    stdout = _gqc_train("--quick", "--out-dir", str(out), "--no-progress")
    assert "validation loss" in stdout and "mean micro-batches per step" in stdout
    steps = _records(out)
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and len(steps) == 12
    for key in ("loss", "draws", "threshold", "mean_grad_norm", "lr", "tokens", "samples", "wall_time"):
        assert all(key in r for r in steps)
    assert len({r["draws"] for r in steps}) > 1  # the batch size varied
    assert _records(out, "val")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000012"
    image = matplotlib.image.imread(out / "training.png")
    assert image.shape[0] >= 800 and image.shape[1] >= 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_steps"] == 12
    assert summary["mean_micro_batches_per_step"] == pytest.approx(summary["micro_steps"] / 12)


def test_resume_continues_the_metrics_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _gqc_train("--quick", "--out-dir", str(full), "--no-progress")
    # interrupt after step 8 (the last checkpoint is step 6), then resume to 12
    stop = _records(full)[7]["samples"] // 8  # micro-steps done at step 8 (8 sequences each)
    _gqc_train("--quick", "--out-dir", str(part), "--no-progress", "--max-micro-steps", str(stop))
    assert len(_records(part)) == 8
    _gqc_train("--quick", "--out-dir", str(part), "--no-progress", "--resume")
    resumed, uninterrupted = _records(part), _records(full)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(resumed, uninterrupted):
        assert a["draws"] == b["draws"] and a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_baseline_and_compare(tmp_path):
    gqc, fixed = tmp_path / "gqc", tmp_path / "fixed"
    _gqc_train("--quick", "--out-dir", str(gqc), "--no-progress")
    _gqc_train("--quick", "--out-dir", str(fixed), "--no-progress", "--baseline", "3")
    assert {r["draws"] for r in _records(fixed)} == {3}
    assert all(r["threshold"] is None for r in _records(fixed))
    assert main(["compare", str(gqc), str(fixed), "--out", str(tmp_path / "c.png")]) == 0
    assert matplotlib.image.imread(tmp_path / "c.png").shape[0] >= 800


@pytest.mark.parametrize("args, message", [
    (["--set", "train.optimizer_step=5"], "unknown key train.optimizer_step"),
    (["--set", "model.dim=-4"], "model.dim must be >= 1"),
    (["--set", "gqc.threshold=-1", "--set", "gqc.schedule=null"], "gqc.threshold must be >= 0"),
    (["--engine", "single", "--set", "model.ep_size=2", "--set", "model.num_experts=4"], "model.ep_size > 1 needs engine fsdp2"),
    (["--set", "deepspeed.optimizer={}"], "deepspeed.optimizer is set by gqc-train"),
    (["--max-draws", "0"], "gqc.max_draws must be >= 1"),
])
def test_config_errors_name_the_key(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_config_files_in_configs_are_valid():
    from gqc_dist.train.settings import load_config, validate

    configs = sorted(Path(__file__).resolve().parent.parent.glob("configs/train_*.json"))
    assert len(configs) >= 4
    engines = {validate(load_config(path))["engine"] for path in configs}
    assert engines == {"single", "ddp", "fsdp2", "deepspeed"}


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_two_rank_run_agrees_with_single_process(tmp_path, engine):
    single, multi = tmp_path / "single", tmp_path / engine
    common = ["--quick", "--no-progress", "--set", "optimizer.grad_clip=0.5"]
    _gqc_train(*common, "--out-dir", str(single))
    _gqc_train(*common, "--engine", engine, "--out-dir", str(multi), nproc=2)
    a, b = _records(single), _records(multi)
    assert [r["draws"] for r in a] == [r["draws"] for r in b]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["mean_grad_norm"] == pytest.approx(y["mean_grad_norm"], rel=1e-4)
    assert _records(single, "val")[-1]["val_loss"] == pytest.approx(_records(multi, "val")[-1]["val_loss"], rel=1e-4)


def test_mpiexec_launch_agrees_with_single_process(tmp_path):
    """MPICH's mpiexec (the mpich wheel) with ranks read from PMI_*; launch/mpirun.sh's command."""
    single, mpi = tmp_path / "single", tmp_path / "mpi"
    _gqc_train("--quick", "--no-progress", "--out-dir", str(single))
    command = ["bash", str(Path(__file__).resolve().parent.parent / "launch" / "mpirun.sh"),
               "--quick", "--engine", "ddp", "--no-progress", "--out-dir", str(mpi)]
    env = {**ENV, "NP": "2", "MASTER_PORT": str(find_free_port()), "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}"}
    finished = run_launcher(command, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert [r["draws"] for r in _records(single)] == [r["draws"] for r in _records(mpi)]
    assert _records(single, "val")[-1]["val_loss"] == pytest.approx(_records(mpi, "val")[-1]["val_loss"], rel=1e-4)
