"""The algorithm descriptor and registry (gqc_dist.algorithms.spec).

The built-in specs round-trip through the config parser and build their wrappers; a toy
algorithm defined only here and added through its descriptor alone is accepted by the config
parser, trains under gqc-train (in-process) and under DeepSpeed (a real 1-rank process group),
and is refused on engines it does not list.
"""

import json
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import gqc_dist  # noqa: E402
from distributed_harness import run_distributed  # noqa: E402
from gqc_dist.algorithms import spec as spec_module  # noqa: E402
from gqc_dist.algorithms.spec import REQUIRED, AlgorithmSpec, register  # noqa: E402
from gqc_dist.config import build_controller, parse_section  # noqa: E402
from gqc_dist.errors import GQCConfigError  # noqa: E402
from gqc_dist.core.session import GQCSession  # noqa: E402
from gqc_dist.core.wrapper import GQCOptimizerWrapper  # noqa: E402
from reference import make_mlp, micro_batches  # noqa: E402

DOCUMENTED = {"gnts", "gns", "gnr", "sbc", "mht", "fixed"}  # docs/library.md and docs/deepspeed.md: the algorithms they document
BUILTINS = frozenset(spec_module.algorithms())  # before this file registers anything
TOY = "every_k"


# ---------------------------------------------------------------- the toy algorithm
class OptimizerWrapperEveryK(GQCOptimizerWrapper):
    """Steps when ``num_draws`` reaches the schedulable param-group value ``toy_period``
    (rank 0's, minimum over groups) or at ``max_draws``."""

    ALGORITHM = TOY
    SCHEDULABLE = {"toy_period": 1.0}

    def _settings(self):
        return {"toy_period": min(self._group_values("toy_period"))}

    def _decide(self, stats):
        return self.num_draws >= stats.settings["toy_period"] or self.num_draws >= stats.settings["max_draws"]


def _build_every_k(optimizer, section, context, **kwargs):
    return OptimizerWrapperEveryK(optimizer, section["max_draws"], **kwargs)


def toy_spec(**changes):
    fields = dict(name=TOY, build=_build_every_k, options={"max_draws": ("int+", 64)},
                  values={"period": ("num+", "toy_period")}, logged_value="toy_period")
    fields.update(changes)
    return AlgorithmSpec(**fields)


@pytest.fixture
def registered_toy():
    """The toy registered for one test; the registry holds only the built-ins afterwards."""
    spec = register(toy_spec())
    yield spec
    del spec_module._REGISTRY[TOY]
    assert set(spec_module.algorithms()) == BUILTINS


# ---------------------------------------------------------------- built-in specs
_SAMPLE = {"int+": 3, "int0": 2, "num+": 0.75, "num0": 0.5, "num1": 1.5, "prob": 0.5, "bool": True}


def _minimal_section(spec):
    """The smallest section the descriptor allows: required options, and one value key (all of
    them when the spec needs all)."""
    section = {"algorithm": spec.name}
    for key, (kind, default) in spec.options.items():
        if default is REQUIRED:
            section[key] = _SAMPLE[kind]
    value_keys = list(spec.values) if spec.all_values else list(spec.values)[:1]
    for key in value_keys:
        section[key] = _SAMPLE[spec.values[key][0]]
    return section


def test_builtin_registry_holds_the_documented_algorithms():
    algorithms = spec_module.algorithms()
    assert DOCUMENTED <= set(algorithms) and TOY not in algorithms
    for name, spec in algorithms.items():
        assert spec.name == name
        assert spec_module.get(name) is spec
    with pytest.raises(KeyError):
        spec_module.get(TOY)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_spec_round_trips_through_parse_section_and_builds(name):
    spec = spec_module.get(name)
    section = _minimal_section(spec)
    parsed = parse_section(section)
    # what was given comes back (numbers as floats), defaults fill the other options
    expected = {"algorithm": name, "verify": False}
    for key, (kind, default) in spec.options.items():
        if key in section:
            expected[key] = section[key]
        elif default is not None:
            expected[key] = default
    for key in spec.values:
        if key in section:
            expected[key] = float(section[key])
    # keys common to every algorithm (e.g. ``verify``) may come with their defaults as well
    assert {key: parsed.get(key, "absent") for key in expected} == expected
    assert not [key for key in spec.values if key not in section and key in parsed]
    assert all(type(parsed[key]) is float for key in spec.values if key in section)

    model = make_mlp()
    optimizer = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    wrapper, schedule = build_controller(parsed, optimizer, physical_batch_size=4)
    assert schedule is None
    assert wrapper.ALGORITHM == name == spec.name
    assert wrapper.optimizer is optimizer
    for key, (_, group_key) in spec.values.items():
        if key in section:
            assert [g[group_key] for g in optimizer.param_groups] == [float(section[key])] * 2, key
    if "max_draws" in spec.options:
        assert wrapper.max_draws == parsed["max_draws"]


