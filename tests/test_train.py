"""gqc-train end to end: the shortened default run, resume, baseline/compare, config errors,
and 2-rank FSDP2 and DeepSpeed runs against the single-process run on the same data."""

import json
import os
import shutil
import signal
import subprocess
import time

import matplotlib.image
import pytest
import torch

from distributed_harness import children, find_free_port, launched, run_launcher, torchrun_command
from train_runs import ENV, REPO, assert_same_run, gqc_train, records, summary

from gqc_dist.train.cli import main


def test_shortened_default_run_writes_metrics_checkpoint_and_plot(quick_run):
    out, stdout = quick_run
    assert "validation loss" in stdout and "mean micro-batches per step" in stdout
    steps = records(out)
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and len(steps) == 12
    for key in ("loss", "draws", "threshold", "mean_grad_norm", "lr", "tokens", "samples", "wall_time"):
        assert all(key in r for r in steps)
    # the first window's probe (one micro-batch, split) gave the controller its noise estimate
    assert all(r["noise_scale"] is not None and r["target_draws"] is not None for r in steps)
    assert records(out, "val")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000012"
    image = matplotlib.image.imread(out / "training.png")
    assert image.shape[0] >= 800 and image.shape[1] >= 1000
    result = summary(out)
    assert result["optimizer_steps"] == 12
    assert result["world_size"] == 1 and result["engine"] == "single"
    assert result["mean_micro_batches_per_step"] == pytest.approx(result["micro_steps"] / 12)


def test_resume_continues_the_metrics_exactly(tmp_path, quick_run):
    full, part = quick_run[0], tmp_path / "part"
    # interrupt after step 8 (the last checkpoint is step 6), then resume to 12
    stop = records(full)[7]["samples"] // 8  # micro-steps done at step 8 (8 sequences each)
    gqc_train("--quick", "--out-dir", str(part), "--no-progress", "--max-micro-steps", str(stop))
    assert len(records(part)) == 8
    gqc_train("--quick", "--out-dir", str(part), "--no-progress", "--resume")
    resumed, uninterrupted = records(part), records(full)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(resumed, uninterrupted):
        assert a["draws"] == b["draws"] and a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_baseline_and_compare(tmp_path, quick_run):
    gqc, fixed = quick_run[0], tmp_path / "fixed"
    gqc_train("--quick", "--out-dir", str(fixed), "--no-progress", "--baseline", "3")
    assert {r["draws"] for r in records(fixed)} == {3}
    assert all(r["threshold"] is None for r in records(fixed))
    assert main(["compare", str(gqc), str(fixed), "--out", str(tmp_path / "c.png")]) == 0
    assert matplotlib.image.imread(tmp_path / "c.png").shape[0] >= 800


def test_compare_labels_runs_by_arm_and_warns_where_more_than_the_arm_differs(tmp_path, quick_run, monkeypatch,
                                                                             capsys):
    import gqc_dist.train.plots as plots

    shown = []
    monkeypatch.setattr(plots, "plot_compare", lambda runs, out: shown.append([label for label, _ in runs]) or out)
    other = tmp_path / "other"
    shutil.copytree(quick_run[0], other)
    config = json.loads((other / "config.json").read_text())
    lr = config["optimizer"]["lr"]
    config["gqc"] = {"algorithm": "fixed", "accumulation_steps": 2}
    (other / "config.json").write_text(json.dumps(config))
    assert main(["compare", str(quick_run[0]), str(other)]) == 0
    assert shown[-1] == [f"{quick_run[0].name}: cbc, lr {lr}", f"other: fixed k=2, lr {lr}"]
    assert "warning" not in capsys.readouterr().err  # only the arm differs

    config["seed"], config["model"]["dim"], config["optimizer"]["lr_coupling"] = 1, 48, "none"
    (other / "config.json").write_text(json.dumps(config))
    assert main(["compare", str(quick_run[0]), str(other)]) == 0
    assert capsys.readouterr().err.strip() == ("gqc-train compare: warning: the runs differ in more than the controller: "
                                               "model.dim 32 / 48; optimizer.lr_coupling 'sqrt' / 'none'; seed 0 / 1")


