"""A sweep's spec file: what to run, checked strictly before anything runs.

A spec is JSON (paths in it are relative to the spec file's folder)::

    {
      "results": "results",                         # one small JSON per run (kept)
      "runs": "runs",                               # the run directories (large; not needed to report)
      "base": {"config": "my_job.json",             # a gqc-train config: corpus, model, tokens, engine
               "set": {"data.path": "/data/corpus.txt", "train.tokens": 100000000}},
      "base_lr": 0.003,                             # default: the base config's optimizer.lr
      "arms": [
        {"fixed": [1, 2, 4], "lr": [0.5, 1, 2]},    # fixed k x learning-rate multipliers
        {"fixed": 1.5, "lr": [1]},                  # a fractional pattern (1,2,1,2,...)
        {"name": "default", "gqc": null, "lr": "k1"}  # a controller (null: the config's own gqc)
      ],
      "seeds": [0, 1, 2],
      "twins": ["fixed1@1"],                        # the noise floor: these arms with lr x (1 + 1e-6)
      "judge": "default"                            # the controller the verdicts are about
    }

Learning rates: a fixed arm of ``k`` at multiplier ``m`` runs at ``base_lr * m`` under
``optimizer.lr_coupling`` ``sqrt`` (so its step's rate is ``base_lr * m * sqrt(k)``), the
coupling rule every k is tuned under; a controller's ``lr`` is a multiplier too, or ``"k1"``:
the multiplier of fixed k = 1's best arm in this sweep's own results (the tuning budget a user
spends on their micro-batch), resolved when the run starts, after fixed k = 1's seed-0 runs.

Other keys: ``nproc`` (ranks per run, launched with torchrun; default 1), ``command`` (a
template for the user's own training script instead of gqc-train, see
:mod:`gqc_dist.sweep.runs`), ``k1_lr`` (pin the multiplier ``"k1"`` stands for), ``about``
(one line for the report), ``slurm`` (``{"sbatch": [extra sbatch arguments]}``), ``name``.
Any arm may carry ``seeds`` (its own list), ``set`` (more config overrides) and ``name``.

Every mistake is one :class:`gqc_dist.GQCConfigError` line naming the key path.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from gqc_dist.errors import GQCConfigError

TWIN_NUDGE = 1e-6  # a twin's learning rate: its arm's times (1 + this), no systematic effect
_TOP = {"name", "about", "results", "runs", "base", "base_lr", "arms", "seeds", "twins", "judge", "nproc",
        "command", "k1_lr", "slurm"}
_BASE = {"config", "set"}
_FIXED_ARM = {"fixed", "lr", "seeds", "set", "name"}
_CONTROLLER_ARM = {"name", "gqc", "lr", "seeds", "set"}
_SLURM = {"sbatch"}


@dataclass(frozen=True)
class Arm:
    """One arm: ``kind`` is ``fixed`` (``k`` micro-batches per step, possibly fractional),
    ``controller`` (a ``gqc`` section; ``None``: the base config's) or ``twin`` (``of`` another
    arm, its rate nudged). ``lr`` is a multiplier of the spec's ``base_lr``, or ``"k1"``."""

    name: str
    kind: str
    lr: Union[float, str]
    seeds: Tuple[int, ...]
    k: Optional[float] = None
    gqc: Optional[dict] = None
    overrides: Tuple[Tuple[str, Any], ...] = ()
    of: Optional[str] = None

    @property
    def needs_k1(self) -> bool:
        return self.lr == "k1"


@dataclass
class Spec:
    """A checked sweep spec: folders resolved, arms expanded (twins included), in spec order."""

    path: Optional[Path]
    name: str
    about: str
    results: Path
    runs: Path
    base_config: Optional[Path]
    base_set: List[Tuple[str, Any]]
    base_lr: float
    arms: Dict[str, Arm]
    judge: Optional[str]
    nproc: int = 1
    command: Optional[List[str]] = None
    k1_lr: Optional[float] = None
    sbatch: List[str] = field(default_factory=list)

    def runs_planned(self) -> List[Tuple[str, int]]:
        """Every ``(arm, seed)`` of the sweep, arm by arm in spec order."""
        return [(arm.name, seed) for arm in self.arms.values() for seed in arm.seeds]


