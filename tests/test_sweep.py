"""``gqc-train sweep`` on one machine: the spec parser (every mistake one line), real sweeps of
real gqc-train runs (resume after SIGKILL, a diverging arm, two sweeps on one folder), the
report on synthetic runs, the GPU preset's path on CPU, and the kept benchmark: a seed-0 run
redone through the sweep gives the kept loss, and ``--report-only`` prints the README's tables.

Oracles: uninterrupted sweeps and direct gqc-train runs of the same commands; closed forms of
the records (a fixed k's windows); the README's text."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gqc_dist.errors import GQCConfigError
from gqc_dist.sweep import local, report, runs
from gqc_dist.sweep.spec import load, parse

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = {"model.seq_len": 32, "model.dim": 32, "model.layers": 1, "model.heads": 2, "data.max_bytes": 300000,
        "data.micro_batch_size": 4, "optimizer.warmup_steps": 2, "train.tokens": 20000,
        "train.optimizer_steps": 100000, "train.max_micro_steps": 100000, "train.eval_interval": 20,
        "train.eval_batches": 2, "train.final_eval_batches": 4, "train.checkpoint_interval": 100000}
TINY_SET = [f"{k}={json.dumps(v)}" for k, v in TINY.items()]


def sweep(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gqc_dist.train", "sweep", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def write_spec(folder: Path, **fields) -> Path:
    raw = {"base": {"set": dict(TINY)}, "results": "results", **fields}
    path = folder / "spec.json"
    path.write_text(json.dumps(raw))
    return path


def losses(results: Path):
    return {p.name: json.loads(p.read_text())["val_loss"] for p in sorted(results.glob("*@s*.json"))
            if not p.name.endswith(".failed.json")}


# --- the spec ---------------------------------------------------------------------------------

BAD = [
    ({"arms": [{"fixed": 1}], "bogus": 1}, "sweep spec: bogus: unknown key"),
    ({"arms": [{"fixed": 1, "lrr": [1]}]}, "arms[0].lrr: unknown key"),
    ({"arms": [{"fixed": 0.5}]}, "arms[0].fixed[0]: a fixed window is >= 1 micro-batch"),
    ({"arms": [{"fixed": 1}], "twins": ["nope"]}, "twins[0]: no arm named 'nope'"),
    ({"arms": [{"name": "c", "gqc": {"algorithm": "cbc", "kapa": 1}}], "k1_lr": 1}, "arms[0].gqc: unknown key"),
    ({"arms": [{"name": "c", "gqc": {"algorithm": "nope"}}], "k1_lr": 1}, "arms[0].gqc:"),
    ({"arms": [{"name": "c"}]}, "arms: a controller at lr \"k1\" needs fixed k = 1 arms"),
    ({"arms": [{"fixed": 1}], "base": {"set": {"model.dimm": 3}}}, "base.set: unknown key model.dimm"),
    ({"arms": [{"fixed": 1}], "base": {"set": {"model.dim": -3}}}, "base.set: model.dim must be >= 1"),
    ({"arms": [{"fixed": 1, "set": {"optimizer.lr_coupling": "bad"}}]}, "arm fixed1@1: set: optimizer.lr_coupling"),
    ({"arms": [{"fixed": 1}], "seeds": [0, 0]}, "seeds: a seed is listed twice"),
    ({"arms": [{"fixed": 1}], "seeds": [-1]}, "seeds[0]: expected a seed"),
    ({"arms": [{"fixed": 1, "lr": ["x"]}]}, "arms[0].lr[0]: expected a learning-rate multiplier"),
    ({"arms": [{"fixed": 1, "lr": "k1"}]}, "arms[0].lr: \"k1\" is for controllers"),
    ({"arms": [{"fixed": 1}], "command": "python x.py"}, "command: the template must pass {out}"),
    ({"arms": [{"fixed": 1}], "command": "python x.py {out} {foo}"}, "unknown placeholder 'foo'"),
    ({"arms": [{"fixed": 1}], "judge": "x"}, "judge: no controller arm named 'x'"),
    ({"arms": []}, "arms: expected a list of at least one arm"),
    ({}, "arms: missing"),
    ({"arms": [{"fixed": 1}, {"fixed": 1}]}, "arms[1]: arm 'fixed1@1' is defined twice"),
    ({"arms": [{"fixed": 1}], "base": {"config": "nofile.json"}}, "base.config: no such file"),
    ({"arms": [{"fixed": 1}], "nproc": 0}, "nproc: expected ranks per run"),
    ({"arms": [{"fixed": 1, "name": "a/b"}]}, "arms[0].name: arm name 'a/b'"),
    ({"arms": [{"fixed": 1}], "slurm": {"sbatch": "--gres=gpu:1"}}, "slurm.sbatch: expected a list"),
]


@pytest.mark.parametrize("raw, message", BAD, ids=[m.split(":")[0][:30] for _, m in BAD])
def test_every_spec_mistake_is_one_line_naming_the_key(tmp_path, raw, message):
    with pytest.raises(GQCConfigError) as error:
        parse(raw, tmp_path)
    text = str(error.value)
    assert message in text and "\n" not in text and text.startswith("sweep spec: "), text


def test_the_cli_refuses_a_bad_spec_in_one_line_and_runs_nothing(tmp_path):
    spec = write_spec(tmp_path, arms=[{"fixed": 1, "lr": [1]}], twins=["fixed2@1"])
    done = sweep(spec)
    assert done.returncode == 2
    assert done.stderr.strip() == "gqc-train sweep: sweep spec: twins[0]: no arm named 'fixed2@1' (arms: fixed1@1)"
    assert not (tmp_path / "results").exists()
    (tmp_path / "bad.json").write_text("{not json")
    assert sweep(tmp_path / "bad.json").stderr.count("\n") == 1


def test_arms_expand_with_their_names_rates_and_twins(tmp_path):
    spec = parse({"arms": [{"fixed": [1, 1.5], "lr": [0.5, 1]}, {"name": "cbc", "gqc": {"algorithm": "cbc", "kappa": 0.5}}],
                  "seeds": [0, 1], "twins": ["fixed1@1"], "base_lr": 0.002}, tmp_path)
    assert list(spec.arms) == ["fixed1@0.5", "fixed1@1", "fixed1.5@0.5", "fixed1.5@1", "cbc", "fixed1@1-twin"]
    assert len(spec.runs_planned()) == 12 and spec.judge == "cbc"
    command = runs.command_of(spec, spec.arms["fixed1.5@1"], 1, 1)
    assert command[command.index("--baseline") + 1] == "1.5"
    assert "optimizer.lr=0.002" in command and "optimizer.lr_coupling=\"sqrt\"" in command
    twin = runs.command_of(spec, spec.arms["fixed1@1-twin"], 0, 1)
    assert f"optimizer.lr={0.002 * (1 + 1e-6)!r}" in twin
    assert runs.command_of(spec, spec.arms["cbc"], 0, 0.5)[-1] == 'gqc={"algorithm": "cbc", "kappa": 0.5}'


# --- the report on synthetic runs ---------------------------------------------------------------

def _record(arm, kind, k, m, loss, steps, seed=0, windows=None, noise=None, bound=None):
    return {"setting": "s", "arm": arm, "seed": seed, "kind": kind, "k": k, "lr_multiplier": m, "val_loss": loss,
            "optimizer_steps": steps, "micro_steps": steps * (k or 2), "tokens": 1000,
            "windows": windows or {str(int(k)): steps}, "noise_scale": {"second_half": noise},
            "target": {"follow_second_half": 1.1 if kind == "controller" else None}, "steps_bound": bound}


def test_report_shows_gaps_histograms_noise_bound_and_what_is_not_finished(tmp_path):
    spec = parse({"name": "s", "arms": [{"fixed": [1, 2], "lr": [1, 2]}, {"name": "cbc", "gqc": None, "lr": 1}],
                  "seeds": [0, 1], "twins": ["fixed1@1"]}, tmp_path)
    records = [_record("fixed1@1", "fixed", 1, 1, 2.00, 1000), _record("fixed1@1", "fixed", 1, 1, 2.02, 1000, 1),
               _record("fixed1@2", "fixed", 1, 2, 2.10, 1000), _record("fixed2@1", "fixed", 2, 1, 2.20, 500),
               _record("fixed2@2", "fixed", 2, 2, 2.05, 500),
               _record("fixed1@1-twin", "twin", 1, 1, 2.002, 1000), _record("fixed1@1-twin", "twin", 1, 1, 2.0198, 1000, 1),
               _record("cbc", "controller", None, 1, 2.01, 600, windows={"1": 300, "2": 200, "4": 100},
                       noise=[2.0, 5.0, 9.0], bound=0.83),
               _record("cbc", "controller", None, 1, 2.0301, 610, 1, windows={"1": 300, "2": 310})]
    failure = {"arm": "fixed2@2", "seed": 1, "status": "diverged", "line": "gqc-train: training diverged", "log": "x.log"}
    text = report.markdown(spec, records, [failure], [("fixed2@1", 1)], Path("report.png"))
    rows = {line.split(" | ")[0].strip("| *"): line for line in text.splitlines() if line.startswith("| ")}
    assert "+0.50% [+0.50, +0.50] (2 seeds)" in rows["cbc@1"]  # 2.01/2.00 and 2.0301/2.02, paired
    assert "1:300 2:200 4:100" in rows["cbc@1"] and "2.0/5.0/9.0" in rows["cbc@1"] and rows["cbc@1"].endswith("| 0.83 |")
    assert "+0.05% [-0.01, +0.10]" in rows["fixed1@1-twin"]
    assert "largest paired gap 0.1000%" in text  # the noise floor
    assert "tuned as k=1: cbc (1x base lr) vs best fixed fixed1@1: +0.50%" in text and "met" in text
    assert "fixed2@2@s1: diverged: gqc-train: training diverged" in text
    assert "missing (1): fixed2@1@s1" in text and "resubmit with --slurm" in text
    assert "9 of 12 runs finished, 1 failed, 1 missing" in text
    assert report.plot(spec, records, tmp_path / "r.png").stat().st_size > 10_000


# --- real sweeps ------------------------------------------------------------------------------

def _processes_mentioning(text: str):
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if text in Path("/proc", pid, "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(pid))
            except OSError:
                pass
    return found


def test_a_sweep_killed_with_sigkill_resumes_keeping_every_finished_run(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    for folder in (killed, whole):
        folder.mkdir()
        write_spec(folder, arms=[{"fixed": [1, 2], "lr": [1]}])
    clean = subprocess.Popen([sys.executable, "-m", "gqc_dist.train", "sweep", whole / "spec.json", "--jobs", "2"],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = subprocess.Popen([sys.executable, "-m", "gqc_dist.train", "sweep", killed / "spec.json", "--jobs", "1"],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results, runs_dir = killed / "results", killed / "results" / "runs"
    deadline = time.monotonic() + 120
    while not (len(losses(results)) == 1 and (runs_dir / "fixed2@1@s0.log").exists()):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.poll() else "timeout"
        time.sleep(0.1)
    kept = (results / "fixed1@1@s0.json").read_bytes()
    first.send_signal(signal.SIGKILL)
    first.wait()
    deadline = time.monotonic() + 10  # the run in flight dies with its sweep (PR_SET_PDEATHSIG)
    while _processes_mentioning(str(runs_dir / "fixed2@1@s0")):
        assert time.monotonic() < deadline, "a run outlived its killed sweep"
        time.sleep(0.1)
    resumed = sweep(killed / "spec.json", "--jobs", "1")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "| 1 to run, 1 at a time" in resumed.stdout and "started fixed1@1@s0" not in resumed.stdout
    assert (results / "fixed1@1@s0.json").read_bytes() == kept  # not rerun, not rewritten
    assert "2 of 2 runs finished, 0 failed, 0 missing" in resumed.stdout
    assert clean.wait(timeout=120) == 0
    assert losses(results) == losses(whole / "results")  # the resumed sweep's losses are the clean sweep's


def test_a_diverging_arm_is_kept_as_failed_and_the_rest_runs_and_one_sweep_per_folder(tmp_path):
    spec_path = write_spec(tmp_path, arms=[{"fixed": 1, "lr": [1, 3e8]}])
    spec = load(spec_path)
    held = local.hold_results(spec)  # another sweep holds the folder
    try:
        refused = sweep(spec_path)
    finally:
        os.close(held)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert f"gqc-train sweep: {spec.results} is in use by gqc-train sweep pid {os.getpid()}" in refused.stderr
    assert "--results DIR" in refused.stderr and not losses(spec.results)
    done = sweep(spec_path, "--jobs", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    failure = json.loads((spec.results / "fixed1@3e+08@s0.failed.json").read_text())
    assert failure["status"] == "diverged" and failure["returncode"] == 4
    assert failure["line"].startswith("gqc-train: training diverged")
    assert list(losses(spec.results)) == ["fixed1@1@s0.json"]
    assert "fixed1@3e+08@s0: diverged: gqc-train: training diverged" in done.stdout
    again = sweep(spec_path)  # a failed run is a result of the grid: not rerun
    assert "| 0 to run" in again.stdout and "1 of 2 runs finished, 1 failed" in again.stdout
    keys = spec.runs_planned()
    assert runs.plan_status(spec, keys, retry_failed=True)["todo"] == [("fixed1@3e+08", 0)]  # --retry-failed


def test_the_gpu_preset_runs_its_path_on_cpu_and_matches_direct_runs(tmp_path):
    """configs/sweep_gpu.json, shrunk by --set to a CPU-sized model: the same spec, arms and
    report; each run's loss equals gqc-train run directly with the command the record keeps."""
    shrink = ["device=\"cpu\"", "precision=\"fp32\"", *TINY_SET]
    done = sweep(REPO / "configs" / "sweep_gpu.json", "--results", tmp_path / "r", "--jobs", "2",
                 *sum((["--set", s] for s in shrink), []))
    assert done.returncode == 0, done.stdout + done.stderr
    records = {r["arm"]: r for r in runs.load_records(load(REPO / "configs" / "sweep_gpu.json", shrink,
                                                           str(tmp_path / "r")))}
    assert sorted(records) == ["default", "fixed1@1", "fixed2@1", "fixed2@2"]
    assert records["fixed2@2"]["windows"] == {"2": records["fixed2@2"]["optimizer_steps"]}
    # the budget may end mid-window: a micro-batch consumed but not stepped on
    assert records["fixed2@2"]["micro_steps"] - 2 * records["fixed2@2"]["optimizer_steps"] in (0, 1)
    assert sum(records["default"]["windows"].values()) == records["default"]["optimizer_steps"]
    assert "4 of 4 runs finished" in done.stdout and (tmp_path / "r" / "report.png").exists()
    direct = records["fixed2@2"]["command"].split(" ")[2:]  # after "-m gqc_dist.train"
    out = direct.index("--out-dir") + 1
    direct[out] = str(tmp_path / "direct")
    subprocess.run([sys.executable, "-m", "gqc_dist.train", *direct], env=ENV, check=True, capture_output=True)
    assert json.loads((tmp_path / "direct" / "summary.json").read_text())["val_loss"] == records["fixed2@2"]["val_loss"]


