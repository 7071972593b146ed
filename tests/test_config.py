"""The gradient_quality_control config section: a table of bad input, and what good input builds."""

import pytest
import torch

import gqc_dist
from gqc_dist.config import build_controller, parse_section
from reference import loss_of, make_mlp, micro_batches, reference_gnts

GOOD_SCHEDULE = {"num_training_steps": 100, "num_warmup_steps": 5, "initial_threshold": 0.9,
                 "final_threshold": 0.2}

BAD = [
    ([], "gradient_quality_control must be an object"),
    ({}, r"gradient_quality_control.algorithm must be one of"),
    ({"algorithm": "gnst", "threshold": 1}, "algorithm must be one of cbc, fixed, gnr, gns, gnts, goodput, mht, sbc, got 'gnst'"),
    ({"algorithm": "gnts", "treshold": 0.5}, r"unknown key gradient_quality_control.treshold"),
    ({"algorithm": "gnts", "threshold": -0.5}, r"gradient_quality_control.threshold must be >= 0"),
    ({"algorithm": "gnts", "threshold": "0.5"}, r"gradient_quality_control.threshold must be a finite number"),
    ({"algorithm": "gnts", "threshold": float("nan")}, r"threshold must be a finite number"),
    ({"algorithm": "gnts", "threshold": 0.5, "max_draws": 0}, r"gradient_quality_control.max_draws must be >= 1"),
    ({"algorithm": "gnts", "threshold": 0.5, "max_draws": 2.5}, r"max_draws must be an integer"),
    ({"algorithm": "gnts", "threshold": 0.5, "max_draws": True}, r"max_draws must be an integer"),
    ({"algorithm": "gnts", "threshold": 0.5, "verify": 1}, r"gradient_quality_control.verify must be true or false"),
    ({"algorithm": "gnts"}, r"needs either gradient_quality_control.threshold .* or gradient_quality_control.schedule"),
    ({"algorithm": "gnts", "threshold": 0.5, "schedule": GOOD_SCHEDULE}, "conflict"),
    ({"algorithm": "gnts", "schedule": {**GOOD_SCHEDULE, "num_warmup_step": 3}},
     r"unknown key gradient_quality_control.schedule.num_warmup_step\b"),
    ({"algorithm": "gnts", "schedule": {k: v for k, v in GOOD_SCHEDULE.items() if k != "final_threshold"}},
     r"gradient_quality_control.schedule.final_threshold is required"),
    ({"algorithm": "gnts", "schedule": {**GOOD_SCHEDULE, "num_warmup_steps": 100}},
     r"schedule.num_warmup_steps \(100\) must be smaller than"),
    ({"algorithm": "gnts", "schedule": {**GOOD_SCHEDULE, "warmup_multiplier": 0}}, r"schedule.warmup_multiplier must be > 0"),
    ({"algorithm": "gnts", "schedule": "cosine"}, r"gradient_quality_control.schedule must be an object"),
    ({"algorithm": "gnr", "target_norm": 1.0, "max_draws": 4}, r"unknown key gradient_quality_control.max_draws"),
    ({"algorithm": "gnr", "target_norm": 0}, r"target_norm must be > 0"),
    ({"algorithm": "mht", "confidence_level": 0.9}, r"needs gradient_quality_control.percent_error_threshold"),
    ({"algorithm": "mht", "confidence_level": 1.5, "percent_error_threshold": 0.1}, r"confidence_level must be in \(0, 1\]"),
    ({"algorithm": "sbc", "logical_batch_size": 64, "physical_batch_size": 0}, r"physical_batch_size must be >= 1"),
]


@pytest.mark.parametrize("section, message", BAD)
def test_bad_sections_are_refused_naming_the_key(section, message):
    with pytest.raises(gqc_dist.GQCConfigError, match=message):
        parse_section(section)


def test_defaults_are_filled_and_input_is_not_modified():
    section = {"algorithm": "gnts", "schedule": dict(GOOD_SCHEDULE)}
    parsed = parse_section(section)
    assert parsed["max_draws"] == 64 and parsed["verify"] is False
    assert parsed["schedule"]["warmup_multiplier"] == 10.0
    assert "warmup_multiplier" not in section["schedule"]


def test_constant_threshold_section_builds_the_rule_it_names():
    batches = micro_batches(40)
    model, ref_model = make_mlp(), make_mlp()
    section = parse_section({"algorithm": "gnts", "threshold": 0.6, "max_draws": 6})
    wrapper, schedule = build_controller(section, torch.optim.SGD(model.parameters(), lr=0.05))
    assert schedule is None
    decisions = []
    for batch in batches:
        loss_of(model, batch).backward()
        decisions.append(wrapper.step())
    ref = reference_gnts(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.05), batches, 0.6, 6)
    assert decisions == ref[0] and True in decisions and False in decisions


@pytest.mark.parametrize("section, target, first, later", [
    ({"algorithm": "gnts", "schedule": GOOD_SCHEDULE}, "gradient_norm_threshold", 9.0, 0.9),
    ({"algorithm": "gns", "schedule": {"num_training_steps": 50, "num_warmup_steps": 5,
                                       "initial_tolerance": 0.2, "final_tolerance": 0.1}},
     "noise_tolerance", 2.0, 0.2),
    ({"algorithm": "gnr", "schedule": {"num_training_steps": 50, "num_warmup_steps": 5,
                                       "initial_norm": 2.0, "final_norm": 1.0}}, "target_gradient_norm", 0.0, 2.0),
    ({"algorithm": "sbc", "physical_batch_size": 4,
      "schedule": {"num_training_steps": 50, "num_warmup_steps": 5, "initial_batch_size": 8,
                   "final_batch_size": 64}}, "logical_batch_size", 0.0, 8.0),
    ({"algorithm": "mht", "confidence_level": 0.9, "percent_error_threshold": 0.2,
      "schedule": {"num_training_steps": 50, "num_warmup_steps": 5}}, "confidence_level", 0.0, 0.9),
])
def test_schedules_drive_the_algorithm_value(section, target, first, later):
    wrapper, schedule = build_controller(parse_section(section),
                                         torch.optim.SGD(make_mlp().parameters(), lr=0.1))
    assert wrapper.param_groups[0][target] == pytest.approx(first)
    for _ in range(5):
        schedule.step()
    assert wrapper.param_groups[0][target] == pytest.approx(later)
    assert wrapper.param_groups[0]["lr"] == 0.1  # the learning rate is not touched


def test_value_schedule_is_not_confused_by_an_existing_torch_lr_scheduler():
    optimizer = torch.optim.SGD(make_mlp().parameters(), lr=0.003)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    wrapper, schedule = build_controller(parse_section({"algorithm": "gnts", "schedule": GOOD_SCHEDULE}), optimizer)
    assert wrapper.param_groups[0]["gradient_norm_threshold"] == pytest.approx(9.0)
    for _ in range(5):
        schedule.step()
        lr_schedule.step()
    assert wrapper.param_groups[0]["gradient_norm_threshold"] == pytest.approx(0.9)
    assert wrapper.param_groups[0]["lr"] == pytest.approx(0.003 / 6)
