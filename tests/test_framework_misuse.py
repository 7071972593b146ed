"""Leftovers of a framework's stock loop next to GQC, on the real frameworks (one process, CPU,
tiny models built in code or from a config; nothing is downloaded).

Each leftover that would train silently wrong is refused at the misused call with one
``GQCUsageError`` line naming the line to remove and its replacement, the GQC window untouched:

* Accelerate, after ``gqc_dist.frontends.accelerate.prepare``: the prepared optimizer's
  ``step()`` / ``zero_grad()`` (also under DeepSpeed, where the stock ones are silent no-ops) and
  ``accelerator.clip_grad_norm_`` / ``clip_grad_value_`` (they would clip the window's running
  sum every micro-batch);
* a plain ``transformers.Trainer`` given the wrapper in ``optimizers=`` (its loop would count,
  schedule and zero every micro-batch as a step): refused at its first step, naming ``GQCTrainer``;
* a plain ``LightningModule`` returning the wrapper (Lightning zeroes every micro-batch): the
  wrapper's ``zero_grad`` names ``GQCLightningModule`` when Lightning's loop is the caller.

And the correct loops are unchanged: the 3-line Accelerate loop against gqc_dist's own loop
(decisions, parameters, scheduler steps), ``GQCTrainer`` with the user's torch optimizer and
scheduler, ``GQCLightningModule`` with the wrapper; a ``zero_grad()`` the user wrote keeps its
message. ``accelerator.sync_gradients`` stays True on every micro-batch (documented in
docs/frameworks.md: count steps with ``gqc.step()``)."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported (the fork server too)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
pl = pytest.importorskip("lightning.pytorch")

from accelerate import Accelerator  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

import gqc_dist  # noqa: E402
from gqc_dist.config import build_controller, parse_section  # noqa: E402
from gqc_dist.engines import TorchOptimizerGradients  # noqa: E402
from gqc_dist.errors import GQCUsageError  # noqa: E402
from gqc_dist.frontends import accelerate as gqc_accelerate  # noqa: E402
from gqc_dist.frontends.hf import GQCTrainer  # noqa: E402
from gqc_dist.frontends.lightning import GQCLightningModule  # noqa: E402
from reference import loss_of, make_mlp  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:The `srun` command is available"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
]

FIXED = {"algorithm": "fixed", "accumulation_steps": 3}  # steps on micro-batches 3, 6, 9, ...
GNTS = {"algorithm": "gnts", "threshold": 0.64, "max_draws": 4}
REPLACEMENT = "`if gqc.step(): scheduler.step()`"


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def mlp_rows(count=48, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(count, 8, generator=generator),
                                          torch.randn(count, 1, generator=generator))


def decay(step):
    return 1.0 / (1.0 + 0.5 * step)


# ---------------------------------------------------------------------- Accelerate
def accelerate_loop(clip=0.0):
    """``gqc_dist.frontends.accelerate.prepare`` on one CPU process: an MLP, SGD, a LambdaLR,
    12 micro-batches of 4."""
    accelerator = Accelerator(cpu=True)
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    loader = torch.utils.data.DataLoader(mlp_rows(), batch_size=4)
    return (accelerator, *gqc_accelerate.prepare(accelerator, model, optimizer, loader, scheduler, gqc=FIXED,
                                                 clip=clip))


def test_accelerate_leftover_step_and_zero_grad_are_refused_and_the_window_is_untouched():
    """The old ``optimizer.step(); optimizer.zero_grad()`` kept beside the new lines: each is
    refused at the call, naming the replacement; neither the parameters nor the accumulated
    gradient moved, so the loop (fixed) goes on as if they had never been there."""
    accelerator, model, optimizer, loader, scheduler, gqc = accelerate_loop()
    assert isinstance(optimizer, accelerate.optimizer.AcceleratedOptimizer)  # still Accelerate's type
    batch = next(iter(loader))
    accelerator.backward(loss_of(model, batch))
    before, grads = params(model), [p.grad.clone() for p in model.parameters()]
    with pytest.raises(GQCUsageError) as error:
        optimizer.step()
    message = one_line(error)
    assert message.startswith("optimizer.step() on the optimizer gqc_dist.frontends.accelerate.prepare returned")
    assert "remove it" in message and REPLACEMENT in message and "zeroes the gradients itself" in message
    with pytest.raises(GQCUsageError) as error:
        optimizer.zero_grad()
    message = one_line(error)
    assert message.startswith("optimizer.zero_grad() on the optimizer gqc_dist.frontends.accelerate.prepare")
    assert "would clear GQC's window" in message and "remove it" in message and REPLACEMENT in message
    assert all(torch.equal(a, b) for a, b in zip(params(model), before))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert gqc.step() is False and gqc.controller.num_draws == 1  # the window goes on
    assert scheduler.scheduler.last_epoch == 0


@pytest.mark.parametrize("name, args", [("clip_grad_norm_", (1.0,)), ("clip_grad_value_", (0.1,))])
def test_accelerate_clipping_every_micro_batch_is_refused(name, args):
    """``accelerator.clip_grad_norm_`` each micro-batch would clip the window's running sum:
    refused on the accelerator GQC is prepared on, naming ``prepare(..., clip=max_norm)``; the
    gradient is untouched. Another accelerator is not affected."""
    accelerator, model, _, loader, _, _ = accelerate_loop()
    accelerator.backward(loss_of(model, next(iter(loader))) * 100)  # a norm any clip would change
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(GQCUsageError) as error:
        getattr(accelerator, name)(model.parameters(), *args)
    message = one_line(error)
    assert message.startswith(f"accelerator.{name}() on an accelerator GQC is prepared on would clip the running sum")
    assert "prepare(..., clip=max_norm)" in message and "exact global norm" in message
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    other = make_mlp()
    (other(torch.ones(2, 8)).sum() * 100).backward()
    getattr(Accelerator(cpu=True), name)(other.parameters(), *args)  # the stock method, unchanged
    assert max(p.grad.abs().max() for p in other.parameters()) <= 100


def test_accelerate_correct_loop_is_unchanged():
    """The three-line loop: decisions, parameters and scheduler steps equal gqc_dist's own loop
    (the controller driven by hand on the same micro-batches, clipping the window mean);
    ``accelerator.sync_gradients`` stays True on every micro-batch (count steps with
    ``gqc.step()``, as docs/frameworks.md says)."""
    clip = 0.05
    accelerator, model, _, loader, scheduler, gqc = accelerate_loop(clip=clip)
    decisions, syncs = [], []
    for batch in loader:
        accelerator.backward(loss_of(model, batch))
        decisions.append(gqc.step())
        if decisions[-1]:
            scheduler.step()
        syncs.append(accelerator.sync_gradients)
    assert decisions == [False, False, True] * 4 and all(syncs)
    assert gqc.controller.num_steps == scheduler.scheduler.last_epoch == 4

    own = make_mlp()
    optimizer = torch.optim.SGD(own.parameters(), lr=0.1, momentum=0.9)
    own_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    controller, _ = build_controller(parse_section(FIXED), optimizer,
                                     gradients=TorchOptimizerGradients(optimizer, clip=clip))
    own_decisions = []
    for batch in torch.utils.data.DataLoader(mlp_rows(), batch_size=4):
        loss_of(own, batch).backward()
        own_decisions.append(controller.after_backward().stepped)
        if own_decisions[-1]:
            own_scheduler.step()
    assert own_decisions == decisions
    assert gqc.controller.last_grad_norm > clip  # clipping engaged: the window mean was clipped
    for a, b in zip(params(accelerator.unwrap_model(model)), params(own)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def _deepspeed_leftovers(rank, world_size):
    """One DeepSpeed (ZeRO-2) rank through ``prepare``: the stock DeepSpeedOptimizerWrapper's
    step/zero_grad are silent no-ops; after prepare they refuse, and the engine still decides."""
    import logging
    import warnings

    from accelerate import PartialState
    from accelerate.utils import DeepSpeedPlugin

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    PartialState(cpu=True)
    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4, "train_batch_size": 4,
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(mlp_rows(), batch_size=4)
    model, optimizer, loader, gqc = gqc_accelerate.prepare(accelerator, model, optimizer, loader, gqc=FIXED)
    errors, decisions = [], []
    for index, batch in enumerate(loader):
        accelerator.backward(loss_of(model, batch))
        if index == 0:
            for call in (optimizer.step, optimizer.zero_grad,
                         lambda: accelerator.clip_grad_norm_(model.parameters(), 1.0)):
                try:
                    call()
                except GQCUsageError as error:
                    errors.append(str(error))
        decisions.append(gqc.step())
        if index == 5:
            break
    return {"errors": errors, "decisions": decisions, "type": type(optimizer).__name__}


def test_accelerate_deepspeed_leftovers_are_refused():
    from distributed_harness import run_distributed

    pytest.importorskip("deepspeed")
    (result,) = run_distributed(_deepspeed_leftovers, 1, timeout=120)
    assert result["type"] == "GQCDeepSpeedOptimizerWrapper"
    step, zero_grad, clip = result["errors"]
    assert step.startswith("optimizer.step() on the optimizer") and REPLACEMENT in step
    assert zero_grad.startswith("optimizer.zero_grad() on the optimizer") and REPLACEMENT in zero_grad
    assert clip.startswith("accelerator.clip_grad_norm_()") and "clip=max_norm" in clip
    assert result["decisions"] == [False, False, True] * 2


# ---------------------------------------------------------------------- transformers Trainer
def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=8))


def token_data(count=40):
    ids = torch.randint(0, 64, (count, 8), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(count)]


def trainer_args(out, **extra):
    return TrainingArguments(str(out), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                             report_to=[], disable_tqdm=True, save_strategy="no", use_cpu=True, seed=0, **extra)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_plain_trainer_given_the_wrapper_is_refused_at_its_first_step(tmp_path, accumulation):
    """``Trainer(optimizers=(wrapper, scheduler))`` would report a step per micro-batch (or per
    fixed window), step the scheduler each time and zero the window with ``model.zero_grad()``:
    refused at its first ``optimizer.step()``, naming GQCTrainer; nothing counted anywhere."""
    model = tiny_llama()
    wrapper = gqc_dist.OptimizerWrapperFixed(torch.optim.AdamW(model.parameters(), lr=1e-3), 3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(wrapper, decay)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, gradient_accumulation_steps=accumulation),
                      train_dataset=token_data(), optimizers=(wrapper, scheduler))
    with pytest.raises(GQCUsageError) as error:
        trainer.train()
    message = one_line(error)
    assert message.startswith("a plain transformers.Trainer is driving a GQC wrapper")
    assert "use gqc_dist.frontends.hf.GQCTrainer(..., gqc={...}) with the plain torch optimizer" in message
    assert trainer.state.global_step == 0 and scheduler.last_epoch == 0
    assert (wrapper.num_batches, wrapper.num_steps) == (0, 0)


def test_gqc_trainer_the_message_names_runs_with_the_users_optimizer_and_scheduler(tmp_path):
    """The replacement: GQCTrainer with the plain torch optimizer and the user's scheduler;
    global_step, GQC's steps and the scheduler's steps agree."""
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    trainer = GQCTrainer(model=model, args=trainer_args(tmp_path), train_dataset=token_data(),
                         optimizers=(optimizer, scheduler), gqc=GNTS)
    trainer.train()
    assert trainer.state.global_step == trainer.gqc.num_steps == scheduler.last_epoch == 3
    assert trainer.gqc.num_batches > 3  # windows of several micro-batches


# ---------------------------------------------------------------------- Lightning
def lightning_trainer(**kwargs):
    return pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def lightning_loader():
    return torch.utils.data.DataLoader(mlp_rows(24), batch_size=4)


class PlainModule(pl.LightningModule):
    """A user's module whose base class was not changed, returning the GQC wrapper."""

    def __init__(self):
        super().__init__()
        self.net = make_mlp()

    def training_step(self, batch, batch_idx):
        return loss_of(self.net, batch)

    def configure_optimizers(self):
        return gqc_dist.OptimizerWrapperFixed(torch.optim.AdamW(self.net.parameters(), lr=1e-2), 3)