# --- the kept benchmark, through the sweep ----------------------------------------------------

def test_efficiency_report_only_prints_the_readme_tables_line_for_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "efficiency.py"), "--report-only",
                           "--plot", tmp_path / "e.png"], env=ENV, capture_output=True, text=True, check=True)
    readme = (REPO / "benchmarks" / "README.md").read_text().splitlines()
    printed = [line for line in done.stdout.splitlines() if line.strip() and not line.startswith("wrote ")]
    assert len(printed) > 150
    missing = [line for line in printed if line not in readme]
    assert not missing, f"{len(missing)} printed lines are not in benchmarks/README.md, e.g. {missing[:3]}"


def test_a_kept_seed0_run_redone_through_the_sweep_gives_its_loss_to_the_printed_digit(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import efficiency
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    spec = efficiency.spec_of("third", ["fixed1@1"])
    spec.results, spec.runs = tmp_path / "results", tmp_path / "runs"
    status = local.run_local(spec, [("fixed1@1", 0)], say=lambda line: None)
    assert status["done"] == [("fixed1@1", 0)]
    new = json.loads((spec.results / "fixed1@1@s0.json").read_text())
    kept = json.loads((REPO / "benchmarks" / "results" / "third" / "fixed1@1@s0.json").read_text())
    assert f"{new['val_loss']:.4f}" == f"{kept['val_loss']:.4f}"
    assert (new["optimizer_steps"], new["tokens"], new["windows"]) == (kept["optimizer_steps"], kept["tokens"],
                                                                       kept["windows"])
