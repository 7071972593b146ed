"""Decisions and losses are unchanged by the refactors: stored reference runs (``reference_runs/``,
made by gqc_dist at 0b74d90, before the front-end contract, the layout and the one validator)
rerun from the config.json gqc-train saved for each (so a later change of the defaults does not
move them) give the same windows, step by step, and the same losses to the last bit. They are the main job shortened (micro-batches of 16 sequences), 2-sequence
micro-batches with ``--baseline 1``, and 2-sequence micro-batches at kappa 2, where the windows
vary from 1 to 16. (``test_sweep.py`` reruns the kept seed-0 run of the ``third`` setting the same
way.)"""

import json
from pathlib import Path

import pytest

from train_runs import gqc_train, records, summary

RUNS = sorted((Path(__file__).parent / "reference_runs").glob("*.json"))


@pytest.mark.parametrize("reference", RUNS, ids=[path.stem for path in RUNS])
def test_a_stored_run_reruns_to_the_same_windows_and_losses(tmp_path, reference):
    stored = json.loads(reference.read_text())
    config = tmp_path / "config.json"
    config.write_text(json.dumps(stored["config"]))
    out = tmp_path / "run"
    argv = [str(config) if a == "CONFIG" else str(out) if a == "RUN" else a for a in stored["command"][1:]]
    gqc_train(*argv)  # a subprocess with one thread, as the references were made
    steps = records(out)
    assert [r["draws"] for r in steps] == stored["draws"]
    assert steps[-1]["loss"] == stored["last_loss"]
    result = summary(out)
    assert (result["val_loss"], result["optimizer_steps"], result["micro_steps"]) == \
        (stored["val_loss"], stored["optimizer_steps"], stored["micro_steps"])


def test_the_references_cover_varying_windows_and_fixed_k1():
    stored = {path.stem: json.loads(path.read_text()) for path in RUNS}
    assert set(stored) == {"main-job", "micro-batch-2-fixed-k1", "micro-batch-2-kappa-2"}
    assert len(set(stored["micro-batch-2-kappa-2"]["draws"])) > 5  # the controller had something to decide
    fixed = stored["micro-batch-2-fixed-k1"]["config"]
    assert (fixed["gqc"]["algorithm"], fixed["gqc"]["accumulation_steps"], fixed["data"]["micro_batch_size"]) == \
        ("fixed", 1, 2)
