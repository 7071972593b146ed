"""gqc_dist.frontends.lightning: real Lightning 2.6 Trainers on CPU (single process, DDP on 2
gloo ranks, GQCDeepSpeedStrategy ZeRO-2 on 2 ranks), each against gqc_dist's own loop (the
wrapper driven by hand, a torch scheduler stepped on its steps) on the same micro-batches:
decisions, parameters (1e-6), ``trainer.global_step``, the learning rate of every optimizer step,
and the step axis of Lightning's logs. Plus a mid-window resume, the refusals, and pins of the
private Lightning API the integration touches."""

import inspect
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere (fork server too)

import pytest  # noqa: E402
import torch  # noqa: E402

import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402

from gqc_dist.config import build_controller, parse_section  # noqa: E402
from gqc_dist.engines import TorchOptimizerGradients  # noqa: E402
from gqc_dist.errors import GQCConfigError, GQCUsageError  # noqa: E402
from gqc_dist.frontends import lightning as gqc_lightning  # noqa: E402
from gqc_dist.frontends.lightning import GQCDeepSpeedStrategy, GQCLightningModule  # noqa: E402
from distributed_harness import preload_in_forkserver, run_distributed  # noqa: E402
from reference import loss_of, make_mlp, micro_batches  # noqa: E402