def _fail(path: str, message: str):
    raise GQCConfigError(f"sweep spec: {path}: {message}")


def _unknown(where: str, given: dict, allowed: set) -> None:
    for key in given:
        if key not in allowed:
            _fail(f"{where}{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _number(path: str, value, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        _fail(path, f"expected a {'positive ' if positive else ''}number, got {value!r}")
    return value


def _list_of(path: str, value, check) -> list:
    items = value if isinstance(value, list) else [value]
    if not items:
        _fail(path, "expected at least one value")
    return [check(f"{path}[{i}]", item) for i, item in enumerate(items)]


def _seed(path: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(path, f"expected a seed (an integer >= 0), got {value!r}")
    return value


def _seeds(path: str, value) -> Tuple[int, ...]:
    seeds = _list_of(path, value, _seed)
    if len(set(seeds)) != len(seeds):
        _fail(path, f"a seed is listed twice: {seeds}")
    return tuple(seeds)


def _overrides(path: str, value) -> List[Tuple[str, Any]]:
    """``{"a.b": value}`` or ``["a.b=json", ...]`` as ``(key path, value)`` pairs."""
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        pairs = []
        for item in value:
            key, text = item.split("=", 1)
            try:
                pairs.append((key, json.loads(text)))
            except ValueError:
                pairs.append((key, text))
    else:
        _fail(path, f"expected {{\"key.path\": value}} or [\"key.path=value\"], got {value!r}")
    for key, _ in pairs:
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            _fail(path, f"bad key path {key!r}")
    return pairs


def _lr(path: str, value) -> Union[float, str]:
    if value == "k1":
        return value
    if isinstance(value, str):
        _fail(path, f"expected a learning-rate multiplier or \"k1\" (fixed k = 1's best), got {value!r}")
    return _number(path, value)


def _arm_name_for(k: float, multiplier: float) -> str:
    return f"fixed{k:g}@{multiplier:g}"


def _expand_arm(path: str, raw, seeds: Tuple[int, ...]) -> List[Arm]:
    if not isinstance(raw, dict):
        _fail(path, f"expected an object such as {{\"fixed\": [1, 2], \"lr\": [0.5, 1, 2]}} or "
                    f"{{\"name\": \"default\", \"gqc\": null}}, got {raw!r}")
    own_seeds = _seeds(f"{path}.seeds", raw["seeds"]) if "seeds" in raw else seeds
    extra = tuple(_overrides(f"{path}.set", raw["set"])) if "set" in raw else ()
    if "fixed" in raw:
        _unknown(f"{path}.", raw, _FIXED_ARM)
        ks = _list_of(f"{path}.fixed", raw["fixed"], _number)
        for i, k in enumerate(ks):
            if k < 1:
                _fail(f"{path}.fixed[{i}]", f"a fixed window is >= 1 micro-batch, got {k!r}")
        rates = _list_of(f"{path}.lr", raw.get("lr", [1]), _lr)
        if "k1" in rates:
            _fail(f"{path}.lr", "\"k1\" is for controllers; a fixed arm is tuned over multipliers")
        if "name" in raw and len(ks) * len(rates) != 1:
            _fail(f"{path}.name", "a name needs one k and one lr")
        return [Arm(raw.get("name") or _arm_name_for(k, m), "fixed", m, own_seeds, k=k, overrides=extra)
                for k in ks for m in rates]
    _unknown(f"{path}.", raw, _CONTROLLER_ARM)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        _fail(f"{path}.name", "a controller arm needs a name (or give \"fixed\": k for a fixed arm)")
    gqc = raw.get("gqc")
    if gqc is not None and not isinstance(gqc, dict):
        _fail(f"{path}.gqc", f"expected a gradient_quality_control section (an object) or null, got {gqc!r}")
    if gqc is not None:
        from gqc_dist.config import parse_section

        try:
            parse_section(gqc)
        except GQCConfigError as error:
            _fail(f"{path}.gqc", str(error))
    return [Arm(name, "controller", _lr(f"{path}.lr", raw.get("lr", "k1")), own_seeds, gqc=gqc, overrides=extra)]


def _name_ok(path: str, name: str) -> None:
    if "/" in name or name.startswith(".") or "@s" in name or name.endswith("-twin"):
        _fail(path, f"arm name {name!r} may not contain '/' or '@s', start with '.' or end in '-twin'")


def parse(raw: dict, root: Path, spec_path: Optional[Path] = None) -> Spec:
    """A :class:`Spec` from parsed JSON ``raw``; relative paths resolve against ``root``."""
    if not isinstance(raw, dict):
        _fail("(top)", f"expected a JSON object, got {type(raw).__name__}")
    _unknown("", raw, _TOP)
    for key in ("arms",):
        if key not in raw:
            _fail(key, "missing (at least one arm, e.g. [{\"fixed\": 1, \"lr\": [0.5, 1, 2]}])")
    base = raw.get("base", {})
    if not isinstance(base, dict):
        _fail("base", f"expected {{\"config\": path, \"set\": {{...}}}}, got {base!r}")
    _unknown("base.", base, _BASE)
    base_config = None
    if base.get("config") is not None:
        if not isinstance(base["config"], str):
            _fail("base.config", f"expected a path, got {base['config']!r}")
        base_config = (root / base["config"]).resolve()
        if not base_config.is_file():
            _fail("base.config", f"no such file: {base_config}")
    base_set = _overrides("base.set", base.get("set", {}))
    seeds = _seeds("seeds", raw.get("seeds", [0]))
    if not isinstance(raw["arms"], list) or not raw["arms"]:
        _fail("arms", "expected a list of at least one arm")
    arms: Dict[str, Arm] = {}
    for i, item in enumerate(raw["arms"]):
        for arm in _expand_arm(f"arms[{i}]", item, seeds):
            _name_ok(f"arms[{i}].name", arm.name)
            if arm.name in arms:
                _fail(f"arms[{i}]", f"arm {arm.name!r} is defined twice")
            arms[arm.name] = arm
    twins = raw.get("twins", [])
    if not isinstance(twins, list):
        _fail("twins", f"expected a list of arm names, got {twins!r}")
    for i, name in enumerate(twins):
        if name not in arms:
            _fail(f"twins[{i}]", f"no arm named {name!r} (arms: {', '.join(arms)})")
        arms[f"{name}-twin"] = Arm(f"{name}-twin", "twin", arms[name].lr, arms[name].seeds, k=arms[name].k,
                                   gqc=arms[name].gqc, overrides=arms[name].overrides, of=name)
    if any(arm.needs_k1 for arm in arms.values()) and "k1_lr" not in raw \
            and not any(arm.kind == "fixed" and arm.k == 1 for arm in arms.values()):
        _fail("arms", "a controller at lr \"k1\" needs fixed k = 1 arms to tune it (add {\"fixed\": 1, "
                      "\"lr\": [0.5, 1, 2]}) or a pinned \"k1_lr\"")
    judge = raw.get("judge")
    controllers = [a.name for a in arms.values() if a.kind == "controller"]
    if judge is not None and judge not in controllers:
        _fail("judge", f"no controller arm named {judge!r} (controllers: {', '.join(controllers) or 'none'})")
    command = raw.get("command")
    if command is not None:
        if isinstance(command, str):
            import shlex

            command = shlex.split(command)
        if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
            _fail("command", f"expected a command line (a string or a list of strings), got {raw['command']!r}")
        if not any("{out}" in part for part in command):
            _fail("command", "the template must pass {out}: the folder the script writes its result to")
        from gqc_dist.sweep.runs import TEMPLATE_FIELDS

        for part in command:
            try:
                part.format(**{key: "" for key in TEMPLATE_FIELDS})
            except (KeyError, IndexError, ValueError) as error:
                _fail("command", f"{part!r}: unknown placeholder {error} (known: "
                                 f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)})")
    nproc = raw.get("nproc", 1)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        _fail("nproc", f"expected ranks per run (an integer >= 1), got {nproc!r}")
    slurm = raw.get("slurm", {})
    if not isinstance(slurm, dict):
        _fail("slurm", f"expected {{\"sbatch\": [arguments]}}, got {slurm!r}")
    _unknown("slurm.", slurm, _SLURM)
    sbatch = slurm.get("sbatch", [])
    if not isinstance(sbatch, list) or not all(isinstance(a, str) for a in sbatch):
        _fail("slurm.sbatch", f"expected a list of sbatch arguments, got {sbatch!r}")
    for key in ("results", "runs", "name", "about"):
        if key in raw and not isinstance(raw[key], str):
            _fail(key, f"expected a string, got {raw[key]!r}")
    results = (root / raw.get("results", "results")).resolve()
    if command is None:  # gqc-train runs: every arm's config is checked now, not when its run starts
        _check_configs(list(arms.values()), base_config, base_set)
    return Spec(
        path=spec_path, name=raw.get("name") or (spec_path.stem if spec_path else "sweep"),
        about=raw.get("about", ""), results=results, runs=(root / raw.get("runs", str(results / "runs"))).resolve(),
        base_config=base_config, base_set=base_set,
        base_lr=_number("base_lr", raw["base_lr"]) if "base_lr" in raw else _config_lr(base_config, base_set),
        arms=arms, judge=judge or (controllers[0] if controllers else None), nproc=nproc, command=command,
        k1_lr=_number("k1_lr", raw["k1_lr"]) if "k1_lr" in raw else None, sbatch=list(sbatch))


