"""GQCTrainer (transformers Trainer) and the Accelerate helper on the real frameworks, against
gqc_dist's own loop on the same micro-batches.

Every run records the micro-batches the framework actually fed (``compute_loss`` / the loop) and
replays them through gqc_dist's own loop in one process (a data-parallel micro-step is the
concatenation of the ranks' micro-batches): same decisions per micro-batch, parameters within
1e-6, the framework's own optimizer-step count, the learning rate at each step. The model is a
2-layer Llama built from a config (vocab 64, width 16): nothing is downloaded.

Multi-rank runs are real processes (``run_distributed``, gloo, DeepSpeed's CPU accelerator).
To stay within the file's time budget, each of the two sessions (DDP, DeepSpeed ZeRO-2) runs
several scenarios in the same two processes; the tests below read their parts.

Not here: the Trainer on FSDP2. Accelerate enables FSDP only on accelerator devices (its
``AcceleratorState`` ignores an ``fsdp_plugin`` for ``MULTI_CPU`` and runs DDP), so it cannot run
on these CPU machines; the FSDP2-specific part of the integration (each rank's DTensor gradient
shards saved and restored mid-window) is tested directly on FSDP2 over gloo.
"""

import inspect
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported (the fork server too)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from distributed_harness import preload_in_forkserver, run_distributed  # noqa: E402

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

from gqc_dist.config import build_controller, parse_section  # noqa: E402
from gqc_dist.core import session as gqc_session  # noqa: E402
from gqc_dist.engines import TorchOptimizerGradients  # noqa: E402
from gqc_dist.errors import GQCConfigError  # noqa: E402
from gqc_dist.frontends import accelerate as gqc_accelerate  # noqa: E402
from gqc_dist.frontends.hf import GQCTrainer  # noqa: E402

# ranks import these once, in the fork server, when this file starts it
preload_in_forkserver("gqc_dist.frontends.hf", "transformers.models.llama.modeling_llama", __name__)

VOCAB, SEQ = 64, 8
LR = 1e-3
# GNTS on the tiny Llama: windows of 3 and 4 micro-batches (the mean gradient's norm falls from
# ~1.1 at one micro-batch to ~0.55 at four); clipping at 0.5 engages on every step
GNTS = {"algorithm": "gnts", "threshold": 0.64, "max_draws": 4}
CLIP = 0.5


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ)
    return LlamaForCausalLM(config)