@pytest.mark.parametrize("args, message", [
    (["--set", "train.optimizer_step=5"], "unknown key train.optimizer_step"),
    (["--set", "model.dim=-4"], "model.dim must be >= 1"),
    (["--set", 'gqc={"algorithm": "gnts", "threshold": -1}'], "gqc.threshold must be >= 0"),
    (["--engine", "single", "--set", "model.ep_size=2", "--set", "model.num_experts=4"], "model.ep_size > 1 needs engine fsdp2"),
    (["--set", "deepspeed.optimizer={}"], "deepspeed.optimizer is set by gqc-train"),
    (["--max-draws", "0"], "gqc.max_draws must be >= 1"),
])
def test_config_errors_name_the_key(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_config_files_in_configs_are_valid():
    from gqc_dist.train.settings import load_config, validate

    configs = sorted(REPO.glob("configs/train_*.json"))
    assert len(configs) >= 4
    engines = {validate(load_config(path))["engine"] for path in configs}
    assert engines == {"single", "ddp", "fsdp2", "deepspeed"}


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_two_rank_run_agrees_with_single_process(tmp_path, engine):
    single, multi = tmp_path / "single", tmp_path / engine
    common = ["--quick", "--no-progress", "--set", "optimizer.grad_clip=0.5"]
    gqc_train(*common, "--out-dir", str(single))
    gqc_train(*common, "--engine", engine, "--out-dir", str(multi), nproc=2)
    assert_same_run(single, multi)


def test_rank_killed_mid_run_resumes_to_the_uninterrupted_metrics(tmp_path, quick_run):
    """SIGKILL one of 2 FSDP2 ranks once the step-6 checkpoint exists: torchrun stops the job; a
    new torchrun with --resume finishes it, and the metrics equal the single-process run's."""
    out = tmp_path / "run"
    args = ["--quick", "--engine", "fsdp2", "--no-progress", "--out-dir", str(out)]
    command = torchrun_command(2, "-m", "gqc_dist.train", *args)
    latest = out / "checkpoints" / "latest"
    with open(tmp_path / "killed.log", "w") as log, \
            launched(command, env=ENV, stdout=log, stderr=subprocess.STDOUT) as launcher:
        deadline = time.monotonic() + 300
        while not (latest.exists() and latest.read_text().strip() == "step_000006"):
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.01)
        os.kill(children(launcher.pid)[-1], signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
    assert not (out / "summary.json").exists()  # the kill came before the end
    assert records(out)[-1]["step"] < 12
    gqc_train(*args, "--resume", nproc=2)
    assert_same_run(quick_run[0], out)


@pytest.mark.parametrize("script, engine, ranks_env", [
    ("mpirun.sh", "ddp", "NP"),          # MPICH's mpiexec (the mpich wheel); ranks from PMI_*
    ("deepspeed.sh", "deepspeed", "NPROC"),  # the deepspeed launcher; ranks from its env
])
def test_launch_script_agrees_with_single_process(tmp_path, quick_run, script, engine, ranks_env):
    out = tmp_path / "run"
    command = ["bash", str(REPO / "launch" / script),
               "--quick", "--engine", engine, "--no-progress", "--out-dir", str(out)]
    env = {**ENV, ranks_env: "2", "MASTER_PORT": str(find_free_port())}
    finished = run_launcher(command, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert summary(out)["world_size"] == 2
    assert_same_run(quick_run[0], out)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_on_every_device_present_trains_close_to_fp32(tmp_path, quick_run, device, precision):
    """The same --quick run in bf16/fp16 (autocast; fp16 through the wrapper's GradScaler) on each
    device present ends near the fp32 run, and says where and how it ran."""
    out = tmp_path / "run"
    gqc_train("--quick", "--no-progress", "--device", device, "--precision", precision, "--out-dir", str(out))
    result, reference = summary(out), summary(quick_run[0])
    assert result["device"].startswith(device) and result["precision"] == precision
    assert result["tokens"] == reference["tokens"] and result["tokens_per_s"] > 0
    assert abs(result["val_loss"] - reference["val_loss"]) < 0.02 * reference["val_loss"]
    step = records(out)[-1]
    assert step["tokens_per_s"] > 0 and step["micro_step_s"] > 0
    assert (step["mfu"] is None) == (device == "cpu")  # MFU only against a known GPU peak


def test_fsdp2_checkpoint_resumes_on_another_world_size(tmp_path, quick_run):
    """Dense FSDP2 saves with torch.distributed.checkpoint: a run saved on 2 ranks at step 6
    resumes on 1 rank and ends as the single-process run does."""
    out = tmp_path / "run"
    args = ["--quick", "--engine", "fsdp2", "--no-progress", "--out-dir", str(out)]
    gqc_train(*args, nproc=2)
    assert (out / "checkpoints" / "step_000006" / "state.pt").is_file()
    (out / "checkpoints" / "latest").write_text("step_000006\n")  # as if the run had stopped there
    (out / "summary.json").unlink()  # (a finished run's --resume has nothing to do)
    gqc_train(*args, "--resume", nproc=1)
    assert summary(out)["world_size"] == 1
    assert_same_run(quick_run[0], out)


def test_the_progress_line_tells_an_unmeasured_noise_scale_from_a_value():
    from gqc_dist.train.reports import noise_text as _noise_text

    assert _noise_text(None, " micro-batches") == "not measured yet"  # no informative window so far
    assert _noise_text(0.0, " micro-batches") == "not resolved yet (<= 0)"  # the estimate is clamped at 0
    assert _noise_text(4.256, " micro-batches") == "4.26 micro-batches"
