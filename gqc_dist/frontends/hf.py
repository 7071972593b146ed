"""``GQCTrainer``: the Hugging Face ``Trainer`` with Gradient Quality Control.

A Trainer script changes one class and adds the section::

    from gqc_dist.frontends.hf import GQCTrainer
    trainer = GQCTrainer(model=model, args=args, train_dataset=ds,
                         gqc={"algorithm": "cbc", "kappa": 0.25, "max_draws": 16})

(or puts the ``"gradient_quality_control"`` section in the DeepSpeed config given as
``args.deepspeed``). The Trainer then runs at ``gradient_accumulation_steps`` 1 and, after every
micro-batch's backward, GQC decides whether the window is complete. Only when it stepped do the
lr scheduler step, ``state.global_step`` advance, ``on_step_end`` run, and logging, evaluation
and saving happen: ``max_steps``, ``logging_steps``, ``save_steps``, ``eval_steps`` and the lr
schedule count optimizer steps. The logs carry ``gqc/window`` (mean micro-batches per step since
the last log), ``gqc/noise_scale`` and the controller's other vital statistics; ``learning_rate``
is the rate the step was taken with (after ``lr_coupling``), ``grad_norm`` the window mean's norm.

GQC averages the window, clips its mean to ``args.max_grad_norm`` with the exact global norm
(under DeepSpeed: the config's ``gradient_clipping``), steps and zeroes; the Trainer's own
per-micro-batch clipping does not run. DDP, FSDP2 (``fsdp_version`` 2) and DeepSpeed ZeRO run in
exact mode (every micro-batch's gradient is reduced). Checkpoints carry each rank's GQC state
(``gqc_state_rank<r>.pt``; under DeepSpeed inside the engine's checkpoint), so a run saved
mid-window (an epoch-end save) resumes exactly; the data position on resume is GQC's count of
micro-batches, not ``global_step``.

Differences from the stock loop: windows span epochs (no forced step at an epoch's end);
``on_pre_optimizer_step`` is not called (the step happens inside the decision); each
micro-batch's loss is its own mean (with ``average_tokens_across_devices``, its global token
mean), so a window is a mean of micro-batch means, which equals the stock token-weighted window
when micro-batches hold equal token counts. An epoch-based run sizes the lr schedule in
micro-batches (an upper bound on optimizer steps): give ``max_steps`` for a schedule that ends
when training does.

A plain ``Trainer`` handed a GQC wrapper (``optimizers=(wrapper, scheduler)``) would count, schedule
and zero every micro-batch as a step; the wrapper's ``step()`` refuses the stock Trainer loop at its
first step, naming ``GQCTrainer`` (which takes the plain torch optimizer and scheduler in
``optimizers=``).

Private Trainer API overridden or read (pinned by the ``[hf]`` extra, ``transformers>=5.24,<5.25``;
``tests/test_integration_hf.py`` checks the signatures and attributes and fails when they move):
``_run_epoch`` (the loop), ``_prepare_for_training`` (wrap after ``accelerator.prepare``),
``_init_training_state`` (resume position), ``_save_optimizer_and_scheduler`` (GQC state),
``_maybe_log_save_evaluate``, ``_load_rng_state``, ``_track_num_input_tokens``, the attributes
``_tr_loss``, ``current_gradient_accumulation_steps``, ``model_wrapped``, and the
``model.zero_grad()`` ``_inner_training_loop`` runs after loading a checkpoint (why the GQC state
is restored in ``_run_epoch``).
"""

import math
import os
import sys
import warnings
from typing import Any, Dict, Optional

import torch

from gqc_dist.config import SECTION, parse_section
from gqc_dist.errors import CheckpointError, GQCConfigError
from gqc_dist.extras import require
from gqc_dist.frontends import accelerate as gqc_accelerate
from gqc_dist.core import session as gqc_session

require("transformers", "hf", "gqc_dist.frontends.hf")

from accelerate import skip_first_batches  # noqa: E402
from transformers import Trainer  # noqa: E402
from transformers.optimization import GreedyLR  # noqa: E402
from transformers.trainer_utils import has_length  # noqa: E402

# schedulers the Trainer steps with an evaluation metric, not per optimizer step
_METRIC_SCHEDULERS = (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR)


