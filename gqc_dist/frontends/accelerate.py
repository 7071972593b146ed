"""GQC in a plain Hugging Face Accelerate loop, and the Accelerate pieces ``GQCTrainer`` shares.

A loop changes three lines::

    model, optimizer, loader, scheduler, gqc = gqc_dist.frontends.accelerate.prepare(
        accelerator, model, optimizer, loader, scheduler, gqc={"algorithm": "cbc", "kappa": 0.25})
    for batch in loader:
        accelerator.backward(model(**batch).loss)
        if gqc.step():                  # was: optimizer.step(); scheduler.step(); optimizer.zero_grad()
            scheduler.step()

:func:`prepare` calls ``accelerator.prepare`` and builds the controller around what it returns:

* DDP / FSDP2 / one process: the torch optimizer inside the ``AcceleratedOptimizer`` (FSDP2 has
  re-pointed its groups to the sharded parameters by then), with Accelerate's AMP ``GradScaler``
  and the clip GQC applies to the window's mean gradient (exact global norm). ``gqc.step()``
  is the decision; when it says step, the window is averaged, clipped, stepped and zeroed.
* DeepSpeed: the ds_config Accelerate hands to ``deepspeed.initialize`` is rewritten first
  (``gqc_dist.frontends.deepspeed.split_config``: caller-owned accumulation, clipping moved to GQC), the
  controller is attached to the engine (``attach_controller``), and Accelerate's engine wrapper is
  replaced by :class:`GQCEngineWrapper`, whose ``backward`` runs the decision (``engine.step()``)
  after every micro-batch. ``gqc.step()`` reports it.

A prepared lr scheduler steps once per ``scheduler.step()`` call (Accelerate would step it once
per process): it counts optimizer steps. ``accelerator.save_state`` / ``load_state`` carry the
GQC state of every rank (``gqc_state_rank<r>.pt``; under DeepSpeed inside the engine's checkpoint),
mid-window included. The accumulation, zeroing and clipping are GQC's: the prepared optimizer's
``step()`` and ``zero_grad()`` and the accelerator's ``clip_grad_norm_`` / ``clip_grad_value_``
are refused with one line naming the replacement (GQC steps the torch optimizer inside, not
through them); do not use ``accelerator.accumulate``, and keep ``gradient_accumulation_steps`` 1.
``accelerator.sync_gradients`` stays True on every micro-batch (Accelerate's own state, shared
by every prepared object): count optimizer steps with ``gqc.step()``'s return or
``gqc.controller.num_steps``.

Private Accelerate API touched (pinned by the ``[hf]`` extra, ``accelerate>=1.16,<1.17``; tests in
``tests/test_integration_hf.py`` fail when it moves): ``Accelerator.deepspeed_engine_wrapped`` and
``DeepSpeedEngineWrapper.backward(loss, sync_gradients, **kwargs)`` (its stock version calls
``engine.set_gradient_accumulation_boundary``, which DeepSpeed refuses without managed
accumulation); ``DeepSpeedPlugin.deepspeed_config`` being the dict ``prepare`` hands to DeepSpeed;
``AcceleratedScheduler.step_with_optimizer``.
"""

from typing import Any, Dict, Optional, Tuple

import torch

from gqc_dist.algorithms.spec import get as algorithm_spec
from gqc_dist.config import SECTION, build_controller, parse_section
from gqc_dist.engines import TorchOptimizerGradients
from gqc_dist.errors import GQCConfigError, GQCUsageError
from gqc_dist.extras import require
from gqc_dist.core import session as gqc_session
from gqc_dist.core.session import GQCSession

require("accelerate", "hf", "gqc_dist.frontends.accelerate")

from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.scheduler import AcceleratedScheduler  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from accelerate.utils.deepspeed import (  # noqa: E402
    DeepSpeedEngineWrapper,
    DeepSpeedOptimizerWrapper,
    DeepSpeedSchedulerWrapper,
)

