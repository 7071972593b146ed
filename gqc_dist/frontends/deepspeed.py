"""``gqc_dist.frontends.deepspeed.initialize``: ``deepspeed.initialize`` with GQC deciding when to step.

Add a top-level ``"gradient_quality_control"`` section to ds_config.json (see
``gqc_dist.config``) and change one import; the loop stays DeepSpeed's::

    engine, optimizer, _, scheduler = gqc_dist.frontends.deepspeed.initialize(model=model, config=cfg, ...)
    for batch in loader:                       # one micro-batch per iteration
        loss = engine(batch)
        engine.backward(loss)
        engine.step()                          # an optimizer step only when GQC decides

What the returned engine adds:

* ``engine.gqc``: the controller: ``engine.gqc.statistics()``, ``engine.gqc.vital_statistics()``,
  ``engine.gqc.num_steps`` ...
* ``engine.step()`` returns True when the optimizer stepped (``engine.gqc_stepped`` holds the
  last result, ``engine.gqc_decision`` the last :class:`~gqc_dist.core.window.Decision`).
  DeepSpeed's ``global_steps`` counts optimizer steps, ``global_samples`` the samples that went
  into them; the lr scheduler steps once per optimizer step, and so does the
  threshold schedule of the section (``engine.gqc_session.schedule``; ``engine.gqc_session`` is
  the :class:`~gqc_dist.core.session.GQCSession` every front end drives).
* ``engine.gqc_after_part(fraction)``: a micro-batch in two parts (CBC's split probes,
  ``engine.gqc.split_next``): ``backward`` of the first part (its loss times ``fraction``),
  ``gqc_after_part``, ``backward`` of the rest (times ``1 - fraction``), ``step()``. See
  :meth:`gqc_dist.core.wrapper.GQCOptimizerWrapper.after_part`.
* ``engine.save_checkpoint(dir, ...)`` / ``engine.load_checkpoint(dir, ...)`` (DeepSpeed's own
  arguments and return values) also carry the controller: counters, algorithm state, noise-scale
  estimate, the value schedule's position and, when saved mid-window, this rank's accumulated
  gradient and DeepSpeed's count of backwards since the last step. Each rank writes its own
  ``<dir>/<tag>/gqc_state_rank<r>.pt`` (``client_state`` holds rank 0's alone, so it cannot carry
  per-rank partitions); DeepSpeed alone saves and loads the torch optimizer and the lr scheduler.
  A checkpoint without that state (plain DeepSpeed) or from another algorithm is refused on every
  rank with a :class:`~gqc_dist.errors.CheckpointError` before anything is loaded.

DeepSpeed runs with ``"managed_gradient_accumulation": false`` and ``gradient_accumulation_steps``
1 (set here when absent); the accumulated sum is rescaled to the mean of the window's
micro-batches right before DeepSpeed's ``step()``, so clipping and the optimizer see the mean.
Options that cannot work are refused before training starts, naming the key.

``"local_accumulation": true`` (ZeRO-0/1, dense models) keeps the gradients rank-local between
steps: each micro-step all-reduces a few floats and decides from a predicted norm
(``gqc_dist.core.local_mode``), and DeepSpeed's own boundary reduction runs once per step, instead of
the exact mode's full-size copy all-reduce every micro-step.
"""

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from gqc_dist.algorithms.spec import get as algorithm_spec
from gqc_dist.config import SECTION, build_controller, parse_section
from gqc_dist.core.session import GQCSession
from gqc_dist.engines.deepspeed_checkpoint import agreed, engine_state, latest_tag, read_gqc_state
from gqc_dist.engines.deepspeed_zero import DeepSpeedGradients
from gqc_dist.errors import GQCConfigError, GQCUsageError
from gqc_dist.extras import require