class GQCModule(GQCLightningModule, PlainModule):
    """The fix: GQCLightningModule as the base class, nothing else changed."""


class ManualZeroGradModule(GQCModule):
    """Manual optimization with a ``zero_grad()`` the user wrote."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        self.manual_backward(loss_of(self.net, batch))
        optimizer.step()
        optimizer.zero_grad()


def test_plain_lightning_module_with_the_wrapper_names_gqc_lightning_module():
    """Lightning's loop zeroes before every micro-batch: the refusal says that Lightning is the
    caller and names the base class, not a zero_grad() call the user never wrote."""
    module = PlainModule()
    before = params(module)
    with pytest.raises(GQCUsageError) as error:
        lightning_trainer(max_steps=4).fit(module, lightning_loader())
    message = one_line(error)
    assert message.startswith("zero_grad() on a GQC wrapper was called by Lightning's loop")
    assert "make gqc_dist.frontends.lightning.GQCLightningModule the module's base class" in message
    assert "Remove the zero_grad() call" not in message
    assert all(torch.equal(a, b) for a, b in zip(params(module), before))


def test_lightning_user_written_zero_grad_keeps_its_message():
    with pytest.raises(GQCUsageError) as error:
        lightning_trainer(max_steps=4).fit(ManualZeroGradModule(), lightning_loader())
    message = one_line(error)
    assert message.startswith("zero_grad() must not be called on a GQC wrapper")
    assert "Remove the zero_grad() call from the training loop." in message


def test_gqc_lightning_module_with_the_wrapper_is_unchanged():
    module = GQCModule()
    trainer = lightning_trainer()
    trainer.fit(module, lightning_loader())  # 6 micro-batches, windows of 3
    assert trainer.global_step == module.gqc.num_steps == 2 and module.gqc.num_batches == 6


def test_a_users_own_loop_is_not_taken_for_a_framework():
    """The wrapper driven by hand: step() decides as always; zero_grad() keeps its message."""
    model = make_mlp()
    wrapper = gqc_dist.OptimizerWrapperFixed(torch.optim.SGD(model.parameters(), lr=0.1), 2)
    steps = []
    for x, y in torch.utils.data.DataLoader(mlp_rows(16), batch_size=4):
        loss_of(model, (x, y)).backward()
        steps.append(wrapper.step())
    assert steps == [False, True, False, True]
    with pytest.raises(GQCUsageError) as error:
        wrapper.zero_grad()
    assert one_line(error).startswith("zero_grad() must not be called on a GQC wrapper")
