"""gqc-train configuration: the embedded default, strict validation, files and overrides.

A config is plain JSON data. Every key is checked against :data:`SCHEMA`; a misspelled key, a
wrong type or an out-of-range value raises :class:`gqc_dist.GQCConfigError` naming the key path
(``train.optimizer_steps``). The ``gqc`` block is the ``gradient_quality_control`` section of
``gqc_dist.config`` (algorithm ``fixed`` is the fixed-accumulation baseline).

Units: ``data.micro_batch_size`` is the GLOBAL number of sequences per micro-step (split evenly
over ranks, so 1 and N ranks see the same data); ``model.seq_len`` is in tokens (bytes);
``train.*_interval`` count optimizer steps. ``train.tokens`` is a token budget (global tokens
consumed, micro-batches not stepped included): when set, the run ends there and the learning
rate and the controller's schedule advance with tokens (``gqc_dist.train.progress``);
``optimizer_steps`` and ``max_micro_steps`` remain caps. ``train.max_nonfinite_windows`` ends a
diverged run: that many windows in a row, or of the last twice as many, dropped for a non-finite
gradient or stepped with a non-finite loss (``gqc_dist.train.health``).
"""

import copy
import json
from pathlib import Path
from typing import Any, Dict

from gqc_dist.algorithms.spec import ENGINE_NAMES, get as algorithm_spec
from gqc_dist.config import parse_section
from gqc_dist.errors import GQCConfigError
from gqc_dist.core.window import RULES, SEESAW
from gqc_dist.train.device import DEVICES, PRECISIONS
from gqc_dist.validation import Kind, choice, integer, number, optional

ENGINES = tuple(ENGINE_NAMES)  # the algorithms' engine list is the one list

DEFAULT_CONFIG: Dict[str, Any] = {
    "engine": "single",
    "device": "auto",
    "precision": "fp32",
    "out_dir": "runs/gqc-train",
    "seed": 0,
    "model": {"seq_len": 128, "dim": 128, "layers": 3, "heads": 4, "mlp_ratio": 4,
              "num_experts": 0, "ep_size": 1},
    "data": {"path": None, "max_bytes": 4_000_000, "micro_batch_size": 16},
    # lr: the peak for a window of one micro-batch; lr_coupling scales it (and weight decay) with
    # the window each step takes (gqc_dist.core.window.LRCoupling), fixed accumulation included
    "optimizer": {"lr": 3e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
                  "warmup_steps": 20, "warmup_fraction": 0.067, "grad_clip": 1.0,
                  "lr_coupling": "sqrt", "seesaw": False},
    # measured against tuned fixed accumulation by benchmarks/efficiency.py (benchmarks/README.md);
    # window_gradient sqrt: under Adam, CBC's varying windows otherwise step too short when long;
    # rounding dither: the windows average kappa * B_simple instead of overshooting it;
    # probe split: a probe window is one micro-batch taken in two halves, not two micro-batches
    "gqc": {"algorithm": "cbc", "kappa": 0.25, "max_draws": 16, "window_gradient": "sqrt", "rounding": "dither",
            "probe": "split"},
    "train": {"tokens": 3_072_000, "optimizer_steps": 100_000, "max_micro_steps": 100_000, "eval_interval": 50,
              "eval_batches": 8, "final_eval_batches": 64, "checkpoint_interval": 100,
              "collective_timeout_s": 300, "peak_tflops": None, "max_nonfinite_windows": 25},
    "deepspeed": {"zero_optimization": {"stage": 2}},
}

# leaves are gqc_dist.validation kinds: the words a bad value gets are the wrappers' and the
# ds_config section's
_INT_POS, _INT_NONNEG = integer(1), integer(0)
_NUM_POS, _NUM_NONNEG = number(0, low_open=True), number(0)
_BETA = number(0, 1, high_open=True)

SCHEMA = {
    "engine": choice(ENGINES),
    "device": choice(DEVICES),
    "precision": choice(PRECISIONS),
    "out_dir": Kind("a non-empty path", lambda v: isinstance(v, str) and bool(v)),
    "seed": _INT_NONNEG,
    "model": {"seq_len": _INT_POS, "dim": _INT_POS, "layers": _INT_POS, "heads": _INT_POS,
              "mlp_ratio": _INT_POS, "num_experts": _INT_NONNEG, "ep_size": _INT_POS},
    "data": {"path": Kind("a path or null", lambda v: v is None or isinstance(v, str)),
             "max_bytes": _INT_POS, "micro_batch_size": _INT_POS},
    "optimizer": {"lr": _NUM_POS, "weight_decay": _NUM_NONNEG, "beta1": _BETA, "beta2": _BETA,
                  "warmup_steps": _INT_NONNEG, "warmup_fraction": _BETA, "grad_clip": _NUM_NONNEG,
                  "lr_coupling": choice(RULES),
                  "seesaw": Kind('true, false or "noise"', lambda v: isinstance(v, (bool, str)) and v in SEESAW)},
    "gqc": None,  # checked by gqc_dist.config.parse_section
    "train": {"tokens": optional(_INT_POS), "optimizer_steps": _INT_POS, "max_micro_steps": _INT_POS, "eval_interval": _INT_POS,
              "eval_batches": _INT_POS, "final_eval_batches": _INT_POS, "checkpoint_interval": _INT_POS, "collective_timeout_s": _NUM_POS,
              "peak_tflops": optional(_NUM_POS),
              "max_nonfinite_windows": _INT_POS},
    "deepspeed": "any-object",  # a ds_config fragment, checked by gqc_dist.frontends.deepspeed
}