class GQCTrainer(Trainer):
    """``transformers.Trainer`` whose optimizer steps when GQC decides (module docstring).

    Args:
        gqc: the ``gradient_quality_control`` section (``{"algorithm": ..., ...}``, see
            ``gqc_dist.config``); or ``None`` when the DeepSpeed config holds it.
        *args, **kwargs: ``Trainer``'s.

    Attributes:
        gqc: the GQC wrapper after ``train()`` started (``statistics()``, ``num_steps`` ...).
        gqc_session: its :class:`~gqc_dist.core.session.GQCSession` (the contract every front end
            drives: controller, value schedule, per-rank state).
        gqc_schedule: the section's value schedule, or ``None``.
    """

    gqc_schedule = property(lambda self: None if self.gqc_session is None else self.gqc_session.schedule)

    def __init__(self, *args, gqc: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise GQCConfigError(
                f"GQCTrainer needs gradient_accumulation_steps=1, got {self.args.gradient_accumulation_steps}: "
                "GQC decides per micro-batch how many to accumulate (max_draws bounds it)")
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if "lomo" in optim or "layerwise" in optim:
            raise GQCConfigError(f"optim={optim} updates the parameters inside the backward pass; "
                                 "GQC needs an optimizer that steps on the accumulated window")
        if self.args.n_gpu > 1:
            raise GQCConfigError(f"GQCTrainer does not support nn.DataParallel over {self.args.n_gpu} GPUs in one "
                                 "process: launch one process per GPU (torchrun / accelerate launch)")
        self._gqc_engine = gqc_accelerate.engine_name(self.accelerator)
        if self.is_deepspeed_enabled:
            # rewrite, before accelerator.prepare hands it to deepspeed.initialize, the ds_config
            # the Trainer already filled ("auto" clipping = max_grad_norm, accumulation = 1)
            ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            section, self._gqc_clip = gqc_accelerate.rewrite_deepspeed_config(
                ds_config, self.model, None if gqc is None else parse_section(gqc), self.args.max_grad_norm)
        else:
            if gqc is None:
                raise GQCConfigError(f"GQCTrainer needs gqc= (a {SECTION} section), or the section in the DeepSpeed "
                                     "config given as args.deepspeed")
            section, self._gqc_clip = parse_section(gqc), self.args.max_grad_norm
        gqc_accelerate.check_section(section, self._gqc_engine)
        self.gqc_section = section
        self.gqc = None
        self.gqc_session = None
        self._gqc_resume_state = None  # this rank's GQC state in the checkpoint resumed from
        self._gqc_pending = None  # GQC state read at resume, restored when the first epoch starts
        self._gqc_window_loss = None  # sum of the open window's micro-batch losses
        self._gqc_logged = (0, 0)  # (num_batches, num_steps) at the last log

    # ------------------------------------------------------------------ sizing and resume position
    def set_initial_training_values(self, args, dataloader):
        """Public: with ``max_steps`` the run ends at that many optimizer steps, however many
        epochs the variable windows need."""
        values = list(super().set_initial_training_values(args, dataloader))
        self._gqc_epoch_len = len(dataloader) if has_length(dataloader) else None
        if args.max_steps > 0:
            values[0] = sys.maxsize  # num_train_epochs: DefaultFlowCallback stops at max_steps
        return tuple(values)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        """Private (pinned): on resume, the data position is GQC's micro-batch count, not
        ``global_step * gradient_accumulation_steps``."""
        epochs, in_epoch = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                        resume_from_checkpoint, trial)
        self._gqc_resume_state = None
        if resume_from_checkpoint is not None:
            self._gqc_resume_state = self._read_gqc_state(resume_from_checkpoint)
            seen = self._gqc_resume_state["wrapper"]["counters"]["num_batches"]
            epochs, in_epoch = divmod(seen, self._gqc_epoch_len) if self._gqc_epoch_len else (0, seen)
            if self.args.ignore_data_skip:  # the stock meaning: start the resumed epoch's data anew
                in_epoch = 0
        return epochs, in_epoch

    def _read_gqc_state(self, checkpoint: str) -> Dict[str, Any]:
        """This rank's GQC state in a Trainer checkpoint (under DeepSpeed: in the engine's tag
        directory, checked against the engine once it exists, in ``_prepare_for_training``)."""
        if not self.is_deepspeed_enabled:
            return gqc_session.read(checkpoint)
        from gqc_dist.engines.deepspeed_checkpoint import latest_tag

        tag = latest_tag(None, checkpoint)  # the engine does not exist yet; DeepSpeed's rule without it
        if tag is None:
            raise CheckpointError(f"cannot resume GQC from DeepSpeed checkpoint {checkpoint}: no 'latest' file")
        self._gqc_ds_dir = os.path.join(checkpoint, tag)
        return gqc_session.read(self._gqc_ds_dir, "saved without gradient_quality_control")

    # ------------------------------------------------------------------ the controller
    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Private (pinned): build the controller around what ``accelerator.prepare`` returned
        (FSDP2 has re-pointed the optimizer to the sharded parameters by then)."""
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        world = self.accelerator.num_processes
        if self.is_deepspeed_enabled:
            from gqc_dist.frontends.deepspeed import attach_controller

            engine = self.model_wrapped
            attach_controller(engine, self.gqc_section, self._gqc_clip)
            self.accelerator.deepspeed_engine_wrapped = gqc_accelerate.GQCEngineWrapper(engine)
            self.gqc_session = engine.gqc_session
        else:
            self.gqc_session = gqc_session.GQCSession(*gqc_accelerate.torch_controller(
                self.gqc_section, self.optimizer, self.accelerator.scaler, self._gqc_clip,
                self._train_batch_size * world, self._train_batch_size))
        self.gqc = self.gqc_session.controller
        self._gqc_pending = None
        if self._gqc_resume_state is not None:
            if self.is_deepspeed_enabled:
                from gqc_dist.engines.deepspeed_checkpoint import agreed, read_gqc_state

                # DeepSpeed loaded its own state inside super() (before the controller existed)
                self._gqc_pending = agreed(lambda: read_gqc_state(self._gqc_ds_dir, self.gqc_session,
                                                                  self.gqc._gradients))
            else:
                self._gqc_pending = self._gqc_resume_state
        self._gqc_window_loss = None
        self._gqc_logged = (0, 0)
        return model, train_dataloader

    def _restore_gqc(self) -> None:
        # after _inner_training_loop's model.zero_grad(), which would wipe restored gradients
        state, self._gqc_pending = self._gqc_pending, None
        self.gqc_session.load_state_dict(state)
        if self.is_deepspeed_enabled:
            self.model_wrapped.gqc_stepped = bool(state["engine"].get("stepped", False))
        self._gqc_logged = (self.gqc.num_batches - self.gqc.num_draws, self.gqc.num_steps)

    def _save_optimizer_and_scheduler(self, output_dir):
        """Private (pinned), called on every rank: each rank's GQC state next to the optimizer's
        (DeepSpeed: ``engine.save_checkpoint`` already wrote it into its tag directory)."""
        super()._save_optimizer_and_scheduler(output_dir)
        if not self.is_deepspeed_enabled:
            self.gqc_session.write(output_dir)

    # ------------------------------------------------------------------ logs
    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        """Public: training logs gain the GQC statistics (``gqc/...``)."""
        if self.gqc is not None and "loss" in logs:
            logs.update(self.gqc_logs())
        super().log(logs, start_time)

    def gqc_logs(self) -> Dict[str, float]:
        """``gqc/window`` (mean micro-batches per optimizer step since the last log),
        ``gqc/noise_scale`` (samples; ``gqc/noise_scale_micro_batches``) and the controller's
        other numeric vital statistics, without the optimizer's own hyperparameters."""
        stats = self.gqc.vital_statistics()
        batches, steps = self.gqc.num_batches, self.gqc.num_steps
        out = {}
        if steps > self._gqc_logged[1]:
            out["gqc/window"] = (batches - self.gqc.num_draws - self._gqc_logged[0]) / (steps - self._gqc_logged[1])
        self._gqc_logged = (batches - self.gqc.num_draws, steps)
        hidden = set(self.gqc.optimizer.defaults) | {"initial_lr"}
        for key, value in stats.items():
            if key in hidden or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            name = {"gradient_noise_scale": "noise_scale",
                    "gradient_noise_scale_micro_batches": "noise_scale_micro_batches"}.get(key, key)
            out[f"gqc/{name}"] = value
        return out

    # ------------------------------------------------------------------ the loop
    def _step_scheduler(self) -> None:
        """One lr-scheduler step per optimizer step (under DeepSpeed with its own scheduler, a
        no-op wrapper: the engine stepped it). GQC steps the torch optimizer inside the
        ``AcceleratedOptimizer`` the scheduler was built on, so torch cannot see that step and
        would warn that the scheduler stepped first: it did not."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.lr_scheduler.step()

    def _run_epoch(self, model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch, trial,
                   ignore_keys_for_eval, start_time, resume_from_checkpoint, epochs_trained,
                   steps_trained_in_current_epoch):
        """Private (pinned): one micro-batch per iteration; the step's bookkeeping only when GQC
        stepped. Same arguments as ``Trainer._run_epoch`` (transformers 5.24)."""
        if self._gqc_pending is not None:
            self._restore_gqc()
        args = self.args
        step, learning_rate, grad_norm, rng_to_sync = -1, None, None, False
        if epoch == epochs_trained and resume_from_checkpoint is not None:
            if steps_trained_in_current_epoch > 0 and not args.ignore_data_skip:
                train_dataloader = skip_first_batches(train_dataloader, steps_trained_in_current_epoch)
                step = steps_trained_in_current_epoch - 1
                rng_to_sync = True
            elif steps_trained_in_current_epoch == 0:
                self._load_rng_state(resume_from_checkpoint)
        if hasattr(train_dataloader, "set_epoch"):
            train_dataloader.set_epoch(epoch)
        underlying_sampler = getattr(getattr(train_dataloader, "batch_sampler", None), "batch_sampler", None)
        if hasattr(underlying_sampler, "set_epoch"):
            underlying_sampler.set_epoch(epoch)
        epoch_iterator = iter(train_dataloader)
        # training_step divides the loss by this (when the loss is not scaled for accumulation)
        self.current_gradient_accumulation_steps = 1
        engine_wrapper = self.accelerator.deepspeed_engine_wrapped if self.is_deepspeed_enabled else None
        while True:
            batch, num_items_in_batch = self.get_batch_samples(epoch_iterator, 1, args.device)
            if not batch:
                break
            if rng_to_sync:  # as the stock loop: after the skipped batches were drawn
                self._load_rng_state(resume_from_checkpoint)
                rng_to_sync = False
            step += 1
            if self.gqc.num_draws == 0:
                self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            loss = self.training_step(model, batch[0], num_items_in_batch)
            self._gqc_window_loss = loss if self._gqc_window_loss is None else self._gqc_window_loss + loss
            self.current_flos += float(self.floating_point_ops(batch[0]))
            self._track_num_input_tokens(batch[0])
            if engine_wrapper is not None:  # the decision ran inside accelerator.backward
                decision = engine_wrapper.take_decision()
            else:
                decision = self.gqc_session.micro_step(loss)
            if decision.dropped:  # a non-finite gradient: the window is gone, and its losses
                self._gqc_window_loss = None
            if decision.stepped:
                self._tr_loss += self._gqc_window_loss / decision.window.num_draws
                self._gqc_window_loss = None
                self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
                learning_rate = decision.window.lr  # as applied (after lr_coupling)
                grad_norm = self.gqc.last_grad_norm
                if not isinstance(self.lr_scheduler, _METRIC_SCHEDULERS):  # those step after evaluation
                    self._step_scheduler()
                self.state.global_step += 1
                self.state.epoch = epoch + (step + 1) / steps_in_epoch
                self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                self._maybe_log_save_evaluate(self._tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                              start_time, learning_rate=learning_rate)
            else:
                self.control = self.callback_handler.on_substep_end(args, self.state, self.control)
            if self.control.should_epoch_stop or self.control.should_training_stop:
                break
        if step < 0:
            self.control.should_training_stop = True  # an empty epoch (as the stock loop)
        self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
        # an epoch-end save may fall mid-window: the GQC state carries the open window
        self._maybe_log_save_evaluate(self._tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                      start_time, learning_rate=learning_rate)

