"""The wrapper's checkpoint format: its counters, validation, and torch-gqc's format upgraded.

A state dict is ``{"format", "algorithm", "max_draws", "counters", "algorithm_state",
"optimizer", "accumulated_grads"}`` and, optionally, ``noise_state`` (the noise-scale estimate);
``accumulated_grads`` is whatever the engine adapter's ``save_accumulated()`` returned
(``None`` at a window boundary). Everything is validated
before anything is changed, and every refusal is a :class:`CheckpointError` naming what is wrong.
"""

from typing import Any, Callable, Dict

from gqc_dist.errors import CheckpointError
from gqc_dist.core.noise_scale import STATE_KEYS, state_keys_valid

FORMAT = "gqc_dist.wrapper/1"

COUNTERS = (
    "num_batches",
    "num_steps",
    "num_draws",
    "last_num_draws",
    "last_grad_norm",
    "mean_grad_norm",
    "nonfinite_micro_batches",
    "dropped_windows",
    "dropped_micro_batches",
    "forced_steps",
)
_OPTIONAL_COUNTERS = ("last_num_draws", "last_grad_norm", "mean_grad_norm")  # None until known
_REQUIRED_KEYS = ("format", "algorithm", "max_draws", "counters", "algorithm_state", "optimizer",
                  "accumulated_grads")


def new_counters() -> Dict[str, Any]:
    """The counters of a wrapper that has seen no micro-batch."""
    return {name: None if name in _OPTIONAL_COUNTERS else 0 for name in COUNTERS}


def validate(sd: Dict[str, Any], algorithm: str, max_draws: int,
             check_accumulated: Callable[[Any], None]) -> None:
    """Raise :class:`CheckpointError` unless ``sd`` is a state dict this wrapper can load.

    ``check_accumulated`` is the engine adapter's check of the saved accumulated gradient.
    """
    missing = [key for key in _REQUIRED_KEYS if key not in sd]
    if missing:
        raise CheckpointError(f"state dict is missing keys {missing}")
    if sd["format"] != FORMAT:
        raise CheckpointError(f"unknown state dict format {sd['format']!r}, expected {FORMAT!r}")
    if sd["algorithm"] != algorithm:
        raise CheckpointError(
            f"state dict was saved by algorithm {sd['algorithm']!r}, this wrapper is {algorithm!r}")
    counters = sd["counters"]
    if not isinstance(counters, dict) or set(counters) != set(COUNTERS):
        raise CheckpointError(f"state dict 'counters' must have exactly the keys {list(COUNTERS)}")
    for name in COUNTERS:
        value = counters[name]
        if name in _OPTIONAL_COUNTERS:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"state dict counter '{name}' must be an int >= 0, got {value!r}")
    if counters["num_draws"] >= max_draws:
        raise CheckpointError(
            f"state dict has num_draws={counters['num_draws']} but this wrapper's max_draws is {max_draws}")
    if not state_keys_valid(sd.get("noise_state", {})):
        raise CheckpointError(f"state dict 'noise_state' must have exactly the keys {list(STATE_KEYS)}")
    grads = sd["accumulated_grads"]
    if (counters["num_draws"] > 0) != (grads is not None):
        raise CheckpointError(
            f"state dict has num_draws={counters['num_draws']} but "
            f"{'no' if grads is None else 'unexpected'} accumulated gradients")
    if grads is not None:
        check_accumulated(grads)


def upgrade_torch_gqc(sd: Any, algorithm: str, max_draws: int,
                      algorithm_state: Callable[[Dict[str, Any]], Dict[str, Any]]) -> Dict[str, Any]:
    """``sd`` in this module's format: torch-gqc 0.10's ``{"wrapper_states", "optimizer_states"}``
    (saved at a step boundary) is converted, anything else is returned as it is.

    ``algorithm_state(values)`` turns torch-gqc's wrapper values into the algorithm's state.
    """
    if not isinstance(sd, dict):
        raise CheckpointError(f"state dict must be a dict, got {type(sd).__name__}")
    if "wrapper_states" not in sd:
        counters = sd.get("counters")
        if isinstance(counters, dict) and "forced_steps" not in counters:  # saved before it was counted
            sd = {**sd, "counters": {**counters, "forced_steps": 0}}
        return sd
    try:
        values = {k: v["value"] for k, v in sd["wrapper_states"].items()}
        optimizer_state = sd["optimizer_states"]
    except (KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"torch-gqc state dict is malformed: {error!r}") from error
    if values.get("num_draws", 0):
        raise CheckpointError(
            f"torch-gqc checkpoint was saved mid-window (num_draws={values['num_draws']}) and "
            "carries no gradients; resume from one saved right after a step")
    counters = {name: 0 for name in COUNTERS}
    counters.update({k: values[k] for k in COUNTERS if k in values})
    counters["mean_grad_norm"] = None
    return {"format": FORMAT, "algorithm": algorithm, "max_draws": max_draws, "counters": counters,
            "algorithm_state": algorithm_state(values), "optimizer": optimizer_state,
            "accumulated_grads": None}