def test_fixed_and_sbc_build_from_their_options():
    fixed, _ = build_controller(parse_section({"algorithm": "fixed", "accumulation_steps": 5}),
                                torch.optim.SGD(make_mlp().parameters(), lr=0.1))
    assert fixed.max_draws == 5
    sbc_section = parse_section({"algorithm": "sbc", "logical_batch_size": 16, "physical_batch_size": 4})
    sbc, _ = build_controller(sbc_section, torch.optim.SGD(make_mlp().parameters(), lr=0.1),
                              physical_batch_size=99)  # the section's own value wins
    assert sbc.statistics()["physical_batch_size"] == 4


@pytest.mark.parametrize("name", sorted(n for n in BUILTINS if spec_module.get(n).schedule is not None))
def test_builtin_schedule_section_builds_a_schedule(name):
    spec = spec_module.get(name)
    schedule = {"num_training_steps": 10, "num_warmup_steps": 2}
    for key, (kind, default) in spec.schedule.items():
        if default is REQUIRED:
            schedule[key] = _SAMPLE[kind]
    section = {"algorithm": name, "schedule": schedule}
    for key, (kind, default) in spec.options.items():
        if default is REQUIRED:
            section[key] = _SAMPLE[kind]
    if spec.all_values:
        section.update({key: _SAMPLE[kind] for key, (kind, _) in spec.values.items()})
    parsed = parse_section(section)
    assert parsed["schedule"]["num_training_steps"] == 10
    wrapper, value_schedule = build_controller(parsed, torch.optim.SGD(make_mlp().parameters(), lr=0.1),
                                               physical_batch_size=4)
    assert wrapper.ALGORITHM == name and value_schedule is not None


# ---------------------------------------------------------------- (a) the toy in the config parser
def test_toy_is_unknown_until_registered():
    with pytest.raises(GQCConfigError, match="algorithm must be one of .*got 'every_k'"):
        parse_section({"algorithm": TOY, "period": 2})


def test_toy_section_is_parsed_and_built(registered_toy):
    assert spec_module.get(TOY) is registered_toy
    parsed = parse_section({"algorithm": TOY, "period": 3, "max_draws": 5, "verify": True})
    expected = {"algorithm": TOY, "verify": True, "max_draws": 5, "period": 3.0}
    assert {key: parsed.get(key, "absent") for key in expected} == expected
    assert parse_section({"algorithm": TOY, "period": 2})["max_draws"] == 64  # the spec's default
    optimizer = torch.optim.SGD(make_mlp().parameters(), lr=0.1)
    wrapper, schedule = build_controller(parsed, optimizer)
    assert isinstance(wrapper, OptimizerWrapperEveryK) and schedule is None
    assert wrapper.max_draws == 5 and optimizer.param_groups[0]["toy_period"] == 3.0


@pytest.mark.parametrize("section, needle", [
    ({"algorithm": TOY, "perod": 3}, r"unknown key gradient_quality_control\.perod; allowed here: "
                                     r"algorithm, (.*, )?max_draws, (.*, )?period"),
    ({"algorithm": TOY, "period": 3, "max_drawz": 4}, r"unknown key gradient_quality_control\.max_drawz"),
    ({"algorithm": TOY, "period": 3, "schedule": {}}, r"unknown key gradient_quality_control\.schedule"),
    ({"algorithm": TOY, "period": 0}, r"gradient_quality_control\.period must be > 0, got 0"),
    ({"algorithm": TOY, "period": 2, "max_draws": 0}, r"gradient_quality_control\.max_draws must be >= 1"),
    ({"algorithm": TOY}, r"needs either gradient_quality_control\.period"),
])
def test_toy_section_refusals_name_the_key_path(registered_toy, section, needle):
    with pytest.raises(GQCConfigError, match=needle):
        parse_section(section)