def _check_configs(arms: Sequence[Arm], config: Optional[Path], base_set: Sequence[Tuple[str, Any]]) -> None:
    """The gqc-train config each arm's runs get, validated (the base once, then each arm on it):
    a bad key or value is one line naming where it came from."""
    from gqc_dist.train.settings import apply_override, load_config, validate

    def overridden(values, pairs):
        for key, value in pairs:
            values = apply_override(values, f"{key}={json.dumps(value)}")
        return values

    where = "base.config" if config is not None else "base.set"
    try:
        base = load_config(config) if config is not None else {}
        where = "base.set"
        base = overridden(base, base_set)
        validate(base)
        for arm in arms:
            where = f"arm {arm.name}: set"
            values = base
            if arm.k is not None:
                values = {**values, "gqc": {"algorithm": "fixed", "accumulation_steps": arm.k}}
            elif arm.gqc is not None:
                values = {**values, "gqc": arm.gqc}
            validate(overridden(values, arm.overrides))
    except GQCConfigError as error:
        _fail(where, str(error))


def _config_lr(config: Optional[Path], overrides: Sequence[Tuple[str, Any]]) -> float:
    """The base learning rate when the spec gives none: the base config's ``optimizer.lr``."""
    for key, value in reversed(list(overrides)):
        if key == "optimizer.lr":
            return _number("base.set.optimizer.lr", value)
    if config is not None:
        try:
            lr = json.loads(config.read_text()).get("optimizer", {}).get("lr")
        except ValueError as error:
            _fail("base.config", f"{config} is not JSON: {error}")
        if lr is not None:
            return _number(f"base.config ({config.name}) optimizer.lr", lr)
    from gqc_dist.train.settings import DEFAULT_CONFIG

    return DEFAULT_CONFIG["optimizer"]["lr"]


def load(path: Union[str, Path], extra_set: Sequence[str] = (), results: Optional[str] = None) -> Spec:
    """The spec in the file ``path`` (JSON), with ``extra_set`` (``key.path=value``) appended to
    its base overrides and ``results`` (a folder, relative to the working directory) replacing
    its results folder."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as error:
        raise GQCConfigError(f"sweep spec: cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise GQCConfigError(f"sweep spec: {path} is not JSON: {error}") from None
    if isinstance(raw, dict):
        if extra_set:
            base = dict(raw.get("base") or {})
            base["set"] = _overrides("base.set", base.get("set", {})) + _overrides("--set", list(extra_set))
            base["set"] = [f"{k}={json.dumps(v)}" for k, v in base["set"]]
            raw = {**raw, "base": base}
        if results is not None:
            raw = {**raw, "results": str(Path(results).resolve()), "runs": str(Path(results).resolve() / "runs")}
    return parse(raw, path.resolve().parent, path.resolve())
