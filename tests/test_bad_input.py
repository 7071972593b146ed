"""Every foreseeable mistake with gqc-train ends in one line ``gqc-train: <what is wrong>`` naming
the key, file or flag, a non-zero exit and no traceback, before any training step; and every file
of an existing run is byte-identical afterwards.

gqc-train runs in-process (``main(argv)``): an exception escaping it would fail the test, and
stderr is read whole."""

import json
import os
from pathlib import Path

import pytest
import torch

from gqc_dist.train.cli import main

QUICK = ["--quick", "--no-progress"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished --quick run (its checkpoints at steps 6 and 12)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*QUICK, "--out-dir", str(out)]) == 0
    return out


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy_run(run: Path, dest: Path) -> Path:
    """The run as if stopped before its end (no summary.json): --resume then reads its checkpoint
    (a finished run's --resume stops before, saying there is nothing to resume)."""
    for path in run.rglob("*"):
        if path.name == "summary.json":
            continue
        target = dest / path.relative_to(run)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return dest


def _checkpoint(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "rank0.pt"


def _edit_checkpoint(run: Path, edit) -> None:
    path = _checkpoint(run)
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


# (id, argv builder, needle) where the builder gets (tmp_path, run) and may prepare files.
def _config_file(tmp, text):
    path = tmp / "config.json"
    path.write_text(text)
    return str(path)


def _dir_with(tmp, name, content=None):
    folder = tmp / name
    folder.mkdir()
    if content is not None:
        (folder / "only.txt").write_bytes(content)
    return str(folder)


def _corrupt(run, tmp, how):
    copy = _copy_run(run, tmp / "copy")
    path = _checkpoint(copy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if how == "truncate" else os.urandom(len(data)))
    return copy


def _set(**edits):
    return [arg for key, value in edits.items() for arg in ("--set", f"{key.replace('__', '.')}={value}")]


CASES = [
    # --set values and flags
    ("unknown key", lambda t, r: [*QUICK, "--set", "model.dimm=3"], "model.dimm"),
    ("negative width", lambda t, r: [*QUICK, *_set(model__dim=-1)], "model.dim"),
    ("zero lr", lambda t, r: [*QUICK, *_set(optimizer__lr=0)], "optimizer.lr"),
    ("bad beta", lambda t, r: [*QUICK, *_set(optimizer__beta2=1.5)], "optimizer.beta2"),
    ("misspelled algorithm", lambda t, r: [*QUICK, *_set(gqc__algorithm="gnst")], "algorithm must be one of"),
    ("max_draws 0", lambda t, r: [*QUICK, "--max-draws", "0"], "max_draws"),
    ("negative threshold", lambda t, r: [*QUICK, "--set", 'gqc={"algorithm": "gnts", "threshold": -1}'],
     "gqc.threshold"),
    ("no threshold", lambda t, r: [*QUICK, "--set", 'gqc={"algorithm": "gnts"}'], "gqc.schedule"),
    ("kappa 0", lambda t, r: [*QUICK, "--set", 'gqc={"algorithm": "cbc", "kappa": 0}'], "gqc.kappa"),
    ("min above max", lambda t, r: [*QUICK, "--set",
                                    'gqc={"algorithm": "cbc", "kappa": 1, "min_draws": 9, "max_draws": 4}'],
     "min_draws"),
    ("schedule for fixed", lambda t, r: [*QUICK, "--set",
                                         'gqc={"algorithm": "fixed", "accumulation_steps": 2, "schedule": {}}'],
     "gqc.schedule"),
    ("noise_beta 1", lambda t, r: [*QUICK, *_set(gqc__noise_beta=1)], "noise_beta"),
    ("local on ZeRO-2", lambda t, r: [*QUICK, "--engine", "deepspeed", "--set", "gqc.local_accumulation=true"],
     "zero_optimization.stage 2"),
    ("local on one process", lambda t, r: [*QUICK, "--set", "gqc.local_accumulation=true"],
     "gqc.local_accumulation needs engine ddp, fsdp2"),
    ("warmup too long", lambda t, r: [*QUICK, "--set", 'gqc={"algorithm": "gnts", "max_draws": 16, "schedule": '
                                      '{"num_training_steps": 12, "num_warmup_steps": 50, "initial_threshold": 1.0, '
                                      '"final_threshold": 0.8}}'], "num_warmup_steps"),
    ("lr coupling in gqc", lambda t, r: [*QUICK, *_set(gqc__lr_coupling="sqrt")], "optimizer.lr_coupling"),
    ("lr coupling unknown", lambda t, r: [*QUICK, *_set(optimizer__lr_coupling="cubic")], "optimizer.lr_coupling"),
    ("seesaw unknown", lambda t, r: [*QUICK, *_set(optimizer__seesaw="sqrt")], "optimizer.seesaw"),
    ("window gradient unknown", lambda t, r: [*QUICK, *_set(gqc__window_gradient="sum")],
     "gqc.window_gradient must be one of mean, sqrt, got 'sum'"),
    ("window rounding unknown", lambda t, r: [*QUICK, *_set(gqc__rounding="round")],
     "gqc.rounding must be one of ceil, dither, got 'round'"),
    ("probe unknown", lambda t, r: [*QUICK, *_set(gqc__probe="half")], "gqc.probe must be one of extra, split, got 'half'"),
    ("baseline 0", lambda t, r: [*QUICK, "--baseline", "0"], "accumulation_steps"),
    ("tokens 0", lambda t, r: [*QUICK, *_set(train__tokens=0)], "train.tokens"),
    ("negative timeout", lambda t, r: [*QUICK, "--collective-timeout", "-5"], "collective_timeout_s"),
    ("set without =", lambda t, r: [*QUICK, "--set", "model.dim"], "--set expects"),
    ("heads do not divide", lambda t, r: [*QUICK, *_set(model__heads=3)], "model.heads"),
    ("unknown engine", lambda t, r: [*QUICK, *_set(engine="gpu")], "engine"),
    ("gns on fsdp2", lambda t, r: [*QUICK, "--engine", "fsdp2", "--set",
                                   'gqc={"algorithm": "gns", "tolerance": 1}'], "gqc.algorithm"),
    ("experts on one engine", lambda t, r: [*QUICK, *_set(model__num_experts=2, model__ep_size=2)], "ep_size"),
    ("deepspeed optimizer", lambda t, r: [*QUICK, "--engine", "deepspeed", "--set", "deepspeed.optimizer={}"],
     "deepspeed.optimizer"),
    # config files
    ("missing config", lambda t, r: [*QUICK, "--config", str(t / "nope.json")], "nope.json"),
    ("config not JSON", lambda t, r: [*QUICK, "--config", _config_file(t, "{engine: single")], "not valid JSON"),
    ("config a list", lambda t, r: [*QUICK, "--config", _config_file(t, "[1, 2]")], "must hold a JSON object"),
    ("config unknown key", lambda t, r: [*QUICK, "--config", _config_file(t, '{"trian": {}}')], "trian"),
    # corpus paths
    ("corpus missing", lambda t, r: [*QUICK, *_set(data__path=str(t / "none"))], "none"),
    ("corpus empty dir", lambda t, r: [*QUICK, *_set(data__path=_dir_with(t, "empty"))], "empty"),
    ("corpus too short", lambda t, r: [*QUICK, *_set(data__path=_dir_with(t, "short", b"x" * 20))], "short"),
    # run directories
    ("run exists", lambda t, r: [*QUICK, "--out-dir", str(r)], "already holds a run"),
    ("out-dir is a file", lambda t, r: [*QUICK, "--out-dir", str(r / "summary.json")], "is a file"),
    ("resume nothing", lambda t, r: [*QUICK, "--resume", "--out-dir", _dir_with(t, "fresh")], "holds no run"),
    ("resume and overwrite", lambda t, r: [*QUICK, "--resume", "--overwrite", "--out-dir", str(r)], "exclude"),
    ("resume other model", lambda t, r: [*QUICK, "--resume", "--out-dir", str(r), *_set(model__dim=64)],
     "model.dim"),
    ("resume other algorithm", lambda t, r: [*QUICK, "--resume", "--out-dir", str(r), "--baseline", "2"], "gqc"),
    ("resume other engine", lambda t, r: [*QUICK, "--resume", "--out-dir", str(r), "--engine", "ddp"], "engine"),
    ("overwrite a foreign dir", lambda t, r: [*QUICK, "--overwrite", "--out-dir", _dir_with(t, "mine", b"keep")],
     "holds no run"),
    # checkpoints
    ("checkpoint truncated", lambda t, r: [*QUICK, "--resume", "--out-dir", str(_corrupt(r, t, "truncate"))],
     "cannot be read"),
    ("checkpoint corrupt", lambda t, r: [*QUICK, "--resume", "--out-dir", str(_corrupt(r, t, "random"))],
     "cannot be read"),
    ("latest dangling", lambda t, r: [*QUICK, "--resume", "--out-dir", str(_dangling(r, t))], "step_000099"),
    ("no checkpoint", lambda t, r: [*QUICK, "--resume", "--out-dir", str(_without_checkpoints(r, t))],
     "no checkpoint"),
    ("config.json corrupt", lambda t, r: [*QUICK, "--resume", "--out-dir", str(_bad_saved_config(r, t))],
     "config.json"),
    ("checkpoint of 2 ranks", lambda t, r: [*QUICK, "--resume", "--out-dir", str(_edited(r, t, _two_ranks))],
     "2 ranks"),
    ("checkpoint of another model", lambda t, r: [*QUICK, "--resume", "--out-dir", str(_edited(r, t, _wide))],
     "does not fit"),
    ("checkpoint of another algorithm",
     lambda t, r: [*QUICK, "--resume", "--out-dir", str(_edited(r, t, _other_algorithm))], "algorithm"),
    ("not a checkpoint", lambda t, r: [*QUICK, "--resume", "--out-dir", str(_edited(r, t, _foreign))],
     "not a gqc-train checkpoint"),
    # launcher environments
    ("ddp without launcher", lambda t, r: [*QUICK, "--engine", "ddp", "--out-dir", str(t / "x")], "launcher"),
]


def _dangling(run, tmp):
    copy = _copy_run(run, tmp / "copy")
    (copy / "checkpoints" / "latest").write_text("step_000099\n")
    return copy


def _without_checkpoints(run, tmp):
    copy = _copy_run(run, tmp / "copy")
    for path in sorted((copy / "checkpoints").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    return copy


def _bad_saved_config(run, tmp):
    copy = _copy_run(run, tmp / "copy")
    (copy / "config.json").write_text("{not json")
    return copy


def _edited(run, tmp, edit):
    copy = _copy_run(run, tmp / "copy")
    _edit_checkpoint(copy, edit)
    return copy


def _two_ranks(state):
    state["world_size"] = 2


def _wide(state):
    state["engine"]["model"]["wte.weight"] = torch.zeros(256, 64)


def _other_algorithm(state):
    state["engine"]["controller"]["algorithm"] = "fixed"


def _foreign(state):
    state.clear()
    state["weights"] = torch.zeros(3)


@pytest.mark.parametrize("build, needle", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(tmp_path, finished_run, capsys, build, needle):
    argv = build(tmp_path, finished_run)
    run_dir = Path(argv[argv.index("--out-dir") + 1]) if "--out-dir" in argv else None
    watched = [finished_run] + ([run_dir] if run_dir and run_dir.is_dir() else [])
    before = [_snapshot(root) for root in watched]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("gqc-train: "), err
    assert needle in err, err
    assert [_snapshot(root) for root in watched] == before  # nothing of any run changed
    if run_dir is not None and run_dir.name in ("x",):
        assert not run_dir.exists()  # refused before anything was written


def test_single_engine_under_a_multi_rank_launcher_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main([*QUICK, "--out-dir", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("gqc-train: engine 'single' runs one process") and "WORLD_SIZE=2" in err
    assert not (tmp_path / "x").exists()


def test_an_nccl_refusal_is_one_line_naming_it_not_a_lost_peer(tmp_path, capsys, monkeypatch):
    """NCCL's invalid-usage error (what an H200 printed for two ranks on one GPU) is a setup error,
    not a stalled or lost peer."""
    import gqc_dist.train.run as run

    printed = ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:93, invalid usage (run with "
               "NCCL_DEBUG=WARN for details), NCCL version 2.28.9")

    def refused(*args, **kwargs):
        raise torch.distributed.DistBackendError(printed)

    monkeypatch.setattr(run, "train", refused)
    assert main([*QUICK, "--out-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gqc-train: NCCL refused "), err
    assert "not a lost peer" in err and "invalid usage" in err and "stalled" not in err, err


def test_there_are_at_least_forty_cases():
    assert len(CASES) + 1 >= 40


def test_the_finished_run_resumes_cleanly(finished_run, tmp_path, capsys):
    """The control: the same run directory resumes (nothing to do) without a word of error."""
    copy = _copy_run(finished_run, tmp_path / "copy")
    assert main([*QUICK, "--resume", "--out-dir", str(copy)]) == 0
    assert json.loads((copy / "summary.json").read_text())["optimizer_steps"] == 12


@pytest.mark.parametrize("flags, folder", [([], "runs/gqc-train"), (["--quick"], "runs/gqc-train-quick"),
                                           (["--baseline", "2"], "runs/fixed-2"),
                                           (["--baseline", "2", "--quick"], "runs/fixed-2-quick")])
def test_runs_of_different_kinds_default_to_different_folders(flags, folder):
    from gqc_dist.train.cli import _parser, default_out_dir

    assert default_out_dir(_parser().parse_args(flags)) == folder
