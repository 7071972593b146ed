"""``gqc-train sweep`` with a ``command`` template: the user's own training script.

The sweep runs ``gqc_dist.examples.hf_sweep`` (a real ``GQCTrainer``) for fixed k = 1, fixed
k = 2 and a CBC controller, 2 at a time, as a subprocess; its records are checked against
oracles that do not go through the recorder: the Trainer's own per-step logs (window, rate as
applied, noise scale), the arithmetic of fixed accumulation, and a second, direct run of the
script with the same arguments (same loss, bit for bit). A tiny inline script checks the two
ways a script's run fails (exit 0 without a result; CUDA out of memory) while the sweep goes on.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

BASE_LR, STEPS, BATCH, SEQ = 3e-3, 30, 4, 16  # STEPS, BATCH, SEQ: hf_sweep's defaults
FIXED2 = {"algorithm": "fixed", "accumulation_steps": 2}
CBC = {"algorithm": "cbc", "kappa": 0.25, "max_draws": 4}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def sweep(tmp, spec, jobs=2):
    """``gqc-train sweep SPEC --jobs 2 --results tmp/results`` as a subprocess: (output, results)."""
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    results = tmp / "results"
    done = subprocess.run([sys.executable, "-m", "gqc_dist.train", "sweep", str(path), "--jobs", str(jobs),
                           "--results", str(results)], cwd=tmp, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, results


def read(path):
    return json.loads(path.read_text())


def nearest_rank(values, qs=(0.1, 0.5, 0.9)):
    values = sorted(values)
    return [values[min(len(values) - 1, int(q * len(values)))] for q in qs] if values else None


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    if importlib.util.find_spec("transformers") is None:  # not imported here: the runs import it
        pytest.skip("needs the [hf] extra (transformers)")
    tmp = tmp_path_factory.mktemp("hf_sweep")
    lr2 = repr(BASE_LR * math.sqrt(2))  # the rate fixed k = 2 steps at (lr coupling sqrt)
    # the direct run of fixed k = 2's command, beside the sweep (3 runs on 2 jobs leave a core)
    direct = subprocess.Popen([sys.executable, "-m", "gqc_dist.examples.hf_sweep", "--out", str(tmp / "direct"),
                               "--seed", "0", "--lr", lr2, "--gqc", json.dumps(FIXED2)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    spec = {"base_lr": BASE_LR, "seeds": [0],
            "command": ["{python}", "-m", "gqc_dist.examples.hf_sweep", "--out", "{out}", "--seed", "{seed}",
                        "--lr", "{lr}", "--gqc", "{gqc}"],
            "arms": [{"fixed": [1, 2], "lr": [1]}, {"name": "cbc", "gqc": CBC, "lr": 1}]}
    try:
        stdout, results = sweep(tmp, spec)
        output = direct.communicate(timeout=240)[0]
    finally:
        direct.kill()  # a no-op once it exited
    assert direct.returncode == 0, output[-3000:]
    return SimpleNamespace(stdout=stdout, results=results, runs=results / "runs", direct=tmp / "direct", lr2=lr2)


def steps_logged(run_dir):
    """The Trainer's own log line of every optimizer step (``logging_steps`` 1), by step."""
    logs = [entry for entry in read(run_dir / "log_history.json") if "loss" in entry]
    assert [entry["step"] for entry in logs] == list(range(1, STEPS + 1))
    return logs


def test_every_run_has_its_record(hf):
    assert "3 done, 0 failed" in hf.stdout
    assert sorted(p.name for p in hf.results.glob("*.json")) == ["cbc@s0.json", "fixed1@1@s0.json",
                                                                 "fixed2@1@s0.json"]
    assert (hf.results / "report.md").exists()
    for name in ("cbc", "fixed1@1", "fixed2@1"):
        assert (hf.runs / f"{name}@s0" / "sweep_result.json").exists()


@pytest.mark.parametrize("name, k", [("fixed1@1", 1), ("fixed2@1", 2)])
def test_fixed_arms_are_exact(hf, name, k):
    record = read(hf.results / f"{name}@s0.json")
    assert (record["arm"], record["kind"], record["k"], record["lr_multiplier"]) == (name, "fixed", k, 1)
    assert record["windows"] == {str(k): STEPS}
    assert record["optimizer_steps"] == STEPS and record["optimizer_steps"] * k == record["micro_steps"]
    assert record["tokens"] == STEPS * k * BATCH * SEQ
    assert record["mean_window"] == {"all": k, "second_half": k}


