"""GQC inside PyTorch Lightning 2.6 (``pip install 'gqc_dist[lightning]'``).

A user changes the base class and what ``configure_optimizers`` returns; the Trainer stays::

    class Model(GQCLightningModule):                  # was: lightning.pytorch.LightningModule
        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
            gqc = gqc_dist.OptimizerWrapperGNTS(optimizer, max_batch_draws=16)   # the one new line
            return {"optimizer": gqc, "lr_scheduler": {"scheduler": LambdaLR(gqc, ...), "interval": "step"}}

    trainer = Trainer(...)                            # accumulate_grad_batches 1, no gradient_clip_val

Under DeepSpeed, ``configure_optimizers`` returns the plain torch optimizer and the strategy
attaches GQC: ``Trainer(strategy=GQCDeepSpeedStrategy(stage=2, gqc={"algorithm": "gnts", ...}))``
(or the ``gradient_quality_control`` section inside ``config=``).

How Lightning's loop is adapted (it decides step-or-accumulate before the backward from
``accumulate_grad_batches``; GQC decides after it), all at accumulation 1:

* **The step.** Lightning's precision plugins call ``optimizer.step(closure=...)`` (automatic
  optimization) and the user calls ``opt.step()`` (manual); the wrapper runs the closure, then
  decides (``GQCOptimizerWrapper.step``); under DeepSpeed ``engine.step()`` is the decision
  (``gqc_dist.frontends.deepspeed.attach_controller``). ``opt.step()`` returns True when the optimizer stepped.
* **Step counting.** Lightning counts every ``optimizer.step()`` call as a step. The
  :class:`GQCCallback` sees every decision (an observer on the controller's ``after_backward``)
  and, when the controller did not step, takes that call back out of Lightning's counter before
  Lightning completes it: ``trainer.global_step`` (hence ``max_steps``, ``ModelCheckpoint(
  every_n_train_steps=...)``, ``log_every_n_steps``) counts optimizer steps, in automatic and
  manual optimization. The logging step axis is the optimizer step too: every micro-batch of the
  window that becomes step ``k`` (0-based) logs at step ``k``, as Lightning's own accumulation
  does.
* **Schedulers.** ``interval="step"`` schedulers step only on a micro-batch where GQC stepped
  (``lr_scheduler_step``); ``interval="epoch"`` ones once per epoch as usual. In manual
  optimization the user steps them: ``if opt.step(): sch.step()``.
* **Zeroing.** The controller zeroes after each optimizer step; ``optimizer_zero_grad`` does
  nothing, and ``zero_grad()`` of the module (which Lightning calls after restoring a checkpoint
  and before validation) leaves an open window's gradient alone, so a checkpoint saved
  mid-window resumes exactly (its ``optimizer_states`` carry the controller's state and
  accumulated gradient; under DeepSpeed, ``engine.save_checkpoint`` carries them).
* **Statistics.** At every optimizer step ``gqc/window`` (micro-batches), ``gqc/lr`` (as applied),
  ``gqc/grad_norm``, ``gqc/noise_scale`` (when estimated) and ``gqc/micro_batches`` go to
  Lightning's loggers (``GQCLightningModule.gqc_log`` = ``"vital"`` adds the controller's vital
  statistics, ``None`` logs nothing).

Refused with one line naming the setting, before training: ``accumulate_grad_batches`` != 1;
``gradient_clip_val`` (it would clip the running sum every micro-batch: give the clip to the
wrapper's gradient adapter, ``TorchOptimizerGradients(optimizer, clip=...)``; under
:class:`GQCDeepSpeedStrategy` it is DeepSpeed's ``gradient_clipping``, which GQC applies to the
window mean); an overridden ``configure_gradient_clipping``; ``precision="16-mixed"`` with a
GradScaler (it unscales and steps the scaler every micro-batch; bf16-mixed and 32 need nothing,
fp16 is DeepSpeed's own under :class:`GQCDeepSpeedStrategy`); Lightning's own
``DeepSpeedStrategy`` and ``FSDPStrategy``; more than one optimizer; an ``interval="step"``
scheduler with ``frequency`` != 1; ``local_accumulation`` outside DeepSpeed. A plain
``LightningModule`` returning the wrapper (automatic optimization) cannot be seen from here:
Lightning's loop zeroes every micro-batch, and the wrapper's ``zero_grad()`` refuses that first
call with one line naming :class:`GQCLightningModule`.

Private Lightning API this module touches (pinned to ``lightning>=2.6,<2.7``; each is checked by
``tests/test_integration_lightning.py``): the optimizer-step progress counters
(``fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step``,
``fit_loop.epoch_loop.manual_optimization.optim_step_progress``), the logging step
``fit_loop.epoch_loop._batches_that_stepped``, and, in :class:`GQCDeepSpeedStrategy`,
``DeepSpeedStrategy._setup_model_and_optimizer`` and ``_init_deepspeed_distributed`` (plus what its
CPU path of ``setup_environment`` / ``setup_distributed`` skips: the CUDA-only checks).
"""

