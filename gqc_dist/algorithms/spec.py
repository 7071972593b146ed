"""One descriptor per algorithm, and the registry the rest of gqc_dist reads.

An :class:`AlgorithmSpec` sits next to its wrapper class and says everything the config parser,
the DeepSpeed integration and gqc-train need to know about the algorithm: its config keys and
their kinds, how the wrapper is built, which param-group key holds its threshold-like value,
how a schedule drives that value, whether its ``step()`` needs the loss, and which engines it
runs on. Adding an algorithm is its own module plus one :func:`register` call.

Key kinds (``gqc_dist.validation``, the one validator): by name ``int+`` (integer >= 1),
``int0`` (integer >= 0), ``num+`` (> 0), ``num0`` (>= 0), ``num1`` (>= 1), ``prob`` (in (0, 1]),
``beta`` (in [0, 1)), ``bool``; or a :class:`~gqc_dist.validation.Kind` such as
``choice(("ceil", "dither"))``, so an algorithm declares its own choices.
"""

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional

ENGINE_NAMES = {"single": "a single process", "ddp": "DDP", "fsdp2": "FSDP2", "deepspeed": "DeepSpeed"}
ENGINES = frozenset(ENGINE_NAMES)
REQUIRED = object()  # an option without a default


@dataclass(frozen=True)
class AlgorithmSpec:
    """What one algorithm is, as data.

    Attributes:
        name: the ``algorithm`` value in a config section.
        build: ``build(optimizer, section, context, **wrapper_kwargs) -> wrapper``; ``section``
            is the parsed config section, ``context`` what the engine knows
            (``physical_batch_size``: samples one rank draws per micro-batch, or ``None``).
        options: constructor keys ``{key: (kind, default or REQUIRED)}`` (e.g. ``max_draws``).
        values: constant value keys ``{key: (kind, param-group key it sets)}``.
        schedule: schedule value keys ``{key: (kind, default or REQUIRED)}``; ``None`` when the
            algorithm takes no ``schedule`` block.
        make_schedules: ``make_schedules(wrapper, schedule_section) -> [tsa schedules]``.
        all_values: True when every value key is required (mht); otherwise a section gives
            exactly one of a constant value or a ``schedule``.
        logged_value: the param-group key gqc-train logs as the algorithm's threshold.
        needs_loss: the rule reads this rank's micro-batch loss (``after_backward(loss)`` hands it
            to the wrapper's ``_inputs``; others are never given it, so it is never synced).
        adaptive: False for rules whose window length is fixed (no "forced by max_draws").
        engines: gqc-train engines it runs on; ``unsupported`` says why not on the others.
    """

    name: str
    build: Callable[..., Any]
    options: Dict[str, tuple] = field(default_factory=dict)
    values: Dict[str, tuple] = field(default_factory=dict)
    schedule: Optional[Dict[str, tuple]] = None
    make_schedules: Optional[Callable[[Any, Dict[str, Any]], List[Any]]] = None
    all_values: bool = False
    logged_value: Optional[str] = None
    needs_loss: bool = False
    adaptive: bool = True
    engines: FrozenSet[str] = ENGINES
    unsupported: str = ""

    def check_engine(self, engine: str, path: str = "gradient_quality_control.algorithm") -> None:
        """Raise :class:`GQCConfigError` naming the key ``path`` when the algorithm cannot run on
        ``engine`` (one of :data:`ENGINES`)."""
        from gqc_dist.errors import GQCConfigError

        if engine not in self.engines:
            raise GQCConfigError(
                f"{path} {self.name!r} is not supported on {ENGINE_NAMES[engine]}"
                + (f": {self.unsupported}" if self.unsupported else ""))


_REGISTRY: Dict[str, AlgorithmSpec] = {}


def register(spec: AlgorithmSpec) -> AlgorithmSpec:
    """Make ``spec`` known to configs, DeepSpeed and gqc-train (a later spec of the same name
    replaces the earlier one)."""
    _REGISTRY[spec.name] = spec
    return spec


def algorithms() -> Dict[str, AlgorithmSpec]:
    """The registered algorithms by name (the built-in ones are registered on import)."""
    importlib.import_module(".builtin", __package__)  # registers the built-in algorithms
    return dict(_REGISTRY)


def get(name: str) -> AlgorithmSpec:
    """The spec of a registered algorithm (``KeyError`` if none)."""
    return algorithms()[name]
