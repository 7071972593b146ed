"""``gqc_dist.deepspeed.initialize``: ``deepspeed.initialize`` with GQC deciding when to step.

Add a top-level ``"gradient_quality_control"`` section to ds_config.json (see
``gqc_dist.config``) and change one import; the loop stays DeepSpeed's::

    engine, optimizer, _, scheduler = gqc_dist.deepspeed.initialize(model=model, config=cfg, ...)
    for batch in loader:                       # one micro-batch per iteration
        loss = engine(batch)
        engine.backward(loss)
        engine.step()                          # an optimizer step only when GQC decides

What the returned engine adds:

* ``engine.gqc``: the controller: ``engine.gqc.statistics()``, ``engine.gqc.vital_statistics()``,
  ``engine.gqc.num_steps`` ...
* ``engine.step()`` returns True when the optimizer stepped (``engine.gqc_stepped`` holds the
  last result). DeepSpeed's ``global_steps`` counts optimizer steps, ``global_samples`` the
  samples that went into them; the lr scheduler steps once per optimizer step, and so does the
  threshold schedule of the section (``engine.gqc_schedule``).
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
"""

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from . import checkpoint_state
from .algorithms.spec import get as algorithm_spec
from .config import SECTION, build_controller, parse_section
from .engines.deepspeed_zero import DeepSpeedGradients
from .errors import CheckpointError, GQCConfigError, GQCUsageError


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
    import deepspeed

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
    section = parse_section(ds_config[SECTION])
    algorithm_spec(section["algorithm"]).check_engine("deepspeed")
    if section["local_accumulation"]:
        raise GQCConfigError(
            f"{SECTION}.local_accumulation is not supported on DeepSpeed yet: ZeRO-2/3 reduce every "
            "micro-step anyway, and ZeRO-0/1 all-reduce a copy of the gradient for exact norms")
    ds_config, clip = check_ds_options(ds_config, kwargs.get("model"))
    engine, optimizer, loader, scheduler = deepspeed.initialize(*args, config=ds_config, **kwargs)
    if engine.managed_gradient_accumulation() or engine.gradient_accumulation_steps() != 1:
        raise GQCConfigError("DeepSpeed did not take managed_gradient_accumulation false and "
                             "gradient_accumulation_steps 1; GQC cannot own the step boundary")
    attach_controller(engine, section, clip)
    return engine, optimizer, loader, scheduler