import math
from typing import Any, List, Optional

from gqc_dist.errors import GQCConfigError, GQCUsageError
from gqc_dist.extras import require

lightning = require("lightning", "lightning", "gqc_dist.frontends.lightning")

from lightning.pytorch import Callback, LightningModule  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy  # noqa: E402
from lightning.pytorch.utilities.model_helpers import is_overridden  # noqa: E402

from gqc_dist.core.wrapper import GQCOptimizerWrapper  # noqa: E402

#: the Lightning releases this integration was tested on (its private counters move between minors)
TESTED_LIGHTNING = (2, 6)


def _check_version(version: str) -> None:
    found = tuple(int(part) for part in version.split(".")[:2])
    if found != TESTED_LIGHTNING:
        raise GQCUsageError(
            f"gqc_dist.frontends.lightning supports lightning {TESTED_LIGHTNING[0]}.{TESTED_LIGHTNING[1]}.x "
            f"(it adjusts Lightning's step counters, which move between releases); found {version}: "
            f"pip install 'gqc_dist[lightning]'")


_check_version(lightning.__version__)


# ---------------------------------------------------------------------- Lightning's private state
def _step_progress(trainer):
    """Lightning's optimizer-step counter (a ``_Progress``) for the module's optimization mode:
    ``trainer.global_step`` is its ``total.completed``. PRIVATE (lightning 2.6)."""
    loop = trainer.fit_loop.epoch_loop
    if trainer.lightning_module.automatic_optimization:
        return loop.automatic_optimization.optim_progress.optimizer.step
    return loop.manual_optimization.optim_step_progress


def _set_log_step(trainer, step: int) -> None:
    """The step Lightning's loggers get for training metrics. PRIVATE (lightning 2.6): Lightning
    advances it after every batch that is not accumulating, i.e. every micro-batch here."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = step


# ---------------------------------------------------------------------- refusals
def check_trainer(trainer, module) -> None:
    """Refuse Trainer settings that would corrupt the window (one line naming the setting)."""
    strategy = trainer.strategy
    deepspeed = isinstance(strategy, GQCDeepSpeedStrategy)
    if isinstance(strategy, DeepSpeedStrategy) and not deepspeed:
        raise GQCConfigError(
            "Trainer(strategy=DeepSpeedStrategy(...)) forces its own gradient accumulation: use "
            "gqc_dist.frontends.lightning.GQCDeepSpeedStrategy(..., gqc={...}) with GQC")
    if isinstance(strategy, FSDPStrategy):
        raise GQCConfigError("Trainer(strategy='fsdp') (FSDP1 flat parameters) is not supported with GQC; use DDP "
                             "or GQCDeepSpeedStrategy")
    if trainer.accumulate_grad_batches != 1:
        raise GQCConfigError(
            f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) must be 1 with GQC: GQC decides "
            "after every micro-batch how many to accumulate (max_draws bounds it)")
    if trainer.gradient_clip_val and not deepspeed:
        raise GQCConfigError(
            f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) would clip the running sum every micro-batch; "
            "GQC clips the window mean: remove it and build the wrapper with "
            "gradients=gqc_dist.engines.TorchOptimizerGradients(optimizer, clip=...)")
    if module.automatic_optimization and is_overridden("configure_gradient_clipping", module, LightningModule):
        raise GQCConfigError(
            "LightningModule.configure_gradient_clipping is overridden: Lightning calls it every micro-batch on the "
            "running sum; GQC clips the window mean (TorchOptimizerGradients(optimizer, clip=...))")
    precision = trainer.precision_plugin
    if isinstance(precision, MixedPrecision) and precision.scaler is not None:
        raise GQCConfigError(
            "Trainer(precision='16-mixed') unscales and steps its GradScaler every micro-batch, which corrupts the "
            "accumulated sum: use precision='bf16-mixed' or '32-true' (fp16: under GQCDeepSpeedStrategy)")


def _check_fit(trainer, controller) -> None:
    """What can only be checked once the optimizers and schedulers exist."""
    for config in trainer.lr_scheduler_configs:
        if config.interval == "step" and config.frequency != 1:
            raise GQCConfigError(
                f"lr scheduler 'frequency': {config.frequency} with 'interval': 'step' counts micro-batches; with GQC "
                "an interval='step' scheduler steps once per optimizer step: use frequency 1")
    if controller.local_accumulation and not isinstance(trainer.strategy, GQCDeepSpeedStrategy):
        raise GQCConfigError(
            "local_accumulation needs gradients left unreduced between steps (DDP no_sync every micro-batch), which "
            "Lightning does not do at accumulate_grad_batches=1; build the wrapper without it")


def _find_controller(trainer) -> GQCOptimizerWrapper:
    if isinstance(trainer.strategy, GQCDeepSpeedStrategy):
        return trainer.strategy.deepspeed_engine.gqc
    optimizers = trainer.optimizers
    if len(optimizers) != 1:
        raise GQCConfigError(f"GQCLightningModule needs exactly one optimizer (a GQC wrapper), got {len(optimizers)}")
    if not isinstance(optimizers[0], GQCOptimizerWrapper):
        raise GQCConfigError(
            f"configure_optimizers must return a GQC wrapper (e.g. gqc_dist.OptimizerWrapperGNTS(optimizer, ...)), "
            f"got {type(optimizers[0]).__name__}")
    return optimizers[0]


# ---------------------------------------------------------------------- the decision observer
class _DecisionObserver:
    """Stands in for ``controller.after_backward`` (an instance attribute, the way torch's lr
    schedulers wrap ``optimizer.step``) and reports each decision: both the wrapper's ``step()``
    and the DeepSpeed engine's ``step()`` decide through it."""

    def __init__(self, controller, report):
        current = vars(controller).get("after_backward")
        self.original = current.original if isinstance(current, _DecisionObserver) else controller.after_backward
        self.controller = controller
        self.report = report
        controller.after_backward = self

    def __call__(self, loss=None):
        decision = self.original(loss)
        self.report(decision)
        return decision

    def detach(self) -> None:
        if vars(self.controller).get("after_backward") is self:
            del self.controller.after_backward


