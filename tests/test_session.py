"""The front-end contract (``gqc_dist.core.session.GQCSession``): the micro-step with its step
notification, and one versioned per-rank envelope that also loads the four envelopes of before.

Oracle: the same run uninterrupted. A run saved at micro-step 7 (a step boundary) or 10
(mid-window) in each envelope format, loaded into a fresh model, optimizer and controller, and
continued, takes the same decisions and ends with the same parameters. The legacy envelopes are
built exactly as the front ends of 2026-12-07 wrote them (``gqc_dist.deepspeed/1`` by
``deepspeed_checkpoint.gqc_state``, ``gqc_dist.integrations/1`` by the Trainer / Accelerate
``controller_state``, ``gqc_dist.torchtitan/1`` by its ``_gqc_state``, ``gqc_dist.wrapper/1`` by
the wrapper's own ``state_dict()``)."""

import copy

import pytest
import torch

from gqc_dist.config import build_controller, parse_section
from gqc_dist.core.session import FORMAT, GQCSession, read, state_path
from gqc_dist.errors import CheckpointError
from reference import adamw, loss_of, make_mlp, micro_batches

# a threshold schedule whose warm-up threshold is 10x: a resume that lost the schedule's position
# (or its values) steps at other micro-batches
GNTS = {"algorithm": "gnts", "max_draws": 4,
        "schedule": {"num_training_steps": 10, "num_warmup_steps": 1, "initial_threshold": 1.5,
                     "final_threshold": 1.0}}
BATCHES = micro_batches(16)


def build():
    model = make_mlp()
    optimizer = adamw(model.parameters())
    return model, optimizer, GQCSession(*build_controller(parse_section(GNTS), optimizer))


def train(model, session, batches):
    decisions = []
    for batch in batches:
        loss_of(model, batch).backward()
        decisions.append(session.micro_step().stepped)
    return decisions


def legacy(session, kind):
    """This session's state as the front ends wrote it before the contract."""
    controller, schedule = session.controller, session.schedule
    values = [{key: group[key] for key in controller.SCHEDULABLE if key in group} for group in controller.param_groups]
    wrapper = controller.state_dict(include_optimizer=False)
    schedule_state = None if schedule is None else copy.deepcopy(schedule.state_dict())
    if kind == "gqc_dist.wrapper/1":
        return controller.state_dict()
    if kind == "gqc_dist.integrations/1":
        return {"format": kind, "algorithm": controller.ALGORITHM, "rank": 0, "world_size": 1, "wrapper": wrapper,
                "schedule": schedule_state}
    if kind == "gqc_dist.deepspeed/1":
        return {"format": kind, "algorithm": controller.ALGORITHM, "rank": 0, "world_size": 1, "zero_stage": 0,
                "wrapper": wrapper, "schedule": schedule_state, "values": values, "stepped": False}
    assert kind == "gqc_dist.torchtitan/1"
    return {"format": kind, "wrapper": wrapper, "schedule": schedule_state, "values": values}


def params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", [FORMAT, "gqc_dist.wrapper/1", "gqc_dist.integrations/1", "gqc_dist.deepspeed/1",
                                  "gqc_dist.torchtitan/1"])
@pytest.mark.parametrize("saved_at", [7, 10])
def test_every_envelope_resumes_as_the_uninterrupted_run(tmp_path, kind, saved_at):
    model, optimizer, session = build()
    whole = train(model, session, BATCHES)
    final = params(model)

    model, optimizer, session = build()
    before = train(model, session, BATCHES[:saved_at])
    if kind == FORMAT:
        session.write(str(tmp_path))  # the file every front end writes
        state = read(str(tmp_path))
    else:
        state = legacy(session, kind)
    model_state, optimizer_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    schedule_state = copy.deepcopy(session.schedule.state_dict())

    model, optimizer, session = build()
    model.load_state_dict(model_state)
    if kind != "gqc_dist.wrapper/1":  # the framework restores its optimizer; wrapper/1 carries it
        optimizer.load_state_dict(optimizer_state)
    else:  # a bare wrapper state: its user kept the schedule beside it
        session.schedule.load_state_dict(schedule_state)
    session.load_state_dict(state)
    after = train(model, session, BATCHES[saved_at:])
    assert before + after == whole and any(whole) and not all(whole)
    assert all(torch.equal(a, b) for a, b in zip(params(model), final))


def test_the_file_is_this_ranks_and_versioned(tmp_path):
    model, _, session = build()
    train(model, session, BATCHES[:3])
    path = session.write(str(tmp_path), engine={"zero_stage": 2})
    assert path == state_path(str(tmp_path), 0) == str(tmp_path / "gqc_state_rank0.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["format"] == FORMAT == "gqc_dist.state/2" and saved["engine"] == {"zero_stage": 2}
    assert saved["algorithm"] == "gnts" and saved["wrapper"]["optimizer"] is None and len(saved["values"]) == 1


@pytest.mark.parametrize("state, message", [
    ({"format": "something/1"}, "not GQC state (format 'something/1', expected 'gqc_dist.state/2'"),
    ([1, 2], "not GQC state (format 'list'"),
])
def test_a_foreign_state_is_refused_in_one_line(state, message):
    _, _, session = build()
    with pytest.raises(CheckpointError) as error:
        session.load_state_dict(state)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_another_algorithm_or_a_missing_schedule_is_refused_before_anything_changes():
    model, _, session = build()
    train(model, session, BATCHES[:5])
    state = session.state_dict()
    fresh_model, _, fresh = build()
    other = dict(state, algorithm="cbc")
    with pytest.raises(CheckpointError, match=r"^the checkpoint was saved by GQC algorithm 'cbc'; this run has 'gnts'$"):
        fresh.load_state_dict(other)
    with pytest.raises(CheckpointError, match="saved without a gradient_quality_control.schedule; this run has one"):
        fresh.load_state_dict(dict(state, schedule=None))
    assert fresh.controller.num_batches == 0  # nothing changed


def test_each_step_advances_the_schedule_once_and_the_decision_says_so():
    model, _, session = build()
    epochs = []
    for batch in BATCHES[:8]:
        loss_of(model, batch).backward()
        decision = session.micro_step()
        epochs.append((decision.stepped, session.schedule.state_dict()["gradient_norm_threshold"]["last_epoch"]))
    steps = sum(stepped for stepped, _ in epochs)
    assert steps > 1 and epochs[-1][1] == steps  # one schedule step per optimizer step
    assert all(epoch == sum(s for s, _ in epochs[:i + 1]) for i, (_, epoch) in enumerate(epochs))
    assert session.decision is decision