def test_toy_refusal_under_a_custom_path(registered_toy):
    with pytest.raises(GQCConfigError, match=r"unknown key gqc\.perod"):
        parse_section({"algorithm": TOY, "perod": 3}, "gqc")


# ---------------------------------------------------------------- (b) the toy under gqc-train
QUICK = {"model": {"seq_len": 32, "dim": 32, "layers": 1, "heads": 2},
         "data": {"max_bytes": 300_000, "micro_batch_size": 8},
         "optimizer": {"warmup_steps": 2},
         "train": {"optimizer_steps": 6, "max_micro_steps": 300, "eval_interval": 6,
                   "eval_batches": 2, "checkpoint_interval": 6}}


def test_toy_trains_under_gqc_train(registered_toy, tmp_path):
    from gqc_dist.train.run import train
    from gqc_dist.train.settings import validate

    out = tmp_path / "run"
    config = validate({**QUICK, "out_dir": str(out), "gqc": {"algorithm": TOY, "period": 3}})
    summary = train(config, progress=False)
    assert summary["optimizer_steps"] == 6 and summary["micro_steps"] == 18
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["draws"] for r in steps] == [3] * 6
    assert [r["threshold"] for r in steps] == [3.0] * 6  # the toy's logged_value, toy_period
    assert [r["samples"] for r in steps] == [3 * 8 * s for s in range(1, 7)]


# ---------------------------------------------------------------- (c) the toy under DeepSpeed
def _toy_deepspeed(rank, world_size):
    import gqc_dist.frontends.deepspeed as gqc_deepspeed

    register(toy_spec())  # in the process that trains
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "gradient_quality_control": {"algorithm": TOY, "period": 2}}
    engine, _, _, _ = gqc_deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    decisions, global_steps = [], []
    for x, y in micro_batches(6):
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        decisions.append(engine.step())
        global_steps.append(engine.global_steps)
    return {"decisions": decisions, "global_steps": global_steps, "wrapper": type(engine.gqc).__name__,
            "last_num_draws": engine.gqc.last_num_draws,
            "params": [p.detach().clone() for p in engine.module.parameters()]}


def _mean_of_pairs_oracle():
    """Plain torch: sum two micro-batch gradients, take their mean, clip it to global norm 1.0
    (DeepSpeed's default ``gradient_clipping``, which the config leaves out), step, zero; three
    times."""
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for index, (x, y) in enumerate(micro_batches(6)):
        torch.nn.functional.mse_loss(model(x), y).backward()
        if index % 2 == 1:
            for p in model.parameters():
                p.grad.div_(2)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return [p.detach() for p in model.parameters()]