class GQCCallback(Callback):
    """The per-batch bookkeeping of :class:`GQCLightningModule` (which adds it through
    ``configure_callbacks``): refusals, step counting, the logging step, GQC's statistics.

    A callback, not module hooks, so that a module overriding ``on_train_batch_start`` and the
    like without calling ``super()`` still counts right."""

    def __init__(self):
        self.controller: Optional[GQCOptimizerWrapper] = None
        #: decisions taken during the current training batch
        self.decisions: List[Any] = []
        self._observer: Optional[_DecisionObserver] = None
        self._trainer = None

    @property
    def stepped(self) -> bool:
        """The controller stepped during the current training batch."""
        return any(decision.stepped for decision in self.decisions)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            check_trainer(trainer, pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        # after the strategy set up the optimizers (and DeepSpeed's engine), before a checkpoint is restored
        self.controller = _find_controller(trainer)
        _check_fit(trainer, self.controller)
        self._trainer = trainer
        self.decisions = []
        self._observer = _DecisionObserver(self.controller, self._on_decision)

    def _on_decision(self, decision) -> None:
        self.decisions.append(decision)
        if decision.stepped:
            return
        progress = _step_progress(self._trainer)
        # Lightning marked this call ready and completes it after the call returns: take it back
        # now (net zero). A call Lightning does not count (the raw wrapper stepped by hand) is left.
        if progress.total.ready > progress.total.completed:
            progress.increment_by(-1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.decisions = []
        _set_log_step(trainer, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped = [d for d in self.decisions if d.stepped]
        mode = getattr(pl_module, "gqc_log", "basic")
        if not stepped or mode is None:
            return
        window = stepped[-1].window
        # the progress bar shows the last window (self.log keeps showing it until the next step)
        pl_module.log("gqc/window", float(window.num_draws), prog_bar=True, logger=False, on_step=True,
                      on_epoch=False, batch_size=1)
        # Loggers directly (as LearningRateMonitor does): self.log would re-send the last value with
        # every following micro-batch, at the next step. Identical on every rank (reduced statistics);
        # Lightning's loggers write on rank 0 only.
        every = trainer.log_every_n_steps  # Lightning's rule for step metrics, on the optimizer step
        if trainer.loggers and every and (window.step + 1) % every == 0:
            values = self.step_statistics(window, mode)
            for logger in trainer.loggers:
                logger.log_metrics(values, step=window.step)

    def step_statistics(self, window, mode: str = "basic") -> dict:
        """What goes to the loggers for the optimizer step taken on ``window`` (logged at step
        ``window.step``, the 0-based optimizer step)."""
        values = {"gqc/window": window.num_draws, "gqc/micro_batches": window.micro_batches_seen,
                  "gqc/forced": float(window.forced)}
        if window.lr is not None:
            values["gqc/lr"] = window.lr
        if self.controller.last_grad_norm is not None:
            values["gqc/grad_norm"] = self.controller.last_grad_norm
        if window.noise_scale is not None and math.isfinite(window.noise_scale):
            values["gqc/noise_scale"] = window.noise_scale
        if mode == "vital":
            for key, value in self.controller.vital_statistics().items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    values.setdefault(f"gqc/{key}", value)
        return {key: float(value) for key, value in values.items()}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Lightning advanced the logging step after the last micro-batch; epoch metrics and an
        # epoch-end checkpoint take the optimizer step
        _set_log_step(trainer, trainer.global_step)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._detach()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._detach()

    def _detach(self) -> None:
        if self._observer is not None:
            self._observer.detach()
            self._observer = None


# ---------------------------------------------------------------------- the module
class GQCLightningModule(LightningModule):
    """A ``LightningModule`` whose optimizer is a GQC controller: use it as the base class in
    place of ``LightningModule`` (automatic or manual optimization).

    ``configure_optimizers`` returns the GQC wrapper (a ``torch.optim.Optimizer``; build torch lr
    schedulers on it) and optionally a scheduler; under :class:`GQCDeepSpeedStrategy` the plain
    torch optimizer. Manual optimization: ``self.manual_backward(loss)`` then
    ``if opt.step(): sch.step()``; never ``opt.zero_grad()``.

    Overriding ``configure_callbacks``, ``optimizer_zero_grad``, ``lr_scheduler_step``,
    ``zero_grad`` or ``on_before_batch_transfer``: call ``super()``.
    """

    #: GQC statistics in Lightning's logs at every optimizer step: "basic", "vital" or None
    gqc_log: Optional[str] = "basic"

    def configure_callbacks(self):
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit":
            check_trainer(trainer, self)  # the earliest hook: before the strategy sets anything up
        callbacks = super().configure_callbacks()
        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks or [])
        return callbacks + [GQCCallback()]

    def _gqc_callback(self) -> Optional[GQCCallback]:
        trainer = self._trainer
        if trainer is None:
            return None
        return next((cb for cb in trainer.callbacks if isinstance(cb, GQCCallback)), None)

    @property
    def gqc(self) -> Optional[GQCOptimizerWrapper]:
        """The GQC controller (the wrapper; under DeepSpeed ``engine.gqc``), once fit started."""
        callback = self._gqc_callback()
        return None if callback is None else callback.controller

    @property
    def gqc_stepped(self) -> bool:
        """GQC took an optimizer step during the current training batch."""
        callback = self._gqc_callback()
        return callback is not None and callback.stepped

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer) -> None:
        """Nothing: the controller zeroes after each optimizer step (the window accumulates)."""

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """``interval="step"`` schedulers step only when GQC stepped in this batch."""
        trainer = self.trainer
        config = next((c for c in trainer.lr_scheduler_configs if c.scheduler is scheduler), None)
        if config is not None and config.interval == "step" and not self.gqc_stepped:
            return
        super().lr_scheduler_step(scheduler, metric)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Leaves an open window's gradient alone (Lightning zeroes after restoring a checkpoint
        and before validation); zeroes otherwise."""
        trainer = self._trainer
        if trainer is not None and trainer.training and self._gqc_callback() is None:
            raise GQCUsageError("GQCLightningModule needs its GQCCallback: a configure_callbacks() override must "
                                "return super().configure_callbacks() plus its own callbacks")
        controller = self.gqc
        if controller is not None and controller.num_draws > 0:
            return
        super().zero_grad(set_to_none=set_to_none)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # the earliest hook of a training batch: callbacks' on_train_batch_start (LearningRateMonitor)
        # then already see the optimizer step as the logging step
        trainer = self._trainer
        if trainer is not None and trainer.training and self.gqc is not None:
            _set_log_step(trainer, trainer.global_step)
        return super().on_before_batch_transfer(batch, dataloader_idx)


# the DeepSpeed strategy lives beside this module; imported last, since it builds on what is above
from gqc_dist.frontends.lightning_deepspeed import GQCDeepSpeedStrategy  # noqa: E402

__all__ = ["GQCLightningModule", "GQCCallback", "GQCDeepSpeedStrategy", "check_trainer", "TESTED_LIGHTNING"]