def test_fixed2_steps_at_base_lr_times_sqrt2(hf):
    record = read(hf.results / "fixed2@1@s0.json")
    command = record["command"].split()
    assert float(command[command.index("--lr") + 1]) == pytest.approx(BASE_LR * math.sqrt(2), rel=1e-12)
    assert command[command.index("--lr") + 1] == hf.lr2
    # the rate the optimizer stepped at, as the Trainer logged it (constant schedule, no coupling)
    assert {entry["learning_rate"] for entry in steps_logged(hf.runs / "fixed2@1@s0")} == {float(hf.lr2)}
    assert {entry["learning_rate"] for entry in steps_logged(hf.runs / "fixed1@1@s0")} == {BASE_LR}


def test_fixed2_record_equals_a_direct_run(hf):
    record, direct = read(hf.results / "fixed2@1@s0.json"), read(hf.direct / "sweep_result.json")
    assert record["val_loss"] == direct["val_loss"]  # the same process, bit for bit
    for key, value in direct.items():
        if key != "wall_time":
            assert record[key] == value, key


@pytest.mark.parametrize("name", ["fixed1@1", "fixed2@1", "cbc"])
def test_windows_and_noise_scale_come_from_the_wrapper(hf, name):
    """The record against the Trainer's logs: each step's window and noise scale (micro-batches)."""
    record, logs = read(hf.results / f"{name}@s0.json"), steps_logged(hf.runs / f"{name}@s0")
    windows = {}
    for entry in logs:
        windows[str(entry["gqc/last_num_draws"])] = windows.get(str(entry["gqc/last_num_draws"]), 0) + 1
    assert record["windows"] == windows
    noise = [entry.get("gqc/noise_scale_micro_batches") for entry in logs]  # absent: not finite
    assert record["noise_scale"]["all"] == nearest_rank([n for n in noise if n is not None])
    assert record["noise_scale"]["second_half"] == nearest_rank([n for n in noise[STEPS // 2:] if n is not None])
    eval_loss = [entry["eval_loss"] for entry in read(hf.runs / f"{name}@s0" / "log_history.json")
                 if "eval_loss" in entry]
    assert record["val_loss"] == eval_loss[-1]


def test_controller_record(hf):
    record = read(hf.results / "cbc@s0.json")
    assert (record["kind"], record["k"], record["lr_multiplier"]) == ("controller", None, 1)
    assert '"algorithm": "cbc"' in record["command"]
    windows = {int(k): n for k, n in record["windows"].items()}
    assert sum(windows.values()) == record["optimizer_steps"] == STEPS
    assert sum(k * n for k, n in windows.items()) == record["micro_steps"]
    assert max(windows) <= CBC["max_draws"]
    assert record["noise_scale"]["all"] is not None
    assert record["tokens"] == record["micro_steps"] * BATCH * SEQ


SCRIPT = """
import sys
from types import SimpleNamespace
out, arm = sys.argv[1], sys.argv[2]
if arm == "silent":  # exits 0 and forgets its result
    sys.exit(0)
if arm == "fixed2@1":
    import torch
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
from gqc_dist.sweep import RunRecorder
recorder = RunRecorder()
for draws, noise in ((1, None), (1, 2.0), (1, 4.0)):  # a trainer-like object holding its wrapper as .gqc
    wrapper = SimpleNamespace(last_num_draws=draws, statistics=lambda n=noise: {"gradient_noise_scale_micro_batches": n})
    recorder.observe(SimpleNamespace(gqc=wrapper, optimizer=SimpleNamespace(optimizer=SimpleNamespace())))
recorder.write(out, val_loss=1.5, tokens=64)
"""


def test_script_failures_are_recorded_and_the_sweep_goes_on(tmp_path):
    """The silent run fails at once, the OOM run soon after; fixed k = 1 starts after the first
    failure and finishes after both (its windows observed through a trainer's ``.gqc``)."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    spec = {"base_lr": 1e-3, "command": ["{python}", str(script), "{out}", "{arm}"],
            "arms": [{"name": "silent", "gqc": None, "lr": 1}, {"fixed": [2, 1], "lr": [1]}]}
    stdout, results = sweep(tmp_path, spec)
    assert "1 done, 2 failed" in stdout
    silent = read(results / "silent@s0.failed.json")
    assert (silent["status"], silent["returncode"]) == ("no result", 0)
    assert "gqc_dist.sweep.write_result(out, val_loss, tokens, windows)" in silent["line"]
    assert "sweep_result.json" in silent["line"]
    oom = read(results / "fixed2@1@s0.failed.json")
    assert oom["status"] == "out of memory" and oom["returncode"] == 1
    assert oom["line"] == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    record = read(results / "fixed1@1@s0.json")
    assert (record["val_loss"], record["optimizer_steps"], record["micro_steps"], record["tokens"]) == (1.5, 3, 3, 64)
    assert record["windows"] == {"1": 3} and record["noise_scale"]["all"] == [2.0, 4.0, 4.0]
    assert not (results / "fixed2@1@s0.json").exists() and not (results / "silent@s0.json").exists()