def attach_controller(engine, section: Dict[str, Any], clip: float = 0.0) -> None:
    """Make ``engine.step()`` a GQC decision (see the module docstring); ``clip`` is the
    gradient clipping GQC applies with the exact norm."""
    original_step = engine.step
    original_backward = engine.backward
    lr_kwargs = {}
    adapter = DeepSpeedGradients(engine, lambda: original_step(**lr_kwargs), clip)
    micro_batch = engine.train_micro_batch_size_per_gpu()
    controller, schedule = build_controller(section, _basic_optimizer(engine), physical_batch_size=micro_batch,
                                            micro_batch_size=micro_batch * getattr(engine, "dp_world_size", 1),
                                            gradients=adapter)
    spec = algorithm_spec(section["algorithm"])
    last_loss = {}
    backwards = {"since_step": 0}

    def backward(loss, *args, **kwargs):
        if spec.needs_loss:
            last_loss["value"] = loss.detach()
        result = original_backward(loss, *args, **kwargs)
        backwards["since_step"] += 1
        return result

    def step(lr_kwargs_=None):
        if backwards["since_step"] != 1:
            raise GQCUsageError(
                f"engine.step() must follow exactly one engine.backward() with gradient_quality_control "
                f"(got {backwards['since_step']}): GQC decides after every micro-batch")
        backwards["since_step"] = 0
        lr_kwargs.clear()
        if lr_kwargs_ is not None:
            lr_kwargs["lr_kwargs"] = lr_kwargs_
        stepped = spec.step(controller, last_loss.get("value"))
        if stepped and engine.gqc_schedule is not None:
            engine.gqc_schedule.step()  # looked up here: a caller may re-key it (gqc-train's token budget)
        engine.gqc_stepped = stepped
        return stepped

    def save_checkpoint(save_dir, tag=None, client_state={}, save_latest=True, **kwargs):
        if backwards["since_step"]:
            raise GQCUsageError(
                "engine.save_checkpoint() between engine.backward() and engine.step() with "
                "gradient_quality_control: the micro-batch is accumulated but not yet counted; save "
                "after engine.step()")
        if not save_dir:  # DeepSpeed's own refusal, before GQC writes anything
            return original_save(save_dir, tag, client_state, save_latest, **kwargs)
        tag = str(f"global_step{engine.global_steps}" if tag is None else tag)
        _write_gqc_state(os.path.join(save_dir, tag), _gqc_state(engine, controller))
        return original_save(save_dir, tag, client_state, save_latest, **kwargs)

    def load_checkpoint(load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        ds_args = dict(load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
                       load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                       custom_load_fn=custom_load_fn)
        resolved = tag if tag is not None else _latest_tag(engine, load_dir)
        if load_module_only or resolved is None:
            # weights only (a warm start keeps this engine's controller), or no 'latest' file:
            # DeepSpeed's own answer (it warns and returns (None, None))
            return original_load(load_dir, tag, **ds_args)
        path = os.path.join(load_dir, str(resolved))
        state = _agreed(lambda: _read_gqc_state(path, engine, controller, adapter))
        result = original_load(load_dir, tag, **ds_args)
        if result[0] is None:
            return result
        _restore_gqc_state(engine, controller, state)
        backwards["since_step"] = 0
        last_loss.clear()
        return result

    original_save = engine.save_checkpoint
    original_load = engine.load_checkpoint
    engine.backward = backward
    engine.step = step
    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint
    engine.gqc = controller
    engine.gqc_schedule = schedule
    engine.gqc_stepped = False


# ---------------------------------------------------------------------- checkpoints
#: format of the per-rank GQC file next to DeepSpeed's checkpoint files
STATE_FORMAT = "gqc_dist.deepspeed/1"


def state_file(checkpoint_dir: str, rank: int) -> str:
    """This rank's GQC state file inside DeepSpeed's ``<save_dir>/<tag>`` directory."""
    return os.path.join(checkpoint_dir, f"gqc_state_rank{rank}.pt")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def _optimizer_left_to_deepspeed(controller):
    """The wrapper's ``state_dict``/``load_state_dict`` without the torch optimizer, which
    DeepSpeed saves and loads itself (per rank, with its own partitioning): the optimizer's
    ``state_dict`` is an empty one and its ``load_state_dict`` does nothing for the duration.

    Without this, the wrapper would save the flat partitions' state (ZeRO-3: it raises, the
    optimizer's state holds sub-group tensors its param_groups lack) and load it over what
    DeepSpeed restored."""
    optimizer = controller.optimizer
    instance = vars(optimizer)
    saved = {name: instance[name] for name in ("state_dict", "load_state_dict") if name in instance}
    optimizer.state_dict = lambda: {"state": {}, "param_groups": []}
    optimizer.load_state_dict = lambda state_dict: None
    try:
        yield
    finally:
        for name in ("state_dict", "load_state_dict"):
            instance.pop(name, None)
        instance.update(saved)


def _schedulable_values(controller):
    return [{key: group[key] for key in controller.SCHEDULABLE if key in group}
            for group in controller.param_groups]


def _gqc_state(engine, controller) -> Dict[str, Any]:
    with _optimizer_left_to_deepspeed(controller):
        wrapper = controller.state_dict()
    wrapper["optimizer"] = None  # DeepSpeed's
    schedule = engine.gqc_schedule
    return {
        "format": STATE_FORMAT,
        "algorithm": controller.ALGORITHM,
        "rank": _rank(),
        "world_size": _world(),
        "zero_stage": int(engine.zero_optimization_stage()),
        "wrapper": wrapper,
        "schedule": None if schedule is None else copy.deepcopy(schedule.state_dict()),
        "values": _schedulable_values(controller),
        "stepped": bool(engine.gqc_stepped),
    }


def _write_gqc_state(checkpoint_dir: str, state: Dict[str, Any]) -> None:
    os.makedirs(checkpoint_dir, exist_ok=True)
    path = state_file(checkpoint_dir, state["rank"])
    partial = path + ".partial"
    torch.save(state, partial)
    os.replace(partial, path)  # a reader never sees half a file


def _latest_tag(engine, load_dir) -> Optional[str]:
    """DeepSpeed's rule for ``tag=None``: the tag in ``latest`` (``latest_universal``)."""
    name = "latest_universal" if engine.load_universal_checkpoint() else "latest"
    try:
        with open(os.path.join(load_dir, name)) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _agreed(read):
    """``read()`` on every rank; if any rank raises a :class:`CheckpointError`, every rank raises
    one naming that rank's problem (a lone refusal would leave the others waiting in DeepSpeed's
    collective load)."""
    state, error = None, None
    try:
        state = read()
    except CheckpointError as caught:
        error = str(caught)
    if _world() > 1:
        errors = [None] * _world()
        dist.all_gather_object(errors, error)
        failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
        if failed and error is None:
            rank, message = failed[0]
            raise CheckpointError(f"rank {rank} refused the checkpoint: {message}")
    if error is not None:
        raise CheckpointError(error)
    return state


def _read_gqc_state(checkpoint_dir, engine, controller, adapter) -> Dict[str, Any]:
    """This rank's GQC state of the checkpoint in ``checkpoint_dir``, checked against this engine;
    changes nothing."""
    path = state_file(checkpoint_dir, _rank())
    if not os.path.isfile(path):
        others = sorted(name for name in os.listdir(checkpoint_dir)
                        if name.startswith("gqc_state_rank")) if os.path.isdir(checkpoint_dir) else []
        if not os.path.isdir(checkpoint_dir):
            why = "the directory does not exist"
        elif others:
            why = f"it has {len(others)} GQC state files, saved by another number of ranks"
        else:
            why = ("it has no gradient_quality_control state: saved by plain DeepSpeed (or by "
                   "deepspeed.initialize without a gradient_quality_control section)")
        raise CheckpointError(f"cannot resume GQC from DeepSpeed checkpoint {checkpoint_dir}: no {os.path.basename(path)}, "
                              f"{why}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"cannot read GQC state {path}: {error}") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not GQC DeepSpeed state (format {found!r}, expected {STATE_FORMAT!r})")
    if state.get("algorithm") != controller.ALGORITHM:
        raise CheckpointError(
            f"DeepSpeed checkpoint {checkpoint_dir} was saved by GQC algorithm {state.get('algorithm')!r}; "
            f"this engine runs {controller.ALGORITHM!r}")
    wrapper = state.get("wrapper")
    if not isinstance(wrapper, dict):
        raise CheckpointError(f"{path} has no wrapper state")
    mid_window = bool((wrapper.get("counters") or {}).get("num_draws"))
    if mid_window and state.get("world_size") != _world():
        raise CheckpointError(
            f"DeepSpeed checkpoint {checkpoint_dir} was saved mid-window by {state.get('world_size')} ranks; "
            f"its accumulated gradient partitions cannot be resumed on {_world()}")
    saved_schedule, schedule = state.get("schedule"), engine.gqc_schedule
    if (saved_schedule is None) != (schedule is None):
        raise CheckpointError(
            f"DeepSpeed checkpoint {checkpoint_dir} was saved {'without' if saved_schedule is None else 'with'} "
            f"a gradient_quality_control.schedule; this engine runs {'with' if schedule is not None else 'without'} one")
    if schedule is not None and (not isinstance(saved_schedule, dict)
                                 or set(saved_schedule) != set(schedule.schedules)):
        raise CheckpointError(f"DeepSpeed checkpoint {checkpoint_dir} schedules "
                              f"{sorted(saved_schedule) if isinstance(saved_schedule, dict) else saved_schedule}, "
                              f"this engine's schedule {sorted(schedule.schedules)}")
    values = state.get("values")
    if not isinstance(values, list) or len(values) != len(controller.param_groups):
        raise CheckpointError(f"{path} holds values for {len(values) if isinstance(values, list) else 'no'} "
                              f"param groups, this optimizer has {len(controller.param_groups)}")
    wrapper = {**wrapper, "optimizer": {"state": {}, "param_groups": []}}
    state = {**state, "wrapper": wrapper}
    checkpoint_state.validate(wrapper, controller.ALGORITHM, controller.max_draws, adapter.check_accumulated)
    return state


def _restore_gqc_state(engine, controller, state) -> None:
    """After DeepSpeed loaded its own state: the controller, its schedule and values."""
    with _optimizer_left_to_deepspeed(controller):
        controller.load_state_dict(state["wrapper"])
    if engine.gqc_schedule is not None:
        engine.gqc_schedule.load_state_dict(state["schedule"])
        # a torch scheduler's load_state_dict does not write its value back into the param
        # groups, and DeepSpeed may not restore them (elastic checkpoints, load_optimizer_states
        # False): the schedule's position is the values it last wrote
        for group, values in zip(controller.param_groups, state["values"]):
            group.update(values)
    engine.gqc_stepped = bool(state["stepped"])