class GQCEngineWrapper(DeepSpeedEngineWrapper):
    """Accelerate's DeepSpeed backward with GQC owning the step boundary.

    The stock ``backward`` calls ``engine.set_gradient_accumulation_boundary`` (DeepSpeed asserts
    there without managed accumulation) and steps only when Accelerate's ``sync_gradients`` says
    so; this one runs the engine's backward and then ``engine.step()``, which after
    ``attach_controller`` is the GQC decision (``engine.gqc_decision``). ``sync_gradients`` is
    ignored: GQC, not a fixed count, decides."""

    def __init__(self, engine):
        super().__init__(engine)
        #: a decision was taken since the last :meth:`take_decision` (one per backward)
        self.decided = False

    def backward(self, loss, sync_gradients=True, **kwargs):
        self.engine.backward(loss, **kwargs)
        self.engine.step()
        self.decided = True

    def take_decision(self):
        """The decision the last backward took; refuses a second read of one decision."""
        if not self.decided:
            raise GQCUsageError("gqc.step() must follow exactly one accelerator.backward(loss): GQC decides "
                                "after every micro-batch's backward")
        self.decided = False
        return self.engine.gqc_decision


# ---------------------------------------------------------------------- leftovers of the stock loop
_REMOVE_STEP = ("optimizer.step() on the optimizer gqc_dist.frontends.accelerate.prepare returned: remove it (and "
                "optimizer.zero_grad()); `if gqc.step(): scheduler.step()` replaces them: GQC steps when the window is "
                "complete and zeroes the gradients itself")
_REMOVE_ZERO_GRAD = ("optimizer.zero_grad() on the optimizer gqc_dist.frontends.accelerate.prepare returned would "
                     "clear GQC's window: remove it; GQC zeroes the gradients itself after each step (`if gqc.step(): "
                     "scheduler.step()` replaces optimizer.step(), scheduler.step() and optimizer.zero_grad())")
_REMOVE_CLIP = ("accelerator.{name}() on an accelerator GQC is prepared on would clip the running sum of the window "
                "every micro-batch: remove it and pass the max norm to gqc_dist.frontends.accelerate.prepare(..., "
                "clip=max_norm); GQC clips the window's mean gradient with the exact global norm "
                "(gqc.controller.last_grad_norm is that norm)")


class _RefusesLeftovers:
    """The user-facing ``step`` / ``zero_grad`` of the optimizer :func:`prepare` returns: GQC
    steps and zeroes the torch optimizer inside (``GQCStep`` / the DeepSpeed engine), never
    through this object, so a leftover ``optimizer.step(); optimizer.zero_grad()`` is refused."""

    def step(self, *args, **kwargs):
        raise GQCUsageError(_REMOVE_STEP)

    def zero_grad(self, *args, **kwargs):
        raise GQCUsageError(_REMOVE_ZERO_GRAD)


class GQCAcceleratedOptimizer(_RefusesLeftovers, AcceleratedOptimizer):
    """The ``AcceleratedOptimizer`` :func:`prepare` returns (DDP / FSDP2 / one process)."""


class GQCDeepSpeedOptimizerWrapper(_RefusesLeftovers, DeepSpeedOptimizerWrapper):
    """The ``DeepSpeedOptimizerWrapper`` :func:`prepare` returns (its stock ``step`` and
    ``zero_grad`` are silent no-ops)."""


_REFUSING = {AcceleratedOptimizer: GQCAcceleratedOptimizer, DeepSpeedOptimizerWrapper: GQCDeepSpeedOptimizerWrapper}


def refuse_leftovers(accelerator, prepared) -> None:
    """Make what would corrupt the window refuse, with one line naming the replacement: the
    ``step`` / ``zero_grad`` of the optimizer among ``prepared`` (its class becomes the refusing
    subclass: the same object, which the ``accelerator`` keeps and GQC never steps through) and
    ``accelerator.clip_grad_norm_`` / ``clip_grad_value_`` (instance attributes on that
    accelerator only)."""
    for obj in prepared:
        if isinstance(obj, AcceleratedOptimizer) and not isinstance(obj, _RefusesLeftovers):
            cls = type(obj)
            if cls not in _REFUSING:  # another AcceleratedOptimizer subclass
                _REFUSING[cls] = type(f"GQC{cls.__name__}", (_RefusesLeftovers, cls), {"__module__": __name__})
            obj.__class__ = _REFUSING[cls]
    for name in ("clip_grad_norm_", "clip_grad_value_"):
        setattr(accelerator, name, _refused_clip(name))


def _refused_clip(name):
    def refused(*args, **kwargs):
        raise GQCUsageError(_REMOVE_CLIP.format(name=name))

    refused.__name__ = name
    return refused