preload_in_forkserver("lightning.pytorch", "gqc_dist.frontends.lightning")
pytestmark = [
    pytest.mark.filterwarnings("ignore:The `srun` command is available"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]

# GNTS with windows of 3 and 4 micro-batches on these batches; every mean norm is >= 2% away from
# the threshold, so float differences between layouts cannot flip a decision.
SECTION = {"algorithm": "gnts", "threshold": 1.1, "max_draws": 5}
GLOBAL_BATCH = 8
MICRO_STEPS = 24
WORLD = 2
LR = 1e-2
TOL = 1e-6


def lr_lambda(step):
    return 1.0 / (1.0 + 0.3 * step)


def _optimizer(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01)


def _trainer(**kwargs):
    options = dict(max_epochs=1, accelerator="cpu", devices=1, log_every_n_steps=1, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, logger=False)
    options.update(kwargs)
    return pl.Trainer(**options)


def _loader(batches):
    return torch.utils.data.DataLoader(batches, batch_size=None)  # one pre-built micro-batch per item


class RecordingLogger(Logger):
    """Every ``log_metrics(metrics, step)`` call, in memory."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass


class Model(GQCLightningModule):
    """A tiny MLP; ``deepspeed``: configure_optimizers returns the plain optimizer (the strategy
    attaches GQC). Records, per training batch: the lr before the batch, whether the controller
    stepped (from its own step counter) and ``trainer.global_step`` after the batch."""

    def __init__(self, manual=False, deepspeed=False):
        super().__init__()
        self.net = make_mlp()
        self.automatic_optimization = not manual
        self.deepspeed = deepspeed
        self.rows = []

    def training_step(self, batch, batch_idx):
        loss = loss_of(self.net, batch)
        self.log("loss", loss)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            self.manual_backward(loss)
            if optimizer.step():
                self.lr_schedulers().step()
            self._record_after = self.trainer.global_step  # counted at once, inside the batch
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", loss_of(self.net, batch))

    def configure_optimizers(self):
        optimizer = _optimizer(self.net.parameters())
        if not self.deepspeed:
            optimizer, _ = build_controller(parse_section(SECTION), optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch, batch_idx):  # no super(): the integration must not need it
        self._steps_before = self.gqc.num_steps
        self._lr_before = self.trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        stepped = self.gqc.num_steps > self._steps_before
        self.rows.append({"stepped": stepped, "lr": self._lr_before, "global_step": self.trainer.global_step,
                          "gqc_stepped": self.gqc_stepped})
        if not self.automatic_optimization:
            assert self._record_after == self.trainer.global_step


def _own_loop(batches, clip=0.0):
    """gqc_dist's own loop: the wrapper driven by hand, the scheduler stepped on its steps;
    ``clip``: the window mean clipped to that global norm."""
    net = make_mlp()
    optimizer = _optimizer(net.parameters())
    wrapper, _ = build_controller(parse_section(SECTION), optimizer,
                                  gradients=TorchOptimizerGradients(optimizer, clip=clip))
    scheduler = torch.optim.lr_scheduler.LambdaLR(wrapper, lr_lambda)
    decisions, lrs, windows = [], [], []
    for batch in batches:
        loss_of(net, batch).backward()
        decision = wrapper.after_backward()
        decisions.append(decision.stepped)
        if decision.stepped:
            lrs.append(decision.window.lr)
            windows.append(decision.window.num_draws)
            scheduler.step()
    return {"decisions": decisions, "lrs": lrs, "windows": windows,
            "params": [p.detach().clone() for p in net.parameters()]}


def _result(trainer, model, logger):
    return {"rows": model.rows, "global_step": trainer.global_step, "num_steps": model.gqc.num_steps,
            "params": [p.detach().clone().float() for p in model.net.parameters()],
            "logged": None if logger is None else logger.rows}


def _check(result, oracle):
    decisions = oracle["decisions"]
    assert True in decisions and False in decisions and len(set(oracle["windows"])) > 1
    rows = result["rows"]
    assert [row["stepped"] for row in rows] == decisions
    assert [row["gqc_stepped"] for row in rows] == decisions
    steps = sum(decisions)
    assert result["global_step"] == result["num_steps"] == steps
    # global_step after each micro-batch: the optimizer steps so far
    assert [row["global_step"] for row in rows] == [sum(decisions[: i + 1]) for i in range(len(decisions))]
    # the lr each optimizer step was taken with (the scheduler steps on optimizer steps only)
    applied = [row["lr"] for row, stepped in zip(rows, decisions) if stepped]
    assert applied == pytest.approx(oracle["lrs"], rel=1e-12)
    for got, want in zip(result["params"], oracle["params"]):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    if result["logged"] is not None:
        _check_logs(result["logged"], oracle)


def _check_logs(logged, oracle):
    """Lightning's log step is the optimizer step: each micro-batch's loss at the (0-based) index
    of the step its window becomes; GQC's statistics once per step, at that step."""
    decisions = oracle["decisions"]
    window_index = [sum(decisions[:i]) for i in range(len(decisions))]
    assert [step for step, metrics in logged if "loss" in metrics] == window_index
    gqc_rows = [(step, metrics) for step, metrics in logged if "gqc/window" in metrics]
    assert [step for step, _ in gqc_rows] == list(range(sum(decisions)))
    assert [metrics["gqc/window"] for _, metrics in gqc_rows] == oracle["windows"]
    assert [metrics["gqc/lr"] for _, metrics in gqc_rows] == pytest.approx(oracle["lrs"], rel=1e-12)
    assert all(metrics["gqc/grad_norm"] > 0 for _, metrics in gqc_rows)
    assert any("gqc/noise_scale" in metrics for _, metrics in gqc_rows)


# ---------------------------------------------------------------- single process
@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_single_process_matches_own_loop(manual):
    """Also with validation every 5 micro-batches (mid-window: Lightning zeroes the module's
    gradients before it) and LearningRateMonitor (it logs at Lightning's log step)."""
    batches = micro_batches(MICRO_STEPS, batch=GLOBAL_BATCH)
    model, logger = Model(manual=manual), RecordingLogger()
    trainer = _trainer(logger=logger, val_check_interval=5, callbacks=[LearningRateMonitor("step")])
    trainer.fit(model, _loader(batches), _loader(micro_batches(2, batch=GLOBAL_BATCH, seed=7)))
    oracle = _own_loop(batches)
    _check(_result(trainer, model, logger), oracle)
    # the counter global_step reads is the one the integration adjusts (pinned private API)
    assert gqc_lightning._step_progress(trainer).total.completed == trainer.global_step
    decisions = oracle["decisions"]
    window_index = [sum(decisions[:i]) for i in range(len(decisions))]
    # validation after micro-batches 5, 10, ...: logged at the step of the micro-batch it follows
    val_steps = [step for step, metrics in logger.rows if "val_loss" in metrics]
    assert val_steps == [window_index[i - 1] for i in range(5, MICRO_STEPS + 1, 5)]
    # LearningRateMonitor: each micro-batch's lr at its window's step, the lr that window steps with
    # (it also logs the wrapped optimizer as lr-AdamW: it unwraps anything with an .optimizer)
    lr_rows = [(step, metrics["lr-OptimizerWrapperGNTS"]) for step, metrics in logger.rows
               if "lr-OptimizerWrapperGNTS" in metrics]
    assert [step for step, _ in lr_rows] == window_index
    assert [value for _, value in lr_rows] == pytest.approx([LR * lr_lambda(k) for k in window_index], rel=1e-12)


def test_max_steps_and_checkpoint_intervals_count_optimizer_steps(tmp_path):
    batches = micro_batches(MICRO_STEPS, batch=GLOBAL_BATCH)
    decisions = _own_loop(batches)["decisions"]
    model = Model()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = _trainer(max_steps=5, enable_checkpointing=True, callbacks=[checkpoints])
    trainer.fit(model, _loader(batches))
    fifth = [i for i, stepped in enumerate(decisions) if stepped][4]
    assert trainer.global_step == model.gqc.num_steps == 5
    assert model.gqc.num_batches == fifth + 1  # it stopped right after the fifth optimizer step
    saved = sorted(path.name for path in tmp_path.iterdir())
    assert saved == ["step=2.ckpt", "step=4.ckpt"]
    for name, steps in (("step=2.ckpt", 2), ("step=4.ckpt", 4)):
        state = torch.load(tmp_path / name, weights_only=False)
        assert state["global_step"] == steps
        counters = state["optimizer_states"][0]["counters"]  # saved right after the step: window closed
        assert counters["num_steps"] == steps and counters["num_draws"] == 0


def test_bf16_mixed_needs_nothing():
    """No scaler: Lightning's plain step path; decisions are GQC's (autocast changes the numbers,
    so only the counting is compared)."""
    model = Model()
    trainer = _trainer(precision="bf16-mixed")
    trainer.fit(model, _loader(micro_batches(MICRO_STEPS, batch=GLOBAL_BATCH)))
    decisions = [row["stepped"] for row in model.rows]
    assert True in decisions and False in decisions
    assert trainer.global_step == model.gqc.num_steps == sum(decisions)


def test_mid_window_resume_is_exact(tmp_path):
    """Two epochs straight, against one epoch, a checkpoint with the window open, and a second
    epoch resumed from it: same decisions, lr, global_step and parameters."""
    batches = micro_batches(12, batch=GLOBAL_BATCH)
    straight = Model()
    straight_trainer = _trainer(max_epochs=2)
    straight_trainer.fit(straight, _loader(batches))

    first = Model()
    first_trainer = _trainer(max_epochs=1)
    first_trainer.fit(first, _loader(batches))
    assert first.gqc.num_draws > 0  # the checkpoint is taken mid-window
    path = tmp_path / "mid_window.ckpt"
    first_trainer.save_checkpoint(path)

    resumed = Model()
    resumed_trainer = _trainer(max_epochs=2)
    resumed_trainer.fit(resumed, _loader(batches), ckpt_path=path)

    assert resumed.rows == straight.rows[len(batches):]
    assert resumed_trainer.global_step == straight_trainer.global_step == straight.gqc.num_steps
    for got, want in zip(resumed.net.parameters(), straight.net.parameters()):
        torch.testing.assert_close(got.detach(), want.detach(), atol=0, rtol=0)


# ---------------------------------------------------------------- DDP, 2 ranks
def _shard(batches, rank, world_size):
    return [(x.chunk(world_size)[rank], y.chunk(world_size)[rank]) for x, y in batches]


def _ddp_rank(rank, world_size, batches):
    """Automatic, then manual optimization, each a fresh Trainer on this rank's rows."""
    results = {}
    for mode in ("automatic", "manual"):
        model, logger = Model(manual=mode == "manual"), RecordingLogger()
        # the harness made the process group and set LOCAL_RANK: Lightning joins it, launches nothing
        trainer = _trainer(strategy="ddp", devices=world_size, use_distributed_sampler=False, logger=logger)
        trainer.fit(model, _loader(_shard(batches, rank, world_size)))
        results[mode] = _result(trainer, model, logger if rank == 0 else None)
    return results


def test_ddp_two_ranks_matches_own_loop():
    batches = micro_batches(MICRO_STEPS, batch=GLOBAL_BATCH)
    results = run_distributed(_ddp_rank, WORLD, batches, timeout=240)
    oracle = _own_loop(batches)
    for result in results:
        _check(result["automatic"], oracle)
        _check(result["manual"], oracle)


# ---------------------------------------------------------------- DeepSpeed ZeRO-2, 2 ranks
CLIP = 0.5  # below the window means' norms: Trainer(gradient_clip_val) becomes GQC's clip of the mean


def _ds_config():
    return {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD, "steps_per_print": 10**9}


def _deepspeed_rank(rank, world_size, batches):
    """Automatic optimization with gradient_clip_val (the section given to the strategy), then
    manual optimization (the section inside the DeepSpeed config)."""
    results = {}
    for mode in ("automatic", "manual"):
        model, logger = Model(manual=mode == "manual", deepspeed=True), RecordingLogger()
        if mode == "automatic":
            strategy, clip = GQCDeepSpeedStrategy(config=_ds_config(), gqc=SECTION), CLIP
        else:
            strategy, clip = GQCDeepSpeedStrategy(config={**_ds_config(), "gradient_quality_control": SECTION}), None
        trainer = _trainer(strategy=strategy, devices=world_size, use_distributed_sampler=False, logger=logger,
                           gradient_clip_val=clip)
        trainer.fit(model, _loader(_shard(batches, rank, world_size)))
        engine = trainer.strategy.deepspeed_engine
        assert model.gqc is engine.gqc
        results[mode] = _result(trainer, model, logger if rank == 0 else None)
        results[mode]["engine_steps"] = engine.global_steps
    return results


def test_deepspeed_zero2_two_ranks_matches_own_loop():
    batches = micro_batches(MICRO_STEPS, batch=GLOBAL_BATCH)
    env = {"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]} if "TORCH_EXTENSIONS_DIR" in os.environ else None
    results = run_distributed(_deepspeed_rank, WORLD, batches, timeout=300, env=env)
    for mode, oracle in (("automatic", _own_loop(batches, clip=CLIP)), ("manual", _own_loop(batches))):
        for result in results:
            _check(result[mode], oracle)
            assert result[mode]["engine_steps"] == sum(oracle["decisions"])


def test_deepspeed_strategy_refusals():
    """Before deepspeed.initialize: the GQC wrapper itself from configure_optimizers, a module
    without GQCLightningModule's hooks; a malformed section when the strategy is made."""
    model = Model(deepspeed=True)
    strategy = GQCDeepSpeedStrategy(config=_ds_config(), gqc=SECTION)
    strategy.connect(model)
    wrapper = build_controller(parse_section(SECTION), _optimizer(model.parameters()))[0]
    with pytest.raises(GQCConfigError, match="returns the plain torch optimizer"):
        strategy._setup_model_and_optimizer(model, wrapper)
    plain = pl.LightningModule()
    strategy.connect(plain)
    with pytest.raises(GQCConfigError, match="needs a GQCLightningModule"):
        strategy._setup_model_and_optimizer(plain, _optimizer(model.parameters()))
    with pytest.raises(GQCConfigError, match="gradient_quality_control.threshold"):
        GQCDeepSpeedStrategy(config=_ds_config(), gqc={**SECTION, "threshold": -1})


# ---------------------------------------------------------------- refusals
class PlainOptimizerModel(Model):
    def configure_optimizers(self):
        return _optimizer(self.net.parameters())


class ClippingModel(Model):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        pass


class EveryOtherBatchScheduler(Model):
    def configure_optimizers(self):
        config = super().configure_optimizers()
        config["lr_scheduler"]["frequency"] = 2
        return config


class LocalAccumulationModel(Model):
    def configure_optimizers(self):
        return build_controller(parse_section({**SECTION, "local_accumulation": True}),
                                _optimizer(self.net.parameters()))[0]


class NoCallbackModel(Model):
    def configure_callbacks(self):
        return []


def _fp16_plugin():
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("model_class, trainer_kwargs, error, words", [
    (Model, {"accumulate_grad_batches": 2}, GQCConfigError, "accumulate_grad_batches=2"),
    (Model, {"gradient_clip_val": 1.0}, GQCConfigError, "gradient_clip_val=1.0"),
    (Model, {"plugins": "fp16"}, GQCConfigError, "16-mixed"),
    (Model, {"strategy": "deepspeed"}, GQCConfigError, "GQCDeepSpeedStrategy"),
    (ClippingModel, {}, GQCConfigError, "configure_gradient_clipping"),
    (PlainOptimizerModel, {}, GQCConfigError, "must return a GQC wrapper"),
    (EveryOtherBatchScheduler, {}, GQCConfigError, "'frequency': 2"),
    (LocalAccumulationModel, {}, GQCConfigError, "local_accumulation"),
    (NoCallbackModel, {}, GQCUsageError, "configure_callbacks"),
], ids=["accumulate", "clip", "fp16", "deepspeed", "clip-hook", "plain-optimizer", "frequency", "local",
        "no-callback"])
def test_refusals_name_the_setting(model_class, trainer_kwargs, error, words):
    if trainer_kwargs.get("plugins") == "fp16":
        trainer_kwargs = {"plugins": [_fp16_plugin()]}
    if trainer_kwargs.get("strategy") == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        trainer_kwargs = {"strategy": DeepSpeedStrategy(stage=2)}
    model = model_class()
    with pytest.raises(error, match=words) as raised:
        _trainer(**trainer_kwargs).fit(model, _loader(micro_batches(4, batch=GLOBAL_BATCH)))
    assert "\n" not in str(raised.value)
    assert all(p.grad is None for p in model.net.parameters())  # refused before any training


def test_other_lightning_release_is_refused():
    gqc_lightning._check_version("2.6.6")
    with pytest.raises(GQCUsageError, match="found 2.7.0"):
        gqc_lightning._check_version("2.7.0")


# ---------------------------------------------------------------- private Lightning API, pinned
def test_private_lightning_api_is_where_the_integration_expects_it():
    """Fails when lightning moves what the integration adjusts (it is pinned to 2.6.x)."""
    from lightning.pytorch.loops.optimization.automatic import _AutomaticOptimization
    from lightning.pytorch.loops.optimization.manual import _ManualOptimization
    from lightning.pytorch.loops.progress import _Progress
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert lightning.__version__.startswith("2.6.")
    # the counters: automatic optimization counts the optimizer_step hook (ready before it,
    # completed after it); manual optimization counts LightningOptimizer.step the same way
    source = inspect.getsource(_AutomaticOptimization._optimizer_step)
    ready, hook, completed = (source.index(s) for s in ("increment_ready()", '"optimizer_step"',
                                                        "increment_completed()"))
    assert ready < hook < completed
    source = inspect.getsource(LightningOptimizer.step)
    assert source.index("_on_before_step()") < source.index("optimizer_step(") < source.index("_on_after_step()")
    source = inspect.getsource(_ManualOptimization)
    assert "optim_step_progress.increment_ready()" in source and "optim_step_progress.increment_completed()" in source
    assert "increment_by" in vars(_Progress)
    source = inspect.getsource(_TrainingEpochLoop.global_step.fget)
    assert "optim_progress.optimizer_steps" in source and "optim_step_progress.total.completed" in source
    # the logging step: advanced after every batch that does not accumulate, read by the loggers
    assert "self._batches_that_stepped += 1" in inspect.getsource(_TrainingEpochLoop.on_advance_end)
    trainer = _trainer()
    loop = trainer.fit_loop.epoch_loop
    assert isinstance(loop.automatic_optimization.optim_progress.optimizer.step, _Progress)
    assert isinstance(loop.manual_optimization.optim_step_progress, _Progress)
    assert isinstance(loop._batches_that_stepped, int)
    # a restored checkpoint is followed by the module's zero_grad (the integration keeps an open window)
    source = inspect.getsource(pl.Trainer._run)
    assert source.index("restore_training_state()") < source.index("self._run_stage()")
    assert "self.lightning_module.zero_grad()" in inspect.getsource(pl.Trainer._run_stage)
    # DeepSpeed: the one deepspeed.initialize for training, and the CPU-capable distributed init
    assert list(inspect.signature(DeepSpeedStrategy._setup_model_and_optimizer).parameters) == [
        "self", "model", "optimizer", "lr_scheduler"]
    assert "deepspeed.initialize(" in inspect.getsource(DeepSpeedStrategy._setup_model_and_optimizer)
    assert "_setup_model_and_optimizer(" in inspect.getsource(DeepSpeedStrategy._initialize_deepspeed_train)
    assert callable(DeepSpeedStrategy._init_deepspeed_distributed)
    # the CPU path skips only the CUDA checks of these two
    source = inspect.getsource(DeepSpeedStrategy.setup_environment)
    assert "CUDAAccelerator" in source and "super().setup_environment()" in source
    source = inspect.getsource(DeepSpeedStrategy.setup_distributed)
    assert [line.strip() for line in source.splitlines()[-4:]] == [
        "_validate_device_index_selection(self.parallel_devices)", "reset_seed()", "self.set_world_ranks()",
        "self._init_deepspeed_distributed()"]
    assert "gradient_accumulation_steps" in inspect.getsource(
        DeepSpeedStrategy._format_batch_size_and_grad_accum_config)


# ---------------------------------------------------------------- the example
@pytest.mark.parametrize("argv", [[], ["--manual"]], ids=["automatic", "manual"])
def test_example_runs(argv, capsys):
    from gqc_dist.examples import lightning_mlp

    lightning_mlp.main(["--micro-batches", "24", *argv])
    out = capsys.readouterr().out
    assert "trainer.global_step 7 = optimizer steps 7 over 24 micro-batches" in out
    assert out.count(" micro-batches, lr ") == 7