def test_toy_trains_under_deepspeed_zero2():
    (result,) = run_distributed(_toy_deepspeed, 1, timeout=300, env={"DS_ACCELERATOR": "cpu"})
    assert result["wrapper"] == "OptimizerWrapperEveryK"
    assert result["decisions"] == [False, True, False, True, False, True]
    assert result["global_steps"] == [0, 1, 1, 2, 2, 3]
    assert result["last_num_draws"] == 2
    for got, want in zip(result["params"], _mean_of_pairs_oracle()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- (d) engines
def test_check_engine_refuses_unlisted_engines_naming_the_key_path():
    spec = toy_spec(engines=frozenset({"single", "ddp"}), unsupported="it needs per-sample hooks")
    spec.check_engine("single")
    spec.check_engine("ddp", "gqc.algorithm")
    with pytest.raises(GQCConfigError, match=r"^gradient_quality_control\.algorithm 'every_k' is not "
                                             r"supported on DeepSpeed: it needs per-sample hooks$"):
        spec.check_engine("deepspeed")
    with pytest.raises(GQCConfigError, match=r"^gqc\.algorithm 'every_k' is not supported on FSDP2: it needs"):
        spec.check_engine("fsdp2", "gqc.algorithm")
    bare = toy_spec(engines=frozenset({"single"}))
    with pytest.raises(GQCConfigError, match=r"^gradient_quality_control\.algorithm 'every_k' is not "
                                             r"supported on DDP$"):
        bare.check_engine("ddp")


def test_gqc_train_settings_refuse_an_algorithm_on_an_unlisted_engine():
    from gqc_dist.train.settings import validate

    register(toy_spec(engines=frozenset({"single"}), unsupported="toy reason"))
    try:
        validate({"engine": "single", "gqc": {"algorithm": TOY, "period": 2}})
        with pytest.raises(GQCConfigError, match=r"gqc\.algorithm 'every_k' is not supported on DDP: toy reason"):
            validate({"engine": "ddp", "gqc": {"algorithm": TOY, "period": 2}})
    finally:
        del spec_module._REGISTRY[TOY]
    # a built-in restricted the same way (gns runs only on single and ddp)
    with pytest.raises(GQCConfigError, match=r"gqc\.algorithm 'gns' is not supported on FSDP2"):
        validate({"engine": "fsdp2", "gqc": {"algorithm": "gns", "tolerance": 0.1}})


# ---------------------------------------------------------------- (e) needs_loss
class LossRecorder(GQCOptimizerWrapper):
    """Records what its step() receives; steps every other micro-batch."""

    ALGORITHM = "loss_recorder"

    def __init__(self, optimizer):
        super().__init__(optimizer, 2)
        self.received = []

    def _inputs(self, loss):  # an algorithm's per-micro-step inputs come from the loss here
        self.received.append(float(loss))
        return {}

    def _decide(self, stats):
        return self.num_draws >= stats.settings["max_draws"]


def _backward_once(model):
    x, y = micro_batches(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()


def test_the_session_passes_the_loss_to_a_rule_that_reads_it():
    model = make_mlp()
    session = GQCSession(LossRecorder(torch.optim.SGD(model.parameters(), lr=0.1)))
    wrapper = session.controller
    _backward_once(model)
    assert session.micro_step(torch.tensor(1.25)).stepped is False
    _backward_once(model)
    assert session.micro_step(0.5).stepped is True
    assert wrapper.received == [1.25, 0.5]
    assert all(type(value) is float for value in wrapper.received)


class _Unreadable:
    """A loss whose reading fails the test (a host sync on a device tensor)."""

    def __float__(self):
        raise AssertionError("the loss was read")

    item = tolist = __bool__ = __float__


def test_a_rule_without_the_loss_never_reads_it():
    """Every front end hands the session its loss; a rule that does not need it (every built-in
    one but MHT) does not read it: no host sync."""
    model = make_mlp()
    session = GQCSession(gqc_dist.OptimizerWrapperFixed(torch.optim.SGD(model.parameters(), lr=0.1), 2))
    _backward_once(model)
    assert session.micro_step(_Unreadable()).stepped is False
    _backward_once(model)
    assert session.micro_step(_Unreadable()).stepped is True


def test_builtin_mht_gets_the_loss_through_its_spec():
    spec = spec_module.get("mht")
    assert spec.needs_loss is True
    assert not any(spec_module.get(n).needs_loss for n in ("gnts", "gns", "gnr", "sbc", "fixed"))
    model = make_mlp()
    wrapper, _ = build_controller(parse_section({"algorithm": "mht", "confidence_level": 0.9,
                                                 "percent_error_threshold": 0.1, "max_draws": 3}),
                                  torch.optim.SGD(model.parameters(), lr=0.1))
    losses = [2.0, 4.0, 9.0]
    decisions = []
    session = GQCSession(wrapper)
    for loss in losses:
        _backward_once(model)
        decisions.append(session.micro_step(torch.tensor(loss)).stepped)
    # torch-gqc's rule by hand: the running mean is seeded with the first metric, then blended
    # with beta 0.01 every micro-step; the judgment is [running mean] + this window's metrics.
    # Micro-step 1 judges [2, 2] (zero spread: steps); then [2.02, 4] and [2.0898, 4, 9] are wide.
    running = 2.0
    for loss in losses[1:]:
        running = running * 0.99 + loss * 0.01
    assert decisions == [True, False, False]
    assert wrapper.statistics()["running_mean"] == pytest.approx(running, rel=1e-12)