def rewrite_deepspeed_config(ds_config: Dict[str, Any], model, section: Optional[dict],
                             auto_clip: float) -> Tuple[Dict[str, Any], float]:
    """Rewrite, in place, the ds_config dict Accelerate will hand to ``deepspeed.initialize``
    (``gqc_dist.frontends.deepspeed.split_config``: managed accumulation off, accumulation 1, GQC's section
    removed, clipping moved to GQC). ``"auto"`` accumulation becomes 1 and ``"auto"`` clipping
    ``auto_clip``. Returns the parsed section (``section``, or the config's own) and the clip."""
    from gqc_dist.frontends.deepspeed import split_config

    if section is not None and SECTION in ds_config:
        raise GQCConfigError(f"GQC is configured twice: a gqc= section and a {SECTION!r} section in the DeepSpeed "
                             "config; keep one")
    config = dict(ds_config)
    if config.get("gradient_accumulation_steps") == "auto":
        config["gradient_accumulation_steps"] = 1
    if config.get("gradient_clipping") == "auto":
        config["gradient_clipping"] = auto_clip
    out, parsed, clip = split_config(config, model, section)
    ds_config.clear()
    ds_config.update(out)
    return parsed, clip


def check_section(section: Dict[str, Any], engine: str) -> None:
    """Refuse what the Hugging Face integrations cannot drive yet (one line naming the key)."""
    algorithm_spec(section["algorithm"]).check_engine(engine)
    if section["local_accumulation"]:
        raise GQCConfigError(f"{SECTION}.local_accumulation is not supported by the Hugging Face integrations yet "
                             "(they run exact mode: the gradient is reduced every micro-batch); set it false")


