"""The torchtitan 0.3.0 recipe (gqc_dist.frontends.torchtitan) on FSDP2 over 2 gloo ranks.

One real torchrun launch (``tests/torchtitan_launch.py``; torchtitan's imports cost ~10 s a
process, so the checks share it) runs the recipe through torchtitan's config registry path
(``--module torchtitan_helpers --config recorded``) with checkpoints, resumes it from its step-2
checkpoint, runs gqc_dist's own loop on the same micro-batches (the oracle), checks the gradient
accumulation refusal and runs the example through ``torchtitan.train.main``. The tests below
compare what it saved. The rest run in this process: the optimizer view that lets the lr hook
reach the real lr, the refusals torchtitan's config knows at construction, and the pins on the
torchtitan pieces the recipe relies on.
"""

import dataclasses
import inspect
import math
import os
import re
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch

import torchtitan_helpers as h
from distributed_harness import run_launcher, torchrun_command
from gqc_dist.errors import GQCConfigError
from gqc_dist.frontends import torchtitan as recipe

TOL = 1e-6


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("titan")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GQC_TITAN_OUT": str(out)}
    start = time.perf_counter()
    finished = run_launcher(torchrun_command(2, Path(__file__).with_name("torchtitan_launch.py")), env=env,
                            timeout=300)
    wall = time.perf_counter() - start
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-6000:]
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    return {"ranks": ranks, "log": finished.stdout + finished.stderr, "wall": wall}


def _full(launch):
    return launch["ranks"][0]["runs"][0]


def _decisions(windows):
    """Per micro-batch decisions of a run that took ``windows`` (no window was dropped)."""
    return [draw == n for n in windows for draw in range(1, n + 1)]


# ---------------------------------------------------------------------- against gqc_dist's own loop
def test_recipe_on_fsdp2_matches_gqc_dist_loop(launch):
    full, oracle = _full(launch), launch["ranks"][0]["oracle"]
    windows = [step["window"] for step in full["steps"]]
    assert full["section"]["max_draws"] == 4  # the section key overridden on torchtitan's command line
    assert len(set(windows)) > 1, f"the windows never varied ({windows}): the test would not see a wrong decision"
    assert _decisions(windows) == oracle["decisions"]
    assert windows == oracle["windows"]
    norms = [step["grad_norm"] for step in full["steps"]]
    assert min(norms) < h.MAX_NORM < max(norms)  # training.max_norm clipped some steps (GQC clips the mean)
    for name, value in full["final"].items():
        assert (value - full["init"][name]).abs().max() > 1e-3  # it trained
        assert torch.allclose(value, oracle["final"][name], rtol=0, atol=TOL), name
    # torchtitan's own step counter and scheduler count optimizer steps
    assert full["final_step"] == h.STEPS == oracle["num_steps"]
    assert [step["step"] for step in full["steps"]] == list(range(1, h.STEPS + 1))
    assert [step["num_steps"] for step in full["steps"]] == list(range(1, h.STEPS + 1))
    assert [step["last_epoch"] for step in full["steps"]] == list(range(1, h.STEPS + 1))
    assert full["steps"][-1]["num_batches"] == oracle["num_batches"] == sum(windows)


def test_learning_rate_per_step_reaches_the_optimizer(launch):
    """The scheduler's lr, and the sqrt coupling the window hook applies on top, at each step:
    the hook wrote the inner AdamW's groups (the parameters above match the oracle, whose AdamW
    took the same lr), and the groups hold the scheduler's value again afterwards."""
    full, oracle = _full(launch), launch["ranks"][0]["oracle"]
    for index, (step, oracle_lr) in enumerate(zip(full["steps"], oracle["lrs"])):
        scheduled = h.LR * h.lr_factor(index)
        assert step["scheduled_lr"] == pytest.approx(scheduled, rel=1e-12)
        assert step["applied_lr"] == pytest.approx(scheduled * math.sqrt(step["window"]), rel=1e-12)
        assert step["applied_lr"] == pytest.approx(oracle_lr, rel=1e-12)
        assert step["group_lr_after"] == pytest.approx(h.LR * h.lr_factor(index + 1), rel=1e-12)


