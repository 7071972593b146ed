"""GQC in torchtitan 0.3.0: a ``Trainer`` subclass that decides after every micro-batch.

torchtitan 0.3.0's supported extension point is a ``Trainer`` subclass with its own nested
``Config``, returned by a function of a module's config registry and run with
``python -m torchtitan.train --module <module> --config <function>`` (as its Flux trainer does).
:class:`GQCTrainer` is that subclass; :func:`with_gqc` turns an existing config function's
``Trainer.Config`` into a ``GQCTrainer.Config`` carrying the ``gradient_quality_control`` section::

    def llama3_debugmodel_gqc():
        return with_gqc(llama3_debugmodel(), {"algorithm": "cbc", "kappa": 0.25, "max_draws": 16})

One ``train_step`` is one optimizer step, as in torchtitan: it draws one micro-batch at a time
(forward, backward) and asks GQC after each (``after_backward``) until GQC steps; the wrapper then
averages the window, clips it to ``training.max_norm`` with the exact global norm, steps
torchtitan's optimizers and zeroes the gradients. So torchtitan's ``step`` counter, its lr
scheduler (stepped once per ``train_step``), its metrics and its checkpoints all count optimizer
steps. GQC's statistics go to torchtitan's metrics (``gqc/...`` next to ``lr/...``); GQC's state
rides in the checkpoint's ``train_state``.

Normalisation. torchtitan divides each step's summed loss by the step's valid tokens, counted
over the whole step before its first forward (FSDP2 sums gradients, divide factor 1): a
token-weighted mean over the step. GQC cannot know the window in advance, so each micro-batch is
normalised by its own global valid-token count (one scalar all-reduce per micro-batch): its
backward is that micro-batch's global token mean, and GQC averages the window's sum by the number
of micro-batches, a mean of micro-batch means. The two agree when every micro-batch has the same
number of valid tokens (packed pre-training data without ignored labels); with padding or masked
labels the recipe weights micro-batches equally instead of tokens.

What the recipe refuses (one :class:`~gqc_dist.errors.GQCConfigError` line naming the setting):
gradient accumulation other than 1 (``training.global_batch_size``), CUDA graphs (GQC zeroes
gradients with ``set_to_none`` and reads them between micro-batches: set
``training.disable_cuda_graphs``, which :func:`with_gqc` does), pipeline parallelism, GQC's
``local_accumulation`` (torchtitan's FSDP2 reduce-scatters every micro-batch) and a negative
``training.max_norm`` (``0`` turns clipping off).

Pinned: torchtitan 0.3.0 (``pip install 'gqc_dist[torchtitan]'``). The recipe overrides
``Trainer.train_step`` and ``state_dict``/``load_state_dict``, calls ``forward_backward_step``,
``metrics_processor.should_log``/``log``, ``lr_schedulers.get_metrics``/``step``,
``checkpointer.maybe_wait_for_staging``, ``parallel_dims.get_mesh``/``get_optional_mesh``,
``dist_utils.dist_sum_tensor``/``dist_sum``/``dist_max`` and reads ``OptimizersContainer.optimizers``;
``tests/test_integration_torchtitan.py`` fails when any of them moves.
"""

import dataclasses
import io
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Dict, Iterator, List

import torch

from gqc_dist.algorithms.spec import algorithms
from gqc_dist.config import SECTION, build_controller, parse_section
from gqc_dist.core.session import GQCSession
from gqc_dist.engines import TorchOptimizerGradients
from gqc_dist.errors import CheckpointError, GQCConfigError, GQCUsageError
from gqc_dist.extras import require

require("torchtitan.trainer", "torchtitan", "gqc_dist.frontends.torchtitan")

from torchtitan.components.loss import IGNORE_INDEX  # noqa: E402
from torchtitan.components.optimizer import OptimizersContainer  # noqa: E402
from torchtitan.distributed import utils as dist_utils  # noqa: E402
from torchtitan.tools.logging import logger  # noqa: E402
from torchtitan.trainer import Trainer  # noqa: E402

#: the torchtitan release this recipe was written against and is tested on
TESTED_TORCHTITAN = "0.3.0"
#: a train_step that drops this many windows in a row (non-finite gradients) stops training
MAX_DROPPED_WINDOWS = 3


def _check_version() -> None:
    installed = metadata.version("torchtitan")
    if installed.split("+")[0] != TESTED_TORCHTITAN:
        raise GQCUsageError(
            f"gqc_dist.frontends.torchtitan overrides torchtitan {TESTED_TORCHTITAN}'s Trainer.train_step and "
            f"is tested on that release only; torchtitan {installed} is installed: pip install 'gqc_dist[torchtitan]'")


_check_version()