def engine_name(accelerator) -> str:
    """gqc_dist's name for what ``accelerator`` runs: single, ddp, fsdp2 or deepspeed; refuses
    the rest."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise GQCConfigError(f"FSDP fsdp_version {version} is not supported by gradient_quality_control: use "
                                 "fsdp_version 2 (FSDP2)")
        return "fsdp2"
    if kind == DistributedType.NO:
        return "single"
    if kind.value.startswith("MULTI_"):  # DDP on CPUs or any accelerator
        return "ddp" if accelerator.num_processes > 1 else "single"
    raise GQCConfigError(f"Accelerate distributed_type {kind} is not supported by gradient_quality_control "
                         "(DDP, FSDP2 and DeepSpeed are)")


def torch_controller(section: Dict[str, Any], optimizer: torch.optim.Optimizer, scaler, clip: float,
                     micro_batch_size: Optional[int], per_rank_batch_size: Optional[int]):
    """The wrapper (and value schedule) around a torch optimizer Accelerate prepared: GQC averages,
    unscales (Accelerate's ``GradScaler``), clips the window's mean to ``clip`` and steps."""
    if isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    gradients = TorchOptimizerGradients(optimizer, None, scaler, clip=float(clip or 0.0))
    return build_controller(section, optimizer, gradients=gradients, micro_batch_size=micro_batch_size,
                            physical_batch_size=per_rank_batch_size)


# ---------------------------------------------------------------------- the plain-loop helper
class GQCStep:
    """What :func:`prepare` returns last: ``gqc.step()`` after every ``accelerator.backward(loss)``.

    Attributes:
        session: the :class:`~gqc_dist.core.session.GQCSession` (controller, value schedule, last
            decision, per-rank state) every front end drives.
        controller: the GQC wrapper (``statistics()``, ``num_steps``, ``last_window`` ...).
        schedule: the section's value schedule (stepped on every optimizer step), or ``None``.
        decision: the last :class:`~gqc_dist.core.window.Decision`.
    """

    def __init__(self, session: GQCSession, engine_wrapper: Optional[GQCEngineWrapper]):
        self.session = session
        self._engine_wrapper = engine_wrapper

    controller = property(lambda self: self.session.controller)
    schedule = property(lambda self: self.session.schedule)
    decision = property(lambda self: self.session.decision)

    def step(self, loss=None) -> bool:
        """The GQC decision on the micro-batch just backpropagated; True when the optimizer stepped
        (then step your lr scheduler). ``loss``: this rank's micro-batch loss, read by algorithms
        that need it (MHT; under DeepSpeed the engine's backward keeps it and decides there)."""
        if self._engine_wrapper is not None:
            return self._engine_wrapper.take_decision().stepped
        return self.session.micro_step(loss).stepped

    def statistics(self) -> Dict[str, Any]:
        """The controller's ``vital_statistics()``."""
        return self.controller.vital_statistics()

    def state_dict(self) -> Dict[str, Any]:
        return self.session.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.session.load_state_dict(state)


def prepare(accelerator, *objects, gqc: Dict[str, Any] = None, clip: Optional[float] = None,
            micro_batch_size: Optional[int] = None):
    """``accelerator.prepare(*objects)`` with GQC: returns the prepared objects and a
    :class:`GQCStep` last. From then on the returned optimizer's ``step()`` / ``zero_grad()`` and
    ``accelerator.clip_grad_norm_`` / ``clip_grad_value_`` raise :class:`GQCUsageError` naming the
    replacement (:func:`refuse_leftovers`).

    Args:
        gqc: the ``gradient_quality_control`` section (e.g. ``{"algorithm": "cbc", "kappa": 0.25}``);
            under DeepSpeed it may instead sit in the ds_config.
        clip: max global norm of each window's mean gradient (0: none). Default: 0, or under
            DeepSpeed the ds_config's ``gradient_clipping`` (``"auto"``: Accelerate's 1.0).
        micro_batch_size: global samples per micro-step, for the noise scale in samples; default:
            the first prepared DataLoader's ``total_batch_size``.
    """
    if accelerator.gradient_accumulation_steps != 1:
        raise GQCConfigError(f"gradient_accumulation_steps must be 1 with gradient_quality_control, got "
                             f"{accelerator.gradient_accumulation_steps}: GQC decides per micro-batch how many to "
                             "accumulate (max_draws bounds it)")
    engine = engine_name(accelerator)
    wrapper = None
    if engine == "deepspeed":
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if clip is not None:
            if ds_config.get("gradient_clipping", "auto") not in ("auto", clip):
                raise GQCConfigError(f"clip={clip} and the ds_config's gradient_clipping "
                                     f"{ds_config['gradient_clipping']} disagree; give one")
            ds_config["gradient_clipping"] = clip
        model = next((obj for obj in objects if isinstance(obj, torch.nn.Module)), None)
        # "auto" clipping is Accelerate's 1.0 (what its deepspeed_config_process would fill in)
        section, clip = rewrite_deepspeed_config(ds_config, model, None if gqc is None else parse_section(gqc),
                                                 1.0)
        check_section(section, engine)
        prepared = accelerator.prepare(*objects)
        from gqc_dist.frontends.deepspeed import attach_controller

        ds_engine = accelerator.deepspeed_engine_wrapped.engine
        attach_controller(ds_engine, section, clip)
        wrapper = accelerator.deepspeed_engine_wrapped = GQCEngineWrapper(ds_engine)
        session = ds_engine.gqc_session
    else:
        if gqc is None:
            raise GQCConfigError(f"prepare needs gqc= (a {SECTION} section)")
        section = parse_section(gqc)
        check_section(section, engine)
        prepared = accelerator.prepare(*objects)
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        optimizers = [obj for obj in prepared if isinstance(obj, AcceleratedOptimizer)]
        if len(optimizers) != 1:
            raise GQCUsageError(f"prepare needs exactly one optimizer among the objects, got {len(optimizers)}")
        loader = next((obj for obj in prepared if isinstance(obj, torch.utils.data.DataLoader)), None)
        if micro_batch_size is None and loader is not None:
            micro_batch_size = getattr(loader, "total_batch_size", None)
        per_rank = None if micro_batch_size is None else micro_batch_size // accelerator.num_processes
        session = GQCSession(*torch_controller(section, optimizers[0], accelerator.scaler, clip, micro_batch_size,
                                               per_rank))
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)
    refuse_leftovers(accelerator, prepared)
    for obj in prepared:
        # one scheduler step per optimizer step: Accelerate steps a prepared scheduler once per
        # process per call unless it is not tied to the optimizer (DeepSpeed's own steps inside
        # the engine, its wrapper's step is a no-op)
        if isinstance(obj, AcceleratedScheduler) and not isinstance(obj, DeepSpeedSchedulerWrapper):
            obj.step_with_optimizer = False
    handle = GQCStep(session, wrapper)
    if engine != "deepspeed":  # DeepSpeed: the engine's save/load_checkpoint carry it
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: session.write(output_dir))
        accelerator.register_load_state_pre_hook(lambda models, input_dir: session.load_state_dict(
            gqc_session.read(input_dir)))
    return (*prepared, handle)