def load_ds_config(config) -> Dict[str, Any]:
    """A deep copy of a ds_config given as a dict or a path to a JSON file."""
    if isinstance(config, (str, Path)):
        try:
            return json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise GQCConfigError(f"cannot read DeepSpeed config {config}: {error}") from error
    if not isinstance(config, dict):
        raise GQCConfigError(f"config must be a dict or a path to ds_config.json, got {type(config).__name__}")
    return copy.deepcopy(config)


def check_ds_options(ds_config: Dict[str, Any], model=None) -> Tuple[Dict[str, Any], float]:
    """Refuse DeepSpeed options GQC cannot drive; return the config DeepSpeed should get and the
    gradient clipping GQC applies in its place.

    Sets ``managed_gradient_accumulation`` false and ``gradient_accumulation_steps`` 1 when
    absent, removes the GQC section, and moves ``gradient_clipping`` (DeepSpeed's default 1.0
    when absent) to GQC, which clips with the exact global norm.
    """
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    out = {k: v for k, v in ds_config.items() if k != SECTION}
    clip = out.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0:
        raise GQCConfigError(f"gradient_clipping must be a number >= 0, got {clip!r}")
    out["gradient_clipping"] = 0.0
    if out.get("managed_gradient_accumulation", False) is not False:
        raise GQCConfigError(
            "managed_gradient_accumulation must be false (or absent) with gradient_quality_control: "
            "GQC owns the step boundary")
    out["managed_gradient_accumulation"] = False
    steps = out.get("gradient_accumulation_steps", 1)
    if steps != 1:
        raise GQCConfigError(
            f"gradient_accumulation_steps must be 1 (or absent) with gradient_quality_control, got "
            f"{steps!r}: GQC decides per micro-batch how many to accumulate (max_draws bounds it)")
    out["gradient_accumulation_steps"] = 1
    zero = out.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if stage in (0, 1) and zero.get("overlap_comm", False):
        raise GQCConfigError(
            f"zero_optimization.overlap_comm is not supported with ZeRO stage {stage} and caller-owned "
            "accumulation (DeepSpeed's rule); set it false or use stage 2")
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key) and (zero[key].get("device", "none") if isinstance(zero[key], dict) else zero[key]) != "none":
            raise GQCConfigError(f"zero_optimization.{key} is not supported by gradient_quality_control yet")
    accumulation_dtype = (out.get("data_types", {}) or {}).get("grad_accum_dtype")
    if accumulation_dtype is not None:
        raise GQCConfigError(
            "data_types.grad_accum_dtype is not supported by gradient_quality_control yet (the "
            "accumulated gradient then lives in other buffers); remove it")
    if stage == 0 and (out.get("fp16", {}) or {}).get("enabled", False):
        raise GQCConfigError(
            "fp16 with zero_optimization.stage 0 is refused: DeepSpeed 0.19's engine.backward does not "
            "apply the fp16 loss scale for stage 0's FP16 optimizers, yet step() divides by it "
            "(measured: updates smaller by the loss scale). Use bf16, or ZeRO stage 1-3 for fp16")
    if (out.get("compile", {}) or {}).get("deepcompile", False):
        raise GQCConfigError("compile.deepcompile is not supported with caller-owned accumulation")
    if "pipeline" in out or _is_pipeline(model):
        raise GQCConfigError(
            "pipeline parallelism is not supported with gradient_quality_control (DeepSpeed refuses "
            "caller-owned accumulation with pipelines)")
    if stage == 3 and _has_native_moe(model):
        raise GQCConfigError(
            "deepspeed.moe.layer.MoE is not supported with zero_optimization.stage 3 (DeepSpeed's "
            "rule: use stage 0-2, or AutoEP for ZeRO-3 MoE)")
    return out, float(clip)