def test_gqc_statistics_reach_torchtitan_metrics(launch):
    full, oracle = _full(launch), launch["ranks"][0]["oracle"]
    metrics = full["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, h.STEPS + 1))
    for logged, step, loss in zip(metrics, full["steps"], oracle["losses"]):
        assert logged["gqc/window"] == step["window"]
        assert logged["gqc/applied_lr"] == pytest.approx(step["applied_lr"])
        assert logged["gqc/num_batches"] == step["num_batches"]
        assert logged["gqc/gradient_norm_threshold"] == pytest.approx(step["threshold"])
        assert logged["lr/AdamW"] == pytest.approx(step["scheduled_lr"])
        assert logged["grad_norm"] == pytest.approx(step["grad_norm"])
        # the window's mean of micro-batch global token means (what GQC averaged)
        assert logged["loss_metrics/global_avg_loss"] == pytest.approx(loss, abs=TOL)
        assert logged["n_tokens_seen"] == step["num_batches"] * 2 * h.LOCAL_BATCH * h.SEQ
        assert "gqc/lr" not in logged  # the optimizer's own values are torchtitan's lr/... metrics
    lines = re.findall(r"gqc: step +(\d+) +window (\d+)", launch["log"])
    assert len(lines) >= 2 * h.STEPS  # every rank logs a gqc line per step


def test_ranks_agree(launch):
    first, second = (rank["runs"] for rank in launch["ranks"])
    for run_a, run_b in zip(first, second):
        assert [s["window"] for s in run_a["steps"]] == [s["window"] for s in run_b["steps"]]
        for name in run_a["final"]:
            assert torch.equal(run_a["final"][name], run_b["final"][name])


# ---------------------------------------------------------------------- checkpoints
def test_resume_through_torchtitan_checkpointer_continues_exactly(launch):
    full, resumed = launch["ranks"][0]["runs"]
    windows_at_2 = sum(step["window"] for step in full["steps"][:2])
    # torchtitan restored its step and the data position, GQC its counters (train_state)
    assert resumed["loaded"] == {"step": 3, "num_steps": 2, "num_batches": windows_at_2,
                                 "dataloader": {"index": windows_at_2}}
    keys = ("step", "window", "applied_lr", "scheduled_lr", "threshold", "num_batches", "grad_norm")
    # the threshold schedule and the noise estimate resumed too: same thresholds, windows and norms
    assert [{k: s[k] for k in keys} for s in resumed["steps"]] == [{k: s[k] for k in keys} for s in full["steps"][2:]]
    assert resumed["final_step"] == h.STEPS
    for name, value in full["final"].items():
        assert torch.allclose(resumed["final"][name], value, rtol=0, atol=TOL), name


# ---------------------------------------------------------------------- refusals
def test_gradient_accumulation_is_refused(launch):
    message = launch["ranks"][0]["refused_accumulation"]
    assert "training.global_batch_size" in message and "gives 2" in message


def _fields(config):
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


@pytest.mark.parametrize("change, setting", [
    (lambda c: setattr(c.training, "disable_cuda_graphs", False), "training.disable_cuda_graphs"),
    (lambda c: c.gradient_quality_control.update(local_accumulation=True), "gradient_quality_control.local_accumulation"),
    (lambda c: setattr(c.parallelism, "pipeline_parallel_degree", 2), "parallelism.pipeline_parallel_degree"),
    (lambda c: setattr(c.training, "max_norm", -1.0), "training.max_norm"),
    (lambda c: c.gradient_quality_control.update(kapa=1), "gradient_quality_control.kapa"),
    (lambda c: c.gradient_quality_control.clear(), "gradient_quality_control.algorithm"),
])
def test_bad_configs_are_refused_naming_the_setting(change, setting):
    config = recipe.with_gqc(h.tiny_trainer_config(), h.SECTION)
    assert config.training.disable_cuda_graphs  # with_gqc turns CUDA graphs off
    change(config)
    with pytest.raises(GQCConfigError, match=re.escape(setting)) as error:
        recipe.GQCTrainer.Config(**_fields(config))  # as torchtitan's command-line parsing constructs it
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------- the optimizer view
def test_lr_hook_reaches_the_inner_optimizer_through_the_view():
    """torchtitan's container has no lr in its own param group; the view hands GQC the inner
    AdamW's groups, so the window hook's lr is the one AdamW steps with, and the container's
    step hooks still run."""
    from torchtitan.components.optimizer import default_adamw

    from gqc_dist.config import build_controller, parse_section
    from gqc_dist.engines import TorchOptimizerGradients

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    container = default_adamw(lr=0.01, weight_decay=0.0).build(model_parts=[model])
    assert "lr" not in container.param_groups[0]  # why the view exists
    view = recipe.OptimizersView(container)
    assert view.param_groups[0] is container.optimizers[0].param_groups[0]
    hook_calls = []
    container.register_step_pre_hook(lambda *args: hook_calls.append(1))
    wrapper, _ = build_controller(parse_section({"algorithm": "fixed", "accumulation_steps": 2, "lr_coupling": "sqrt"}),
                                  view, gradients=TorchOptimizerGradients(view))
    inputs = [torch.randn(5, 4) for _ in range(2)]
    for x in inputs:
        model(x).square().mean().backward()
        decision = wrapper.after_backward()
    assert decision.stepped and decision.window.lr == pytest.approx(0.01 * math.sqrt(2))
    assert hook_calls == [1] and all(p.grad is None for p in model.parameters())
    assert view.param_groups[0]["lr"] == 0.01  # the scheduler's value again after the step
    by_hand = torch.optim.AdamW(reference.parameters(), lr=0.01 * math.sqrt(2), betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.0, fused=True)
    for x in inputs:
        reference(x).square().mean().backward()
    for p in reference.parameters():
        p.grad /= 2
    by_hand.step()
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(mine, theirs, rtol=0, atol=TOL)


# ---------------------------------------------------------------------- the pins
def test_torchtitan_pieces_the_recipe_relies_on_have_not_moved():
    """Fails when torchtitan changes what the recipe overrides or calls (pinned to 0.3.0)."""
    from torchtitan.components.checkpointer.base import BaseCheckpointManager
    from torchtitan.components.loss import IGNORE_INDEX
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.trainer import Trainer

    def params(function):
        return [(p.name, p.kind.name) for p in inspect.signature(function).parameters.values()]

    assert metadata.version("torchtitan") == recipe.TESTED_TORCHTITAN == "0.3.0"
    assert params(Trainer.train_step) == [("self", "POSITIONAL_OR_KEYWORD"), ("data_iterator", "POSITIONAL_OR_KEYWORD")]
    assert params(Trainer.forward_backward_step) == [("self", "POSITIONAL_OR_KEYWORD"), ("input_dict", "KEYWORD_ONLY"),
                                                     ("labels", "KEYWORD_ONLY"), ("global_valid_tokens", "KEYWORD_ONLY")]
    assert params(Trainer.state_dict) == [("self", "POSITIONAL_OR_KEYWORD")]
    assert [name for name, _ in params(Trainer.load_state_dict)] == ["self", "state_dict"]
    assert [name for name, _ in params(MetricsProcessor.log)] == ["self", "step", "global_avg_loss", "global_max_loss",
                                                                   "grad_norm", "extra_metrics"]
    assert [name for name, _ in params(MetricsProcessor.should_log)] == ["self", "step"]
    assert callable(LRSchedulersContainer.get_metrics) and callable(LRSchedulersContainer.step)
    assert callable(BaseCheckpointManager.maybe_wait_for_staging)
    assert callable(ParallelDims.get_mesh) and callable(ParallelDims.get_optional_mesh)
    for flag in ("dp_enabled", "fsdp_enabled", "dp_cp_enabled", "pp_enabled"):
        assert isinstance(getattr(ParallelDims, flag), property), flag
    for reduce in (dist_utils.dist_sum_tensor, dist_utils.dist_sum, dist_utils.dist_max):
        assert [name for name, _ in params(reduce)] == ["x", "mesh", "extra_pg"]
    assert IGNORE_INDEX == -100
    assert "optimizers" in OptimizersContainer.__annotations__
    assert "Optimizer.__init__(self, all_params, {})" in inspect.getsource(OptimizersContainer._post_init)
    # train() counts a step, runs train_step, then saves: a train_step is one optimizer step and
    # a checkpoint never sees an open window; the trainer itself is the checkpoint's train_state
    train = inspect.getsource(Trainer.train)
    assert train.index("self.step += 1") < train.index("self.train_step(data_iterator)") < train.index(
        "self.checkpointer.save(")
    assert '"train_state": self' in inspect.getsource(Trainer.__init__)
    # the torch 2.13 gap the recipe fills (recipe._fill_torch_gaps)
    assert "torch.distributed.set_timeout(" in inspect.getsource(dist_utils.set_pg_timeouts)


# ---------------------------------------------------------------------- the example
def test_example_runs_through_torchtitan_train_main(launch):
    """``gqc_dist.examples.torchtitan_tiny`` ran 4 steps through torchtitan.train.main (last in
    the launch) and logged its windows."""
    windows = re.findall(r"gqc: step +4 +window (\d+)", launch["log"])
    assert len(windows) >= 2, launch["log"][-3000:]
    assert "Training completed" in launch["log"]