def token_data(count, seed=1):
    ids = torch.randint(0, VOCAB, (count, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(count)]


def collate(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


class Decisions(TrainerCallback):
    """The Trainer's view of each micro-batch, through its public callbacks: ``on_step_end``
    after an optimizer step, ``on_substep_end`` otherwise."""

    def __init__(self):
        self.decisions = []

    def on_substep_end(self, args, state, control, **kwargs):
        self.decisions.append(False)

    def on_step_end(self, args, state, control, **kwargs):
        self.decisions.append(True)


class RecordingTrainer(GQCTrainer):
    """Records the micro-batches the Trainer feeds (public ``compute_loss``)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen.append({key: inputs[key].detach().cpu().clone() for key in ("input_ids", "labels")})
        return super().compute_loss(model, inputs, *args, **kwargs)


def linear_decay(total):
    """The Trainer's default schedule (linear, no warm-up), written out: lr x (T - s) / T."""
    return lambda step: max(0.0, (total - step) / total)


def run_trainer(out, data, *, gqc=GNTS, batch=4, max_steps=-1, epochs=1, save=False, resume=None, deepspeed=None,
                **extra):
    args = TrainingArguments(
        out, per_device_train_batch_size=batch, max_steps=max_steps, num_train_epochs=epochs, learning_rate=LR,
        optim="adamw_torch", max_grad_norm=CLIP, logging_steps=1, report_to=[], disable_tqdm=True, seed=0,
        save_strategy="epoch" if save else "no", use_cpu=True, deepspeed=deepspeed, **extra)
    callback = Decisions()
    trainer = RecordingTrainer(model=tiny_llama(), args=args, train_dataset=data, gqc=gqc, callbacks=[callback])
    trainer.seen = []
    trainer.train(resume_from_checkpoint=resume)
    module = trainer.model_wrapped.module if deepspeed else trainer.model
    step_logs = [log for log in trainer.state.log_history if "loss" in log]
    return {"seen": trainer.seen, "decisions": callback.decisions, "global_step": trainer.state.global_step,
            "params": [p.detach().clone() for p in module.parameters()], "logs": step_logs,
            "scheduler_steps": getattr(trainer.lr_scheduler, "last_epoch", None),
            "gqc_steps": trainer.gqc.num_steps,
            "ds_global_steps": getattr(trainer.model_wrapped, "global_steps", None)}


def own_loop(ranks_seen, gqc, total_steps, clip=CLIP, optimizer="adamw", micro_batch_size=None):
    """gqc_dist's own loop (the controller the section describes, driven by hand) on the
    micro-batches each rank was fed; returns (model, decisions, lr at each step)."""
    model = tiny_llama()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, linear_decay(total_steps))
    controller, _ = build_controller(parse_section(gqc), opt, gradients=TorchOptimizerGradients(opt, clip=clip),
                                     micro_batch_size=micro_batch_size)
    decisions, lrs = [], []
    for batches in zip(*ranks_seen):
        batch = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
        model(**batch).loss.backward()
        decision = controller.after_backward()
        decisions.append(decision.stepped)
        if decision.stepped:
            lrs.append(decision.window.lr)
            scheduler.step()
    return model, decisions, lrs


def assert_params(got, model, atol=1e-6):
    for index, (a, b) in enumerate(zip(got, model.parameters())):
        torch.testing.assert_close(a, b.detach(), atol=atol, rtol=0, msg=f"parameter {index}")


def assert_trainer_matches(result, oracle, *, adaptive=True):
    model, decisions, lrs = oracle
    assert result["decisions"] == decisions
    if adaptive:
        windows = {b - a for a, b in zip([-1] + [i for i, d in enumerate(decisions) if d],
                                         [i for i, d in enumerate(decisions) if d])}
        assert len(windows) > 1, f"the scenario should take windows of several lengths, got {windows}"
    steps = sum(decisions)
    assert result["global_step"] == result["gqc_steps"] == steps
    assert result["scheduler_steps"] == steps  # the lr scheduler stepped once per optimizer step
    assert [log["learning_rate"] for log in result["logs"]] == pytest.approx(lrs, rel=1e-12)
    assert [log["step"] for log in result["logs"]] == list(range(1, steps + 1))
    for log in result["logs"]:  # GQC's statistics in the Trainer's own logs
        assert {"gqc/window", "gqc/num_steps", "gqc/mean_grad_norm"} <= set(log)
        assert log["grad_norm"] > CLIP  # the window mean's norm before GQC clipped it
    assert_params(result["params"], model)


# ---------------------------------------------------------------------- single process
def test_trainer_single_process_matches_own_loop(tmp_path):
    """One class changed: max_steps, the lr schedule, global_step, logs and callbacks count
    optimizer steps; GQC clips the window mean (the Trainer's per-micro-batch clip would give
    other parameters); windows span epochs (12 micro-batches per epoch, ~20 used)."""
    result = run_trainer(str(tmp_path), token_data(48), max_steps=6)
    assert result["global_step"] == 6
    oracle = own_loop([result["seen"]], GNTS, total_steps=6, micro_batch_size=4)
    assert_trainer_matches(result, oracle)
    assert result["logs"][-1]["epoch"] > 1
    # the run ends on a step: the logged windows (one log per step) add up to the micro-batches fed
    assert sum(log["gqc/window"] for log in result["logs"]) == len(result["seen"])


def test_trainer_resume_mid_window_single_process(tmp_path):
    """An epoch-end checkpoint falls mid-window (10 micro-batches per epoch, windows of 3-4);
    resuming from it continues exactly as the uninterrupted run, which matches gqc_dist's loop."""
    data = token_data(40)
    full = run_trainer(str(tmp_path / "full"), data, epochs=2, save=True)
    oracle = own_loop([full["seen"]], GNTS, total_steps=20, micro_batch_size=4)
    assert_trainer_matches(full, oracle)
    first = min((p for p in (tmp_path / "full").iterdir() if p.name.startswith("checkpoint-")),
                key=lambda p: int(p.name.split("-")[1]))
    state = torch.load(first / "gqc_state_rank0.pt", weights_only=True)
    assert state["wrapper"]["counters"]["num_draws"] > 0 and state["wrapper"]["accumulated_grads"] is not None
    resumed = run_trainer(str(tmp_path / "resumed"), data, epochs=2, resume=str(first))
    assert resumed["global_step"] == full["global_step"]
    assert len(resumed["seen"]) == 10  # the second epoch only: the data position is GQC's micro-batch count
    assert [log["learning_rate"] for log in resumed["logs"]] == pytest.approx(
        [log["learning_rate"] for log in full["logs"]], rel=1e-12)
    for a, b in zip(resumed["params"], full["params"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- DDP session (2 ranks)
SGD_LR = 0.05
ACC_SECTION = {"algorithm": "gnts", "threshold": 0.7, "max_draws": 4}
ACC_MICRO_STEPS, ACC_SAVE_AT = 14, 5


def _accelerate_run(acc_kwargs, section, total_steps, save_dir, fresh_resume=True):
    """A plain Accelerate loop changed in 3 lines (``prepare`` with ``gqc=``, ``if gqc.step():
    scheduler.step()``). Saves mid-window after ACC_SAVE_AT micro-batches, runs on, then resumes
    from the save and runs the rest again: into fresh objects, or (DeepSpeed: a second
    Accelerator cannot take a DeepSpeed plugin) with ``load_state`` into the same ones."""
    from accelerate import Accelerator, PartialState, skip_first_batches

    def setup():
        PartialState(cpu=True)  # CPU processes, as TrainingArguments(use_cpu=True) sets them up
        accelerator = Accelerator(**acc_kwargs)
        model = tiny_llama()
        optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_decay(total_steps))
        loader = torch.utils.data.DataLoader(token_data(64), batch_size=2, collate_fn=collate)
        return (accelerator, *gqc_accelerate.prepare(accelerator, model, optimizer, loader, scheduler, gqc=section))

    def loop(objects, start, record):
        accelerator, model, _, loader, scheduler, gqc = objects
        for index, batch in enumerate(skip_first_batches(loader, start) if start else loader, start):
            if index == ACC_MICRO_STEPS:
                break
            record["seen"].append({key: value.clone() for key, value in batch.items()})
            accelerator.backward(model(**batch).loss)
            record["decisions"].append(gqc.step())
            if record["decisions"][-1]:
                record["lrs"].append(gqc.decision.window.lr)
                scheduler.step()
            if start == 0 and index + 1 == ACC_SAVE_AT:
                record["draws_at_save"] = gqc.controller.num_draws
                accelerator.save_state(save_dir)
        record["params"] = [p.detach().clone() for p in accelerator.unwrap_model(model).parameters()]
        record["steps"] = gqc.controller.num_steps
        record["scheduler_steps"] = scheduler.scheduler.last_epoch

    full = {"seen": [], "decisions": [], "lrs": []}
    objects = setup()
    loop(objects, 0, full)
    if fresh_resume:
        objects = setup()
    objects[0].load_state(save_dir)
    resumed = {"seen": [], "decisions": [], "lrs": []}
    loop(objects, ACC_SAVE_AT, resumed)
    return {"full": full, "resumed": resumed, "saved": sorted(os.listdir(save_dir))}


def _fsdp2_state_round_trip(rank, world_size, save_dir):
    """FSDP2 gradients are DTensor shards: each rank saves its own local pieces mid-window
    (``controller_state``) and a fresh model re-wraps them on load (``restore_state``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from reference import loss_of, make_mlp, micro_batches

    mesh = init_device_mesh("cpu", (world_size,))

    def build():
        model = make_mlp()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        session = gqc_session.GQCSession(*gqc_accelerate.torch_controller(
            parse_section({"algorithm": "fixed", "accumulation_steps": 3}), optimizer, None, 1.0, None, None))
        return model, session

    batches = [(x.chunk(world_size)[rank], y.chunk(world_size)[rank])
               for x, y in micro_batches(8, batch=4 * world_size)]

    def run(model, session, batches):
        for batch in batches:
            loss_of(model, batch).backward()
            session.micro_step()
        return [p.full_tensor().detach().clone() for p in model.parameters()]

    model, session = build()
    run(model, session, batches[:2])  # mid-window: nothing stepped, the optimizer state is empty
    session.write(save_dir)
    state = torch.load(gqc_session.state_path(save_dir, rank), weights_only=True)
    local_shapes = [tuple(g.shape) for g in state["wrapper"]["accumulated_grads"][0]]
    full = run(model, session, batches[2:])
    model, session = build()
    session.load_state_dict(gqc_session.read(save_dir))
    resumed = run(model, session, batches[2:])
    return {"full": full, "resumed": resumed, "local_shapes": local_shapes,
            "full_shapes": [tuple(p.shape) for p in make_mlp().parameters()], "steps": session.controller.num_steps}


def _ddp_session(rank, world_size, tmp):
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    trainer = run_trainer(os.path.join(tmp, "trainer"), token_data(48), batch=2, max_steps=5)
    acc = _accelerate_run({}, ACC_SECTION, 10, os.path.join(tmp, "accelerate"))
    fsdp2 = _fsdp2_state_round_trip(rank, world_size, os.path.join(tmp, "fsdp2"))
    return {"trainer": trainer, "accelerate": acc, "fsdp2": fsdp2}


@pytest.fixture(scope="module")
def ddp_session(tmp_path_factory):
    return run_distributed(_ddp_session, 2, str(tmp_path_factory.mktemp("ddp")), timeout=300)


def test_trainer_ddp_two_ranks_matches_own_loop(ddp_session):
    """Trainer under DDP (2 ranks, each micro-batch all-reduced): both ranks take gqc_dist's
    own decisions on the concatenated micro-batches; parameters, steps and lr as its loop."""
    results = [rank["trainer"] for rank in ddp_session]
    oracle = own_loop([r["seen"] for r in results], GNTS, total_steps=5, micro_batch_size=4)
    for result in results:
        assert result["global_step"] == 5
        assert_trainer_matches(result, oracle)


def test_accelerate_loop_two_ranks_matches_own_loop_and_resumes(ddp_session):
    """The Accelerate helper under DDP: decisions, parameters, lr per step as gqc_dist's loop;
    the prepared scheduler steps once per optimizer step (not once per process);
    ``save_state`` mid-window then ``load_state`` into fresh objects continues exactly."""
    results = [rank["accelerate"] for rank in ddp_session]
    model, decisions, lrs = own_loop([r["full"]["seen"] for r in results], ACC_SECTION, total_steps=10, clip=0.0,
                                     optimizer="sgd")
    assert True in decisions and False in decisions
    assert not decisions[ACC_SAVE_AT - 1]  # the save fell mid-window
    for result in results:
        full, resumed = result["full"], result["resumed"]
        assert full["decisions"] == decisions and full["lrs"] == pytest.approx(lrs, rel=1e-12)
        assert full["steps"] == full["scheduler_steps"] == sum(decisions)
        assert_params(full["params"], model)
        assert full["draws_at_save"] > 0
        assert {"gqc_state_rank0.pt", "gqc_state_rank1.pt"} <= set(result["saved"])
        assert resumed["decisions"] == decisions[ACC_SAVE_AT:]
        assert resumed["steps"] == resumed["scheduler_steps"] == full["steps"]
        for a, b in zip(resumed["params"], full["params"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_fsdp2_gradient_shards_round_trip_mid_window(ddp_session):
    """FSDP2 (2 ranks over gloo): the saved accumulated gradient is each rank's local shard;
    restored into a fresh model it gives the uninterrupted run's parameters."""
    for result in (rank["fsdp2"] for rank in ddp_session):
        assert result["local_shapes"] != result["full_shapes"]  # shards, not full tensors
        assert result["steps"] == 2
        for a, b in zip(result["resumed"], result["full"]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------------- DeepSpeed session (2 ranks)
def _ds_config(section=None):
    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
              "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if section is not None:
        config["gradient_quality_control"] = section
    return config


def _ds_session(rank, world_size, tmp):
    import logging
    import warnings

    from accelerate.utils import DeepSpeedPlugin

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    acc_config = {**_ds_config(), "train_micro_batch_size_per_gpu": 2, "train_batch_size": 4}
    acc = _accelerate_run({"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=acc_config)}, ACC_SECTION, 10,
                          os.path.join(tmp, "accelerate"), fresh_resume=False)
    data = token_data(40)  # 10 micro-steps per epoch on each rank
    full = run_trainer(os.path.join(tmp, "full"), data, batch=2, epochs=2, save=True, gqc=None,
                       deepspeed=_ds_config(GNTS))
    first = min((p for p in os.listdir(os.path.join(tmp, "full")) if p.startswith("checkpoint-")),
                key=lambda p: int(p.split("-")[1]))
    checkpoint = os.path.join(tmp, "full", first)
    resumed = run_trainer(os.path.join(tmp, "resumed"), data, batch=2, epochs=2, gqc=None,
                          deepspeed=_ds_config(GNTS), resume=checkpoint)
    with open(os.path.join(checkpoint, "latest")) as handle:
        state = torch.load(os.path.join(checkpoint, handle.read().strip(), f"gqc_state_rank{rank}.pt"),
                       weights_only=True)
    return {"accelerate": acc, "full": full, "resumed": resumed,
            "draws_at_save": state["wrapper"]["counters"]["num_draws"]}


@pytest.fixture(scope="module")
def ds_session(tmp_path_factory):
    return run_distributed(_ds_session, 2, str(tmp_path_factory.mktemp("ds")), timeout=400)


def test_trainer_deepspeed_zero2_two_ranks_matches_own_loop_and_resumes(ds_session):
    """Trainer on DeepSpeed ZeRO-2 (2 ranks) with the section in the ds_config: Accelerate's
    engine wrapper swapped, decisions in the engine; DeepSpeed's global_steps, the Trainer's
    global_step and the lr schedule count optimizer steps; an epoch-end checkpoint saved
    mid-window (in DeepSpeed's checkpoint) resumes exactly."""
    oracle = own_loop([rank["full"]["seen"] for rank in ds_session], GNTS, total_steps=20, micro_batch_size=4)
    for rank in ds_session:
        full, resumed = rank["full"], rank["resumed"]
        assert_trainer_matches(full, oracle)
        assert full["ds_global_steps"] == full["global_step"]
        assert rank["draws_at_save"] > 0
        assert resumed["global_step"] == resumed["ds_global_steps"] == full["global_step"]
        assert len(resumed["seen"]) == 10
        for a, b in zip(resumed["params"], full["params"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_accelerate_deepspeed_zero2_two_ranks(ds_session):
    """The Accelerate helper on DeepSpeed ZeRO-2 (2 ranks): gqc.step() reports the decision the
    engine took inside accelerator.backward; same decisions, parameters and lr as gqc_dist's
    loop; save_state / load_state mid-window through DeepSpeed's checkpoint."""
    results = [rank["accelerate"] for rank in ds_session]
    model, decisions, lrs = own_loop([r["full"]["seen"] for r in results], ACC_SECTION, total_steps=10, clip=0.0,
                                     optimizer="sgd")
    for result in results:
        full, resumed = result["full"], result["resumed"]
        assert full["decisions"] == decisions and full["lrs"] == pytest.approx(lrs, rel=1e-12)
        assert full["steps"] == full["scheduler_steps"] == sum(decisions)
        assert_params(full["params"], model)
        assert full["draws_at_save"] > 0 and "pytorch_model" in result["saved"]
        assert resumed["decisions"] == decisions[ACC_SAVE_AT:]
        for a, b in zip(resumed["params"], full["params"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- refusals
def _one_line(error):
    assert "\n" not in str(error.value), str(error.value)
    return str(error.value)


@pytest.mark.parametrize("setting, message", [
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=1, got 2"),
    ({"optim": "lomo"}, "optim=lomo updates the parameters inside the backward pass"),
])
def test_trainer_refuses_settings(tmp_path, setting, message):
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], **setting)
    with pytest.raises(GQCConfigError) as error:
        GQCTrainer(model=tiny_llama(), args=args, train_dataset=token_data(8), gqc=GNTS)
    assert message in _one_line(error)


@pytest.mark.parametrize("gqc, message", [
    (None, "GQCTrainer needs gqc="),
    ({**GNTS, "local_accumulation": True}, "local_accumulation is not supported"),
    ({"algorithm": "gnts", "threshold": 0.5, "max_draw": 4}, "unknown key gradient_quality_control.max_draw"),
])
def test_trainer_refuses_bad_sections(tmp_path, gqc, message):
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(GQCConfigError) as error:
        GQCTrainer(model=tiny_llama(), args=args, train_dataset=token_data(8), gqc=gqc)
    assert message in _one_line(error)


@pytest.mark.parametrize("change, message", [
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps must be 1"),
    ({"gradient_quality_control": GNTS}, "GQC is configured twice"),
])
def test_deepspeed_config_refusals(change, message):
    """What GQCTrainer and prepare do to the ds_config before Accelerate hands it to DeepSpeed."""
    config = {**_ds_config(), **change}
    with pytest.raises(GQCConfigError) as error:
        gqc_accelerate.rewrite_deepspeed_config(config, None, parse_section(GNTS), 1.0)
    assert message in _one_line(error)


def test_deepspeed_config_rewrite():
    config = _ds_config(GNTS)
    section, clip = gqc_accelerate.rewrite_deepspeed_config(config, None, None, 0.75)
    assert section == parse_section(GNTS) and clip == 0.75  # "auto" clipping: the caller's value
    assert config["managed_gradient_accumulation"] is False and config["gradient_accumulation_steps"] == 1
    assert config["gradient_clipping"] == 0.0 and "gradient_quality_control" not in config


def test_accelerate_prepare_refuses_gradient_accumulation():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_llama()
    with pytest.raises(GQCConfigError) as error:
        gqc_accelerate.prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1), gqc=GNTS)
    assert "gradient_accumulation_steps must be 1" in _one_line(error)


def test_trainer_example_runs(tmp_path):
    from gqc_dist.examples import hf_trainer

    trainer = hf_trainer.main(["--max-steps", "4", "--out", str(tmp_path), "--cpu"])
    assert trainer.state.global_step == trainer.gqc.num_steps == 4


# ---------------------------------------------------------------------- pinned private APIs
def _params(function):
    return list(inspect.signature(function).parameters)


def test_pinned_versions():
    from packaging.version import Version

    assert Version("5.24") <= Version(transformers.__version__) < Version("5.25")
    assert Version("1.16") <= Version(accelerate.__version__) < Version("1.17")


def test_pinned_trainer_private_methods():
    """The private Trainer methods GQCTrainer overrides or calls, and the post-load zero_grad
    that makes it restore GQC state in _run_epoch: if one moves, this fails first."""
    from transformers import Trainer

    assert _params(Trainer._run_epoch) == [
        "self", "model", "epoch", "train_dataloader", "steps_in_epoch", "num_update_steps_per_epoch", "trial",
        "ignore_keys_for_eval", "start_time", "resume_from_checkpoint", "epochs_trained",
        "steps_trained_in_current_epoch"]
    assert _params(Trainer._prepare_for_training) == ["self", "max_steps", "train_dataloader",
                                                      "resume_from_checkpoint"]
    assert _params(Trainer._init_training_state) == ["self", "max_steps", "num_update_steps_per_epoch",
                                                     "num_train_epochs", "resume_from_checkpoint", "trial"]
    assert _params(Trainer._save_optimizer_and_scheduler) == ["self", "output_dir"]
    assert _params(Trainer._maybe_log_save_evaluate) == [
        "self", "tr_loss", "grad_norm", "model", "trial", "epoch", "ignore_keys_for_eval", "start_time",
        "learning_rate"]
    assert _params(Trainer._load_rng_state) == ["self", "checkpoint"]
    assert _params(Trainer._track_num_input_tokens) == ["self", "inputs"]
    assert _params(Trainer.set_initial_training_values) == ["self", "args", "dataloader"]
    assert _params(Trainer.get_batch_samples) == ["self", "epoch_iterator", "num_batches", "device"]
    inner = inspect.getsource(Trainer._inner_training_loop)
    order = [inner.index(s) for s in ("self._prepare_for_training(", "self._tr_loss = ", "model.zero_grad()",
                                      "self._run_epoch(")]
    assert order == sorted(order)
    assert "loss / self.current_gradient_accumulation_steps" in inspect.getsource(Trainer.training_step)
    prepare = inspect.getsource(Trainer._prepare_for_training)
    assert prepare.index("self.accelerator.prepare(") < prepare.index("deepspeed_load_checkpoint(")
    assert "self._save_optimizer_and_scheduler(output_dir)" in inspect.getsource(Trainer._save_checkpoint)


def test_pinned_accelerate_private_apis():
    """Accelerate's DeepSpeed engine wrapper still calls set_gradient_accumulation_boundary on
    every backward (which DeepSpeed refuses without managed accumulation: why GQCEngineWrapper
    replaces it; once it stops, the swap can go), the prepared scheduler's
    step_with_optimizer, and the plugin's config being the dict handed to DeepSpeed."""
    from accelerate import Accelerator
    from accelerate.scheduler import AcceleratedScheduler
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert _params(DeepSpeedEngineWrapper.backward) == ["self", "loss", "sync_gradients", "kwargs"]
    assert "set_gradient_accumulation_boundary" in inspect.getsource(DeepSpeedEngineWrapper.backward)
    assert "managed_gradient_accumulation()" in inspect.getsource(DeepSpeedEngine.set_gradient_accumulation_boundary)
    backward = inspect.getsource(Accelerator.backward)
    assert "self.deepspeed_engine_wrapped.backward(loss, sync_gradients=self.sync_gradients" in backward
    deepspeed_prepare = inspect.getsource(Accelerator._prepare_deepspeed)
    assert "self.deepspeed_engine_wrapped = DeepSpeedEngineWrapper(engine)" in deepspeed_prepare
    assert "config_params=self.deepspeed_config" in deepspeed_prepare
    assert "self.deepspeed_config = deepspeed_plugin.deepspeed_config" in deepspeed_prepare
    assert "step_with_optimizer" in _params(AcceleratedScheduler.__init__)
    assert "if not self.step_with_optimizer:" in inspect.getsource(AcceleratedScheduler.step)
    plugin = DeepSpeedPlugin(hf_ds_config=_ds_config())
    assert plugin.deepspeed_config is plugin.hf_ds_config.config