def _validate(value, schema, path):
    if schema is None:
        return parse_section(value, path)
    if schema == "any-object":
        if not isinstance(value, dict):
            raise GQCConfigError(f"{path} must be an object, got {type(value).__name__}")
        return value
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise GQCConfigError(f"{path or 'config'} must be an object, got {type(value).__name__}")
        unknown = sorted(set(value) - set(schema))
        if unknown:
            where = f"{path}." if path else ""
            raise GQCConfigError(f"unknown key {where}{unknown[0]}; allowed: {', '.join(schema)}")
        return {key: _validate(value[key], sub, f"{path}.{key}" if path else key)
                for key, sub in schema.items() if key in value}
    return schema.check(path, value)


def merge(base: Dict[str, Any], override: Dict[str, Any], replaced=("gqc", "deepspeed")) -> Dict[str, Any]:
    """``base`` updated recursively with ``override`` (a new dict). Top-level keys in ``replaced``
    (by default the ``gqc`` and ``deepspeed`` blocks) are replaced whole, so that stale keys of
    another algorithm cannot leak."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in replaced:
            out[key] = merge(out[key], value, replaced=())
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(config: Dict[str, Any]) -> Dict[str, Any]:
    """The full, checked config (defaults filled in); raises GQCConfigError naming the key."""
    full = merge(DEFAULT_CONFIG, config)
    checked = _validate(full, SCHEMA, "")
    model = checked["model"]
    if model["dim"] % model["heads"]:
        raise GQCConfigError(f"model.dim ({model['dim']}) must be a multiple of model.heads ({model['heads']})")
    if model["ep_size"] > 1 and checked["engine"] in ("single", "ddp", "deepspeed"):
        raise GQCConfigError(
            f"model.ep_size > 1 needs engine fsdp2 (got {checked['engine']}): experts are split "
            "over an expert-parallel group there")
    if model["num_experts"] and checked["engine"] == "deepspeed":
        raise GQCConfigError("model.num_experts > 0 is not supported with engine deepspeed in gqc-train "
                             "(use fsdp2, or deepspeed.moe with gqc_dist.frontends.deepspeed.initialize)")
    if model["num_experts"] % model["ep_size"]:
        raise GQCConfigError("model.num_experts must be a multiple of model.ep_size")
    algorithm_spec(checked["gqc"]["algorithm"]).check_engine(checked["engine"], "gqc.algorithm")
    if checked["gqc"]["lr_coupling"] != "none":
        raise GQCConfigError("gqc.lr_coupling is set by optimizer.lr_coupling in gqc-train (its learning-rate "
                             "schedule and the coupling are one window hook); remove gqc.lr_coupling")
    if checked["gqc"]["local_accumulation"]:
        stage = (checked["deepspeed"].get("zero_optimization") or {}).get("stage", 0)
        refused = {"single": "engine single",
                   "fsdp2": "engine fsdp2 with model.num_experts > 0" if model["num_experts"] else None,
                   "deepspeed": None if stage in (0, 1) else f"engine deepspeed with zero_optimization.stage {stage}",
                   }.get(checked["engine"])
        if refused:
            raise GQCConfigError(f"gqc.local_accumulation needs engine ddp, fsdp2 (dense) or deepspeed with ZeRO "
                                 f"stage 0 or 1 (got {refused}): only there do gradients stay rank-local between steps")
    for key in ("optimizer", "scheduler", "gradient_quality_control", "train_micro_batch_size_per_gpu",
                "train_batch_size", "gradient_accumulation_steps", "gradient_clipping"):
        if key in checked["deepspeed"]:
            raise GQCConfigError(f"deepspeed.{key} is set by gqc-train from its own config; remove it")
    return checked


def load_config(path) -> Dict[str, Any]:
    """Read a JSON config file (a partial config: missing keys take the defaults)."""
    try:
        config = json.loads(Path(path).read_text())
    except OSError as error:
        raise GQCConfigError(f"cannot read config {path}: {error}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GQCConfigError(f"config {path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise GQCConfigError(f"config {path} must hold a JSON object, got a {type(config).__name__}")
    return config


def apply_override(config: Dict[str, Any], assignment: str) -> Dict[str, Any]:
    """Apply ``key.path=value`` (value parsed as JSON, else taken as a string)."""
    if "=" not in assignment:
        raise GQCConfigError(f"--set expects key.path=value, got {assignment!r}")
    path, raw = assignment.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    keys = path.split(".")
    override: Dict[str, Any] = {}
    node = override
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    if keys[0] in ("gqc", "deepspeed") and len(keys) > 1:  # edit inside, not replace, these blocks
        inner = merge(config.get(keys[0], DEFAULT_CONFIG[keys[0]]), override[keys[0]], replaced=())
        return {**config, keys[0]: inner}
    return merge(config, override)