def check_local_accumulation(ds_config: Dict[str, Any], model=None) -> None:
    """Refuse ``local_accumulation`` where it cannot save anything or cannot predict: it is for
    ZeRO-0/1 (gradients stay rank-local until the step) on dense models."""
    stage = int((ds_config.get("zero_optimization", {}) or {}).get("stage", 0))
    if stage not in (0, 1):
        raise GQCConfigError(
            f"{SECTION}.local_accumulation needs zero_optimization.stage 0 or 1 (got {stage}): ZeRO-2/3 "
            "reduce-scatter every backward anyway, so there is no traffic to avoid; set it false")
    if _has_native_moe(model):
        raise GQCConfigError(
            f"{SECTION}.local_accumulation does not support deepspeed.moe.layer.MoE: experts are averaged over "
            "their expert-data-parallel group, so the dense-model noise prediction does not hold; set it false")


def _is_pipeline(model) -> bool:
    try:
        from deepspeed.pipe import PipelineModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PipelineModule)


def _has_native_moe(model) -> bool:
    try:
        from deepspeed.moe.layer import MoE
    except ImportError:  # pragma: no cover
        return False
    return model is not None and any(isinstance(m, MoE) for m in model.modules())


def _basic_optimizer(engine) -> torch.optim.Optimizer:
    candidates = [getattr(engine, "basic_optimizer", None), engine.optimizer,
                  getattr(engine.optimizer, "optimizer", None)]
    for candidate in candidates:
        if isinstance(candidate, torch.optim.Optimizer):
            return candidate
    raise GQCConfigError(f"cannot find the torch optimizer inside {type(engine.optimizer).__name__}")


def initialize(*args, config=None, config_params=None, **kwargs):
    """Same arguments and return value as ``deepspeed.initialize``; see the module docstring.

    Without a ``"gradient_quality_control"`` section this is ``deepspeed.initialize`` unchanged.
    """
    deepspeed = require("deepspeed", "deepspeed", "gqc_dist.frontends.deepspeed.initialize")

    if config is None and config_params is not None:
        config = config_params
    if config is None:
        ds_args = kwargs.get("args") or (args[0] if args else None)
        config = getattr(ds_args, "deepspeed_config", None)
    if config is None:
        return deepspeed.initialize(*args, **kwargs)
    ds_config = load_ds_config(config)
    if SECTION not in ds_config:
        return deepspeed.initialize(*args, config=ds_config, **kwargs)
    ds_config, section, clip = split_config(ds_config, kwargs.get("model"))
    engine, optimizer, loader, scheduler = deepspeed.initialize(*args, config=ds_config, **kwargs)
    attach_controller(engine, section, clip)
    return engine, optimizer, loader, scheduler


def split_config(ds_config, model=None, section=None) -> Tuple[Dict[str, Any], Dict[str, Any], float]:
    """For a framework that calls ``deepspeed.initialize`` itself (Accelerate, Lightning): the
    config DeepSpeed should get (caller-owned accumulation, GQC's section removed, clipping moved
    to GQC), the parsed GQC section (``section``, or the config's own) and the clip GQC applies.
    Pass the result's parts to DeepSpeed and then to :func:`attach_controller`. Refuses what GQC
    cannot drive with :class:`GQCConfigError`, naming the key."""
    ds_config = load_ds_config(ds_config)
    if section is None and SECTION not in ds_config:
        raise GQCConfigError(f"the DeepSpeed config has no {SECTION!r} section and none was given")
    section = parse_section(ds_config.get(SECTION) if section is None else section)
    algorithm_spec(section["algorithm"]).check_engine("deepspeed")
    out, clip = check_ds_options(ds_config, model)
    if section["local_accumulation"]:
        check_local_accumulation(out, model)
    return out, section, clip