def _fill_torch_gaps() -> None:
    """torch 2.13.0 lacks ``torch.distributed.set_timeout``, which torchtitan 0.3.0 (built against
    a torch nightly) calls after the first step of every run (``dist_utils.set_pg_timeouts``):
    without it ``Trainer.train`` raises AttributeError after step 1, on any device. torch's
    ``distributed_c10d._set_pg_timeout(timeout, group)`` is the same operation under its older
    private name. Only a missing attribute is added; a torch that has it is left alone."""
    import torch.distributed as dist

    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = dist.distributed_c10d._set_pg_timeout


class OptimizersView(torch.optim.Optimizer):
    """torchtitan's ``OptimizersContainer`` as GQC sees it: one optimizer whose ``param_groups``
    are the inner optimizers' own groups.

    The container is a ``torch.optim.Optimizer`` too, but its own ``param_groups`` is a single
    group built with no hyperparameters (``Optimizer.__init__(self, all_params, {})``): no ``lr``.
    GQC's window hook (``lr_coupling``, :class:`gqc_dist.LRCoupling`) and ``Window.lr`` must see
    the groups the inner AdamW actually reads and torchtitan's LambdaLR writes, and the
    algorithm's schedulable keys then live (and are checkpointed) next to them. ``step`` and
    ``zero_grad`` go through the container, so hooks registered on it (MoE load balancing, bf16
    optimizer states) still run. Like torch's ``Optimizer`` subclasses that wrap another optimizer,
    ``Optimizer.__init__`` is not run: every piece of state stays the inner optimizers'.
    """

    def __init__(self, container: OptimizersContainer):
        self.container = container

    @property
    def param_groups(self) -> List[dict]:
        """The inner optimizers' groups, in the container's order (the dicts themselves)."""
        return [group for optimizer in self.container.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> Dict[Any, Any]:
        """A merged read-only copy of the inner optimizers' per-parameter states."""
        return {param: value for optimizer in self.container.optimizers for param, value in optimizer.state.items()}

    @property
    def defaults(self) -> dict:
        return self.container.optimizers[0].defaults

    def step(self, closure=None):
        if closure is not None:
            raise GQCUsageError("OptimizersView.step takes no closure (torchtitan's container refuses them)")
        return self.container.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.container.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.container.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.container.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        raise GQCUsageError("parameters are added to torchtitan's optimizers by its OptimizersContainer.Config, "
                            "not through GQC")

    def __repr__(self) -> str:
        return f"OptimizersView({[type(optimizer).__name__ for optimizer in self.container.optimizers]})"


def check_config(config: "GQCTrainer.Config") -> Dict[str, Any]:
    """The parsed ``gradient_quality_control`` section of ``config``, or one
    :class:`GQCConfigError` naming the setting GQC cannot run with (see the module docstring)."""
    section = parse_section(config.gradient_quality_control)
    if section["local_accumulation"]:
        raise GQCConfigError(f"{SECTION}.local_accumulation is not supported by the torchtitan recipe: torchtitan's "
                             "FSDP2 reduce-scatters the gradients of every micro-batch")
    if not config.training.disable_cuda_graphs:
        raise GQCConfigError("training.disable_cuda_graphs must be true with gradient_quality_control: GQC reads the "
                             "gradients after every micro-batch and zeroes them with set_to_none, which a captured "
                             "CUDA graph's static gradient buffers would not see (with_gqc sets it)")
    if config.parallelism.pipeline_parallel_degree > 1:
        raise GQCConfigError("parallelism.pipeline_parallel_degree must be 1 with gradient_quality_control: the "
                             "torchtitan recipe decides per data-parallel micro-batch and does not drive a pipeline "
                             "schedule")
    if config.training.max_norm < 0:
        raise GQCConfigError(f"training.max_norm must be >= 0 with gradient_quality_control (0: no clipping), got "
                             f"{config.training.max_norm!r}")
    return section


def with_gqc(config: Trainer.Config, section: Dict[str, Any]) -> "GQCTrainer.Config":
    """``config`` (a config function's ``Trainer.Config``) as a ``GQCTrainer.Config`` with the
    ``gradient_quality_control`` ``section`` and CUDA graphs off (required, see the module
    docstring); every other field is ``config``'s own object."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    values["training"] = dataclasses.replace(config.training, disable_cuda_graphs=True)
    return GQCTrainer.Config(**values, gradient_quality_control=dict(section))


def _pack(state: Dict[str, Any]) -> bytes:
    """GQC's state as one opaque value: torch.distributed.checkpoint flattens nested dicts and, on
    load, reads back only the keys a fresh state has (a fresh controller's state lacks keys a
    trained one has), so the state travels as bytes (one non-tensor item, which DCP saves once)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _unpack(blob: bytes) -> Dict[str, Any]:
    # the run's own checkpoint: DCP unpickles its non-tensor entries the same way
    return torch.load(io.BytesIO(blob), weights_only=False)


class GQCTrainer(Trainer):
    """torchtitan's ``Trainer`` with Gradient Quality Control deciding each step's window.

    Attributes (after construction):
        gqc: the GQC wrapper (:class:`gqc_dist.GQCOptimizerWrapper`) over :class:`OptimizersView`.
        gqc_session: its :class:`~gqc_dist.core.session.GQCSession` (the contract every front end
            drives: controller, value schedule, per-rank state).
        gqc_schedule: the section's value schedule (stepped once per optimizer step) or ``None``.
        gqc_decision: the :class:`gqc_dist.core.window.Decision` of the last micro-batch.
    """

    gqc_schedule = property(lambda self: self.gqc_session.schedule)

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        gradient_quality_control: Dict[str, Any] = field(default_factory=dict)
        """GQC's config section, e.g. {"algorithm": "cbc", "kappa": 0.25, "max_draws": 16}; the keys
        it holds can be overridden on the command line (--gradient_quality_control.kappa 0.3)."""

        def __post_init__(self):
            # zero-argument super() does not work in a slots dataclass (the class is recreated)
            Trainer.Config.__post_init__(self)
            check_config(self)

    def __init__(self, config: Config):
        section = check_config(config)
        _fill_torch_gaps()
        super().__init__(config)
        if self.gradient_accumulation_steps != 1:
            raise GQCConfigError(
                f"training.global_batch_size must give gradient accumulation 1 with gradient_quality_control (it "
                f"gives {self.gradient_accumulation_steps}): GQC decides how many micro-batches each step takes; "
                "leave it at -1")
        dims = self.parallel_dims
        engine = "fsdp2" if dims.fsdp_enabled else "ddp" if dims.dp_enabled else "single"
        algorithms()[section["algorithm"]].check_engine(engine)
        batch_degree = dims.get_mesh("batch").size() if dims.dp_enabled else 1
        local_batch = config.training.local_batch_size
        view = OptimizersView(self.optimizers)
        self.gqc_session = GQCSession(*build_controller(
            section, view, physical_batch_size=local_batch, micro_batch_size=local_batch * batch_degree,
            gradients=TorchOptimizerGradients(view, clip=float(config.training.max_norm))))
        self.gqc = self.gqc_session.controller
        self._needs_loss = algorithms()[section["algorithm"]].needs_loss
        self.gqc_decision = None

    # ------------------------------------------------------------------ the step
    def _micro_batch(self, data_iterator: Iterator):
        """Draw one micro-batch, forward and backward it normalised by its own global valid
        tokens; returns (loss as torchtitan returns it, this rank's valid tokens, global ones)."""
        input_dict, labels = next(data_iterator)
        local_tokens = (labels != IGNORE_INDEX).sum()
        if self.parallel_dims.dp_enabled:
            global_tokens = dist_utils.dist_sum_tensor(local_tokens.to(self.device), self.parallel_dims.get_mesh("batch"))
        else:
            global_tokens = local_tokens.to(self.device)
        input_dict = {key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                      for key, value in input_dict.items()}
        loss = self.forward_backward_step(input_dict=input_dict, labels=labels.to(self.device),
                                          global_valid_tokens=global_tokens)
        return loss.detach(), local_tokens.to(self.device), global_tokens

    def train_step(self, data_iterator: Iterator) -> None:
        """One optimizer step: micro-batches until GQC steps (a window GQC drops for non-finite
        gradients is discarded and drawing goes on, up to ``MAX_DROPPED_WINDOWS`` in a row), then
        the lr scheduler and GQC's value schedule step once, and the step is logged to
        torchtitan's metrics."""
        lr_metrics = self.lr_schedulers.get_metrics()  # the lr this step runs at, as torchtitan logs it
        should_log = self.metrics_processor.should_log(self.step)
        losses, local_tokens = [], []  # the window's, for the log
        drops = 0
        while True:
            loss, local, global_tokens = self._micro_batch(data_iterator)
            # async checkpoint staging must finish before the optimizer (inside after_backward) writes
            self.checkpointer.maybe_wait_for_staging()
            # MHT reads this rank's own token-mean loss; torchtitan returns local sum / global tokens
            mean_loss = loss * global_tokens / local.clamp(min=1) if self._needs_loss else None
            decision = self.gqc_session.micro_step(mean_loss)  # a step also advances the value schedule
            self.gqc_decision = decision
            if decision.dropped:
                # torchtitan stops on a non-finite loss; GQC discards a non-finite window and draws
                # on, but not forever (nothing is logged until a step is taken)
                drops += 1
                if drops >= MAX_DROPPED_WINDOWS:
                    raise RuntimeError(f"{drops} windows in a row had non-finite gradients at step {self.step} "
                                       "(gradient_quality_control dropped them). Stopping training.")
                losses, local_tokens = [], []
                continue
            losses.append(loss * global_tokens)  # this rank's summed loss
            local_tokens.append((local, global_tokens))
            if decision.stepped:
                break
        self.lr_schedulers.step()
        if should_log:
            self._log_step(losses, local_tokens, lr_metrics)

    def _log_step(self, losses, tokens, lr_metrics) -> None:
        """torchtitan's step metrics for the window, plus GQC's (``gqc/...``). The loss is the mean
        over the window's micro-batches of each one's global token mean (what was averaged)."""
        dims = self.parallel_dims
        window_mean = torch.stack([loss / global_tokens for loss, (_, global_tokens) in zip(losses, tokens)]).mean()
        local_mean = torch.stack(losses).sum() / torch.stack([local for local, _ in tokens]).sum().clamp(min=1)
        if dims.dp_cp_enabled:
            mesh = dims.get_optional_mesh("loss")
            global_avg_loss = dist_utils.dist_sum(window_mean, mesh)
            global_max_loss = dist_utils.dist_max(local_mean, mesh)
            ntokens_seen = dist_utils.dist_sum(torch.tensor(self.ntokens_seen, dtype=torch.int64,
                                                            device=self.device), mesh)
        else:
            global_avg_loss = global_max_loss = float(window_mean)
            ntokens_seen = self.ntokens_seen
        gqc = self.gqc_metrics()
        self.metrics_processor.log(self.step, global_avg_loss, global_max_loss, float(self.gqc.last_grad_norm),
                                   extra_metrics={"n_tokens_seen": ntokens_seen, **lr_metrics, **gqc})
        # torchtitan's console line is fixed; GQC's window gets its own next to it
        logger.info(f"gqc: step {self.step:2}  window {self.gqc.last_num_draws}  micro-batches {self.gqc.num_batches}"
                    + (f"  lr {gqc['gqc/applied_lr']:.4g}" if "gqc/applied_lr" in gqc else ""))

    def gqc_metrics(self) -> Dict[str, float]:
        """GQC's numbers for the metrics loggers: ``gqc/window`` (micro-batches in the last step),
        ``gqc/applied_lr`` (first group's lr after the window hook) and ``statistics("vital")``."""
        # the optimizer's own group values (lr, betas, ...) are torchtitan's to log (lr/...); GQC's
        # schedulable keys (thresholds) and counters are GQC's
        optimizer_keys = set(self.gqc.param_groups[0]) - set(self.gqc.SCHEDULABLE)
        out = {f"gqc/{key}": float(value) for key, value in self.gqc.statistics("vital").items()
               if key not in optimizer_keys and isinstance(value, (int, float)) and not isinstance(value, bool)}
        window = self.gqc.last_window
        if window is not None:
            out["gqc/window"] = float(window.num_draws)
            if window.lr is not None:
                out["gqc/applied_lr"] = float(window.lr)
        return out

    # ------------------------------------------------------------------ checkpoints
    def _gqc_state(self) -> Dict[str, Any]:
        if self.gqc.num_draws:
            # torchtitan saves only between train_steps, where no window is open; a save mid-window
            # would need each rank's own accumulated gradient shards, and DCP keeps one rank's copy
            # of a non-tensor entry
            raise GQCUsageError("torchtitan checkpoint requested mid-window with gradient_quality_control; save "
                                "after train_step")
        state = self.gqc_session.state_dict()  # torchtitan saves the optimizers
        state["rank"] = None  # the same on every rank: DCP keeps one copy
        return state

    def state_dict(self) -> Dict[str, Any]:
        """torchtitan's ``train_state`` (step, tokens seen) plus GQC's state, identical on every
        rank at a step boundary (counters, noise estimate, value schedule and values)."""
        state = super().state_dict()
        if hasattr(self, "gqc"):  # torchtitan may ask before __init__ has built the controller
            state["gqc"] = _pack(self._gqc_state())
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "gqc" not in state_dict:
            raise CheckpointError("the checkpoint's train_state has no GQC state (saved without "
                                  "gradient_quality_control?); load it model-only (checkpoint.initial_load_path)")
        self.gqc_session.load_state_dict(_unpack(state_dict["gqc"]), "the checkpoint's GQC state")
        self.gqc_decision = None


__all__ = ["GQCTrainer", "OptimizersView", "TESTED_TORCHTITAN", "check_config", "with_gqc"]
