"""The ``"gradient_quality_control"`` config section: strict parsing and building a controller.

The same section is read from ds_config.json (DeepSpeed accepts unknown top-level keys silently,
so we must be strict) and from gqc-train configs. Every error names the full key path.

Keys (``algorithm`` decides which others are allowed)::

    {"algorithm": "gnts",            # gnts | gns | gnr | sbc | mht
     "max_draws": 16,                # not for gnr (it steps every micro-batch)
     "verify": false,                # all-gather decisions and raise on rank divergence
     "threshold": 0.5,               # gnts: a constant threshold, or ...
     "schedule": {"num_training_steps": 1000, "num_warmup_steps": 100,
                  "initial_threshold": 0.95, "final_threshold": 0.25, "warmup_multiplier": 10}}

Per algorithm, the constant key and the schedule's value keys are:

* gnts: ``threshold``; ``initial_threshold``, ``final_threshold``, ``warmup_multiplier``
* gns: ``tolerance``; ``initial_tolerance``, ``final_tolerance``, ``warmup_multiplier``
* gnr: ``target_norm``; ``initial_norm``, ``final_norm``
* sbc: ``logical_batch_size`` (+ optional ``physical_batch_size``); ``initial_batch_size``,
  ``final_batch_size``, ``polynomial_power``
* mht: ``confidence_level`` and ``percent_error_threshold`` (+ optional ``update_beta``); a
  schedule warms both up over ``num_warmup_steps``
* fixed: ``accumulation_steps`` (the fixed-accumulation baseline; no schedule)

Schedules here drive only the algorithm's value (one ``schedule.step()`` per optimizer step);
the learning rate belongs to the engine's own scheduler.
"""

import copy
import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch_schedule_anything as tsa

from .algorithms.fixed import OptimizerWrapperFixed
from .algorithms.gnr import OptimizerWrapperGNR
from .algorithms.gns import OptimizerWrapperGNS
from .algorithms.gnts import OptimizerWrapperGNTS
from .algorithms.mht import OptimizerWrapperMHT
from .algorithms.sbc import OptimizerWrapperSBC
from .errors import GQCConfigError
from .schedules import hidden_initial_lr, synchronous

SECTION = "gradient_quality_control"

_STEPS = {"num_training_steps": "int+", "num_warmup_steps": "int0"}

# algorithm -> (constant keys, schedule keys, extra keys, schedulable param-group key)
_ALGORITHMS = {
    "gnts": ({"threshold": "num0"},
             {"initial_threshold": "num0", "final_threshold": "num0", "warmup_multiplier": "num+"},
             {"max_draws": "int+"}, "gradient_norm_threshold"),
    "gns": ({"tolerance": "num0"},
            {"initial_tolerance": "num0", "final_tolerance": "num0", "warmup_multiplier": "num+"},
            {"max_draws": "int+"}, "noise_tolerance"),
    "gnr": ({"target_norm": "num+"}, {"initial_norm": "num+", "final_norm": "num+"}, {},
            "target_gradient_norm"),
    "sbc": ({"logical_batch_size": "num+"},
            {"initial_batch_size": "num+", "final_batch_size": "num+", "polynomial_power": "num+"},
            {"max_draws": "int+", "physical_batch_size": "int+"}, "logical_batch_size"),
    "mht": ({"confidence_level": "prob", "percent_error_threshold": "num0"}, {},
            {"max_draws": "int+", "update_beta": "prob+"}, None),
    "fixed": ({"accumulation_steps": "int+"}, {}, {}, None),
}
_DEFAULTS = {"warmup_multiplier": 10.0, "polynomial_power": 2.0, "update_beta": 0.01}


def _check_value(path: str, value: Any, kind: str):
    is_bool = isinstance(value, bool)
    if kind.startswith("int"):
        if is_bool or not isinstance(value, int):
            raise GQCConfigError(f"{path} must be an integer, got {type(value).__name__} {value!r}")
        if value < (1 if kind == "int+" else 0):
            raise GQCConfigError(f"{path} must be {'>= 1' if kind == 'int+' else '>= 0'}, got {value}")
        return value
    if kind == "bool":
        if not is_bool:
            raise GQCConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if is_bool or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GQCConfigError(f"{path} must be a finite number, got {value!r}")
    bad = {"num0": value < 0, "num+": value <= 0, "prob": not 0 < value <= 1,
           "prob+": not 0 < value <= 1}[kind]
    if bad:
        wanted = {"num0": ">= 0", "num+": "> 0", "prob": "in (0, 1]", "prob+": "in (0, 1]"}[kind]
        raise GQCConfigError(f"{path} must be {wanted}, got {value!r}")
    return float(value)


def _check_keys(path: str, given: dict, allowed) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise GQCConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            + ", ".join(f"{path}.{key}" for key in unknown)
            + f"; allowed here: {', '.join(sorted(allowed))}"
        )