def attach_controller(engine, section: Dict[str, Any], clip: float = 0.0) -> None:
    """Make ``engine.step()`` a GQC decision (see the module docstring) on an engine started from
    :func:`split_config`'s config; ``section`` is a ``gradient_quality_control`` section (parsed
    or not), ``clip`` the gradient clipping GQC applies with the exact norm."""
    if engine.managed_gradient_accumulation() or engine.gradient_accumulation_steps() != 1:
        raise GQCConfigError("DeepSpeed did not take managed_gradient_accumulation false and "
                             "gradient_accumulation_steps 1; GQC cannot own the step boundary")
    section = parse_section(section)
    original_step = engine.step
    original_backward = engine.backward
    lr_kwargs = {}
    adapter = DeepSpeedGradients(engine, lambda: original_step(**lr_kwargs), clip)
    micro_batch = engine.train_micro_batch_size_per_gpu()
    controller, schedule = build_controller(section, _basic_optimizer(engine), physical_batch_size=micro_batch,
                                            micro_batch_size=micro_batch * getattr(engine, "dp_world_size", 1),
                                            gradients=adapter)
    session = GQCSession(controller, schedule)
    spec = algorithm_spec(section["algorithm"])
    last_loss = {}
    backwards = {"since_step": 0}

    def backward(loss, *args, **kwargs):
        if spec.needs_loss:
            last_loss["value"] = loss.detach()
        result = original_backward(loss, *args, **kwargs)
        backwards["since_step"] += 1
        return result

    def after_part(fraction=0.5):
        if backwards["since_step"] != 1:
            raise GQCUsageError(
                f"engine.gqc_after_part() must follow exactly one engine.backward() (got {backwards['since_step']}): "
                "the first part of a split micro-batch")
        controller.after_part(fraction)
        backwards["since_step"] = 0  # the rest of the micro-batch: one more backward, then step()

    def step(lr_kwargs_=None):
        if backwards["since_step"] != 1:
            raise GQCUsageError(
                f"engine.step() must follow exactly one engine.backward() with gradient_quality_control "
                f"(got {backwards['since_step']}): GQC decides after every micro-batch")
        backwards["since_step"] = 0
        lr_kwargs.clear()
        if lr_kwargs_ is not None:
            lr_kwargs["lr_kwargs"] = lr_kwargs_
        decision = session.micro_step(last_loss.get("value"))
        engine.gqc_decision = decision
        engine.gqc_stepped = decision.stepped
        return decision.stepped

    def save_checkpoint(save_dir, tag=None, client_state={}, save_latest=True, **kwargs):
        if backwards["since_step"]:
            raise GQCUsageError(
                "engine.save_checkpoint() between engine.backward() and engine.step() with "
                "gradient_quality_control: the micro-batch is accumulated but not yet counted; save "
                "after engine.step()")
        if not save_dir:  # DeepSpeed's own refusal, before GQC writes anything
            return original_save(save_dir, tag, client_state, save_latest, **kwargs)
        tag = str(f"global_step{engine.global_steps}" if tag is None else tag)
        session.write(os.path.join(save_dir, tag), engine_state(engine))
        return original_save(save_dir, tag, client_state, save_latest, **kwargs)

    def load_checkpoint(load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        ds_args = dict(load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
                       load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                       custom_load_fn=custom_load_fn)
        resolved = tag if tag is not None else latest_tag(engine, load_dir)
        if load_module_only or resolved is None:
            # weights only (a warm start keeps this engine's controller), or no 'latest' file:
            # DeepSpeed's own answer (it warns and returns (None, None))
            return original_load(load_dir, tag, **ds_args)
        path = os.path.join(load_dir, str(resolved))
        state = agreed(lambda: read_gqc_state(path, session, adapter))
        result = original_load(load_dir, tag, **ds_args)
        if result[0] is None:
            return result
        # after DeepSpeed's own load: a torch scheduler's load_state_dict does not write its values
        # back, and DeepSpeed may not restore them (load_optimizer_states False): the session does
        session.load_state_dict(state, f"DeepSpeed checkpoint {path}")
        engine.gqc_stepped = bool(state["engine"].get("stepped", False))
        backwards["since_step"] = 0
        last_loss.clear()
        return result

    original_save = engine.save_checkpoint
    original_load = engine.load_checkpoint
    engine.backward = backward
    engine.step = step
    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint
    engine.gqc_after_part = after_part
    engine.gqc = controller
    engine.gqc_session = session
    engine.gqc_stepped = False
    engine.gqc_decision = None
