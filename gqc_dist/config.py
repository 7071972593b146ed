"""The ``"gradient_quality_control"`` config section: strict parsing and building a controller.

The same section is read from ds_config.json (DeepSpeed accepts unknown top-level keys silently,
so we must be strict) and from gqc-train configs. Every error names the full key path.

Keys (``algorithm`` decides which others are allowed)::

    {"algorithm": "gnts",            # cbc | gnts | gns | gnr | sbc | mht | fixed
     "max_draws": 16,                # not for gnr (it steps every micro-batch)
     "verify": false,                # all-gather decisions and raise on rank divergence
     "noise_beta": 0.99,              # optional: a fixed EMA per window for the noise-scale estimate
     "timeout_s": 300,               # bound on the per-micro-step collective (default: none)
     "local_accumulation": false,    # ZeRO-0/1 (or DDP no_sync, FSDP2 sync off): predicted norm
     "lr_coupling": "sqrt",          # each step's lr (and weight decay) x sqrt(window / 1): none | sqrt | linear
     "window_gradient": "sqrt",      # the optimizer steps on the window's sum / sqrt(n) (default mean)
     "threshold": 0.5,               # gnts: a constant threshold, or ...
     "schedule": {"num_training_steps": 1000, "num_warmup_steps": 100,
                  "initial_threshold": 0.95, "final_threshold": 0.25, "warmup_multiplier": 10}}

Which other keys an algorithm takes (its constant value, its schedule's keys, its options) is
said once, by its descriptor next to its wrapper class (``gqc_dist.algorithms.spec``); e.g. cbc
takes ``kappa`` (or ``initial_kappa`` / ``final_kappa``), ``min_draws``, ``probe_interval``,
``rounding``, ``probe``.

Schedules here drive only the algorithm's value (one ``schedule.step()`` per optimizer step);
the learning rate belongs to the engine's own scheduler.
"""

import copy
from typing import Any, Dict, Optional, Tuple

import torch
import torch_schedule_anything as tsa

from gqc_dist.algorithms.spec import REQUIRED, AlgorithmSpec, algorithms
from gqc_dist.core.window import RULES, WINDOW_GRADIENTS, LRCoupling
from gqc_dist.errors import GQCConfigError
from gqc_dist.schedules import hidden_initial_lr, synchronous
from gqc_dist.validation import choice, kind_of

SECTION = "gradient_quality_control"

# keys every algorithm takes: rank-divergence checks, the noise-scale estimate's smoothing
_COMMON = {"verify": ("bool", False), "noise_beta": ("beta", None), "timeout_s": ("num+", None),
           "local_accumulation": ("bool", False), "lr_coupling": (choice(RULES), "none"),
           "window_gradient": (choice(WINDOW_GRADIENTS), "mean")}
_STEPS = {"num_training_steps": ("int+", REQUIRED), "num_warmup_steps": ("int0", REQUIRED)}


def _check_value(path: str, value: Any, kind):
    return kind_of(kind).check(path, value)


def _check_keys(path: str, given: dict, allowed) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise GQCConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            + ", ".join(f"{path}.{key}" for key in unknown)
            + f"; allowed here: {', '.join(sorted(allowed))}"
        )


def _parse_keys(path: str, given: dict, keys: Dict[str, tuple]) -> Dict[str, Any]:
    """``{key: (kind, default or REQUIRED)}`` read from ``given``; defaults ``None`` stay absent."""
    out = {}
    for key, (kind, default) in keys.items():
        if key in given:
            out[key] = _check_value(f"{path}.{key}", given[key], kind)
        elif default is REQUIRED:
            raise GQCConfigError(f"{path}.{key} is required")
        elif default is not None:
            out[key] = default
    return out


def parse_section(section: Any, path: str = SECTION) -> Dict[str, Any]:
    """Validate a ``gradient_quality_control`` section and return it normalised (a new dict).

    Raises :class:`GQCConfigError` naming the key path for unknown or misspelled keys, wrong
    types, out-of-range values, and missing or conflicting value keys.
    """
    if not isinstance(section, dict):
        raise GQCConfigError(f"{path} must be an object, got {type(section).__name__}")
    known = algorithms()
    algorithm = section.get("algorithm")
    if algorithm not in known:
        raise GQCConfigError(
            f"{path}.algorithm must be one of {', '.join(sorted(known))}, got {algorithm!r}")
    spec = known[algorithm]
    schedulable = spec.schedule is not None
    _check_keys(path, section, {"algorithm", *_COMMON, *spec.options, *spec.values,
                                *(["schedule"] if schedulable else [])})
    out: Dict[str, Any] = {"algorithm": algorithm, **_parse_keys(path, section, _COMMON)}
    out.update(_parse_keys(path, section, spec.options))
    for key, (kind, _) in spec.values.items():
        if key in section:
            out[key] = _check_value(f"{path}.{key}", section[key], kind)
    if "schedule" in section:
        out["schedule"] = _parse_schedule(f"{path}.schedule", section["schedule"], spec)
    given = [key for key in spec.values if key in section]
    if spec.all_values:
        missing = [key for key in spec.values if key not in section]
        if missing:
            raise GQCConfigError(f"{path} needs {', '.join(f'{path}.{k}' for k in missing)}")
    elif given and "schedule" in section:
        raise GQCConfigError(f"{path}.{given[0]} and {path}.schedule conflict: give one of them")
    elif spec.values and not given and "schedule" not in section:
        raise GQCConfigError(
            f"{path} needs either {path}.{next(iter(spec.values))} (a constant) or {path}.schedule")
    return out


def _parse_schedule(path: str, schedule: Any, spec: AlgorithmSpec) -> Dict[str, Any]:
    if not isinstance(schedule, dict):
        raise GQCConfigError(f"{path} must be an object, got {type(schedule).__name__}")
    keys = {**_STEPS, **spec.schedule}
    _check_keys(path, schedule, keys)
    out = _parse_keys(path, schedule, keys)
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

    ``physical_batch_size``: samples per rank per micro-batch, for algorithms that count samples
    (SBC, when the section has none). ``wrapper_kwargs`` (``gradients``, ``grad_scaler``,
    ``distributed_mode``) go to the wrapper.
    """
    section = parse_section(copy.deepcopy(section))  # parsing a parsed section changes nothing
    spec = algorithms()[section["algorithm"]]
    wrapper = spec.build(optimizer, section, {"physical_batch_size": physical_batch_size},
                         verify=section["verify"], noise_beta=section.get("noise_beta"),
                         timeout_s=section.get("timeout_s"), local_accumulation=section["local_accumulation"],
                         window_gradient=section["window_gradient"],
                         **{"window_hook": _coupling(section["lr_coupling"]), **wrapper_kwargs})
    for key, (_, group_key) in spec.values.items():
        if key in section:
            for group in wrapper.param_groups:
                group[group_key] = section[key]
    schedule = None
    if "schedule" in section:
        with hidden_initial_lr(optimizer):
            schedule = synchronous(spec.make_schedules(wrapper, section["schedule"]))
    return wrapper, schedule


def _coupling(rule: str):
    """The section's ``lr_coupling`` as a window hook over the engine's own lr (``None``: none)."""
    return None if rule == "none" else LRCoupling(rule)