def parse_section(section: Any, path: str = SECTION) -> Dict[str, Any]:
    """Validate a ``gradient_quality_control`` section and return it normalised (a new dict).

    Raises :class:`GQCConfigError` naming the key path for unknown or misspelled keys, wrong
    types, out-of-range values, and missing or conflicting value keys.
    """
    if not isinstance(section, dict):
        raise GQCConfigError(f"{path} must be an object, got {type(section).__name__}")
    algorithm = section.get("algorithm")
    if algorithm not in _ALGORITHMS:
        raise GQCConfigError(
            f"{path}.algorithm must be one of {', '.join(sorted(_ALGORITHMS))}, got {algorithm!r}")
    constants, schedule_keys, extras, _ = _ALGORITHMS[algorithm]
    allowed = {"algorithm", "verify", "schedule", *constants, *extras}
    _check_keys(path, section, allowed)
    out: Dict[str, Any] = {"algorithm": algorithm, "verify": False}
    if "verify" in section:
        out["verify"] = _check_value(f"{path}.verify", section["verify"], "bool")
    for key, kind in extras.items():
        if key in section:
            out[key] = _check_value(f"{path}.{key}", section[key], kind)
    if "max_draws" in extras:
        out.setdefault("max_draws", 64)
    if algorithm == "mht":
        out.setdefault("update_beta", _DEFAULTS["update_beta"])
    for key, kind in constants.items():
        if key in section:
            out[key] = _check_value(f"{path}.{key}", section[key], kind)
    if "schedule" in section:
        out["schedule"] = _parse_schedule(f"{path}.schedule", section["schedule"], algorithm, schedule_keys)
    given = [key for key in constants if key in section]
    if algorithm == "fixed" and "schedule" in section:
        raise GQCConfigError(f"{path}.schedule is not used by algorithm 'fixed'")
    if algorithm == "mht":
        if len(given) != len(constants):
            missing = [k for k in constants if k not in section]
            raise GQCConfigError(f"{path} needs {', '.join(f'{path}.{k}' for k in missing)}")
    elif given and "schedule" in section:
        raise GQCConfigError(f"{path}.{given[0]} and {path}.schedule conflict: give one of them")
    elif not given and "schedule" not in section:
        raise GQCConfigError(
            f"{path} needs either {path}.{next(iter(constants))} (a constant) or {path}.schedule")
    return out


def _parse_schedule(path, schedule, algorithm, value_keys) -> Dict[str, Any]:
    if not isinstance(schedule, dict):
        raise GQCConfigError(f"{path} must be an object, got {type(schedule).__name__}")
    optional = {"warmup_multiplier", "polynomial_power"}
    _check_keys(path, schedule, {**_STEPS, **value_keys})
    out = {}
    for key, kind in {**_STEPS, **value_keys}.items():
        if key in schedule:
            out[key] = _check_value(f"{path}.{key}", schedule[key], kind)
        elif key in optional:
            out[key] = _DEFAULTS[key]
        else:
            raise GQCConfigError(f"{path}.{key} is required")
    if out["num_warmup_steps"] >= out["num_training_steps"]:
        raise GQCConfigError(
            f"{path}.num_warmup_steps ({out['num_warmup_steps']}) must be smaller than "
            f"{path}.num_training_steps ({out['num_training_steps']})")
    return out


def build_controller(
    section: Dict[str, Any],
    optimizer: torch.optim.Optimizer,
    *,
    physical_batch_size: Optional[int] = None,
    **wrapper_kwargs,
) -> Tuple[Any, Optional[tsa.SynchronousSchedule]]:
    """The wrapper (and value schedule, or ``None``) a parsed section describes.

    ``physical_batch_size``: samples per rank per micro-batch, used by SBC when the section has
    none. ``wrapper_kwargs`` (``gradients``, ``grad_scaler``, ``distributed_mode``) go to the
    wrapper.
    """
    section = copy.deepcopy(section)
    algorithm = section["algorithm"]
    common = dict(verify=section["verify"], **wrapper_kwargs)
    if algorithm == "gnts":
        wrapper = OptimizerWrapperGNTS(optimizer, section["max_draws"], **common)
    elif algorithm == "gns":
        wrapper = OptimizerWrapperGNS(optimizer, section["max_draws"], **common)
    elif algorithm == "gnr":
        wrapper = OptimizerWrapperGNR(optimizer, **common)
    elif algorithm == "fixed":
        wrapper = OptimizerWrapperFixed(optimizer, section["accumulation_steps"], **common)
    elif algorithm == "sbc":
        batch = section.get("physical_batch_size", physical_batch_size)
        if batch is None:
            raise GQCConfigError(f"{SECTION}.physical_batch_size is required for sbc")
        wrapper = OptimizerWrapperSBC(optimizer, batch, section["max_draws"], **common)
    else:
        wrapper = OptimizerWrapperMHT(optimizer, section["max_draws"],
                                      update_beta=section["update_beta"], **common)
    constants, _, _, target = _ALGORITHMS[algorithm]
    for key in constants if algorithm != "fixed" else ():
        if key in section:
            name = target or key
            for group in wrapper.param_groups:
                group[name] = section[key]
    schedule = None
    if "schedule" in section:
        with hidden_initial_lr(optimizer):
            schedule = synchronous([_value_schedule(wrapper, algorithm, target, section["schedule"])]
                                   if algorithm != "mht" else _mht_schedules(wrapper, section))
    return wrapper, schedule


def _value_schedule(wrapper, algorithm, target, s):
    steps = (s["num_warmup_steps"], s["num_training_steps"])
    if algorithm in ("gnts", "gns"):
        initial, final = ("initial_threshold", "final_threshold") if algorithm == "gnts" else (
            "initial_tolerance", "final_tolerance")
        return tsa.cosine_annealing_with_inverse_warmup(
            wrapper, s[initial], s[final], *steps, warmup_multiplier=s["warmup_multiplier"],
            schedule_target=target)
    if algorithm == "gnr":
        return tsa.cosine_annealing_with_warmup(wrapper, s["initial_norm"], s["final_norm"], *steps,
                                                schedule_target=target)
    return tsa.polynomial_schedule_with_warmup(
        wrapper, s["initial_batch_size"], s["final_batch_size"], *steps,
        polynomial_exponent=s["polynomial_power"], schedule_target=target)


def _mht_schedules(wrapper, section):
    steps = (section["schedule"]["num_warmup_steps"], section["schedule"]["num_training_steps"])
    return [tsa.cosine_annealing_with_warmup(wrapper, 1.0, 1.0, *steps, schedule_target=name)
            for name in ("confidence_level", "percent_error_threshold")]
