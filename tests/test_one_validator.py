"""One validator (``gqc_dist.validation``): a value is refused with the same words by the
wrapper's constructor, the ds_config section and gqc-train's config, only the key path differs
(``noise_beta``, ``gradient_quality_control.noise_beta``, ``gqc.noise_beta``); and a value one
of them accepts, every one accepts. Oracle: the three messages, path stripped, compared."""

import pytest
import torch

import gqc_dist
from gqc_dist.config import parse_section
from gqc_dist.errors import GQCConfigError, GQCError
from gqc_dist.train.settings import validate

SECTION = {"algorithm": "gnts", "threshold": 0.5}
BAD = [("noise_beta", 1), ("noise_beta", -0.5), ("noise_beta", "0.9"), ("noise_beta", True),
       ("noise_beta", float("nan")), ("timeout_s", 0), ("timeout_s", -1), ("timeout_s", "5"),
       ("max_draws", 0), ("max_draws", 2.5), ("max_draws", "8"), ("verify", "yes"), ("verify", 1)]
GOOD = [("noise_beta", 0), ("noise_beta", 0.99), ("timeout_s", 0.5), ("max_draws", 1), ("verify", True)]


def _wrapper(key, value):
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    return gqc_dist.OptimizerWrapperGNTS(optimizer, **{"max_batch_draws" if key == "max_draws" else key: value})


def refusals(key, value):
    """What each front end says of ``key = value``, as (path it named, the rest of the line)."""
    said = []
    for path, attempt in ((key, lambda: _wrapper(key, value)),
                          (f"gradient_quality_control.{key}", lambda: parse_section({**SECTION, key: value})),
                          (f"gqc.{key}", lambda: validate({"gqc": {**SECTION, key: value}}))):
        with pytest.raises(GQCError) as error:
            attempt()
        message = str(error.value)
        assert message.startswith(f"{path} must be "), message
        said.append(message[len(path):])
    return said


@pytest.mark.parametrize("key, value", BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_a_bad_value_gets_the_same_words_everywhere(key, value):
    wrapper, section, train = refusals(key, value)
    assert wrapper == section == train and "\n" not in wrapper


@pytest.mark.parametrize("key, value", GOOD, ids=[f"{k}={v!r}" for k, v in GOOD])
def test_a_value_one_accepts_every_one_accepts(key, value):
    _wrapper(key, value)
    assert parse_section({**SECTION, key: value})[key] == value
    assert validate({"gqc": {**SECTION, key: value}})["gqc"][key] == value


def test_an_algorithm_declares_its_own_choices():
    """CBC's rounding and probe options are its own (``choice`` in its descriptor): the config
    module names no algorithm's choices."""
    import inspect

    import gqc_dist.config as config

    assert "ROUNDINGS" not in inspect.getsource(config) and "PROBES" not in inspect.getsource(config)
    with pytest.raises(GQCConfigError, match=r"^gradient_quality_control\.rounding must be one of ceil, dither, "
                                             r"got 'floor'$"):
        parse_section({"algorithm": "cbc", "kappa": 0.25, "rounding": "floor"})
