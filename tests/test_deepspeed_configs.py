"""The shipped ds_config files and the DeepSpeed example, run as a user would."""

import json
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import gqc_dist.frontends.deepspeed as gqc_deepspeed  # noqa: E402
from distributed_harness import run_distributed, run_launcher, torchrun_command  # noqa: E402
from gqc_dist.train.corpus import ByteBatches, load_corpus  # noqa: E402
from gqc_dist.train.model import GPT, ModelConfig  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _run_config(rank, world_size, path):
    model = GPT(ModelConfig(seq_len=16, dim=16, layers=1, heads=2))
    engine, _, _, _ = gqc_deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=str(path))
    train, _ = load_corpus(max_bytes=100_000)
    batches = ByteBatches(train, 16, engine.train_micro_batch_size_per_gpu(), seed=0, rank=rank,
                          world_size=world_size)
    decisions = []
    for _ in range(6):
        x, y = batches.next()
        engine.backward(engine.module.loss(x, y))
        decisions.append(engine.step())
    return {"decisions": decisions, "stage": engine.zero_optimization_stage(),
            "steps": engine.global_steps, "algorithm": engine.gqc.ALGORITHM}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shipped_ds_config_loads_and_trains(stage):
    path = CONFIGS / f"ds_zero{stage}.json"
    assert json.loads(path.read_text())["gradient_quality_control"]["algorithm"] == "gnts"
    results = run_distributed(_run_config, 2, path, timeout=300)
    assert all(r == results[0] for r in results)
    assert results[0]["stage"] == stage and results[0]["algorithm"] == "gnts"
    assert results[0]["steps"] == sum(results[0]["decisions"]) > 0


def test_deepspeed_example_under_torchrun_shows_a_variable_batch():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = torchrun_command(2, "-m", "gqc_dist.examples.deepspeed_gpt", "--deepspeed_config",
                               CONFIGS / "ds_zero2.json", "--micro-steps", "40")
    finished = run_launcher(command, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    draws = [int(m) for m in re.findall(r"draws +(\d+)", finished.stdout)]
    assert len(draws) >= 3 and len(set(draws)) > 1, finished.stdout
    samples = [int(m) for m in re.findall(r"samples (\d+)", finished.stdout)]
    # global_samples counts exactly the micro-batches each step used (8 per rank, 2 ranks)
    assert samples[-1] == sum(draws) * 8 * 2
