"""Single-process behaviour of the wrapper: the torch-gqc defects it fixes, each against an oracle."""

import copy
import io
import math

import pytest
import torch
import torch_schedule_anything as tsa

import gqc_dist
from gqc_dist import (
    CheckpointError,
    GQCConfigError,
    GQCTypeError,
    GQCUsageError,
    OptimizerWrapperGNTS,
)
from reference import loss_of, make_mlp, micro_batches, reference_gnts

THRESHOLD = 0.6
MAX_DRAWS = 6


def run_gnts(model, wrapper, batches, poison=(), scaler=None):
    decisions, norms = [], []
    for index, batch in enumerate(batches):
        loss = loss_of(model, batch)
        (scaler.scale(loss) if scaler else loss).backward()
        if index in poison:
            next(model.parameters()).grad.fill_(float("nan"))
        decisions.append(wrapper.step())
        norms.append(wrapper.statistics()["mean_grad_norm"])
    return decisions, norms


def gnts(model, **kwargs):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    wrapper = OptimizerWrapperGNTS(optimizer, max_batch_draws=MAX_DRAWS, **kwargs)
    wrapper.param_groups[0]["gradient_norm_threshold"] = THRESHOLD
    return wrapper


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same_run(decisions, norms, ref_decisions, ref_norms, model, ref_model, tol=1e-6):
    assert decisions == ref_decisions
    assert True in decisions and False in decisions  # the run exercised both branches
    for got, want in zip(norms, ref_norms):
        if math.isnan(want):
            continue
        assert got == pytest.approx(want, rel=1e-6)  # fp32 per-tensor norms
    for a, b in zip(params(model), params(ref_model)):
        torch.testing.assert_close(a, b, atol=tol, rtol=0)


def test_a_step_frees_the_window_gradients():
    """The wrapper reuses its per-window layout of the gradients, but keeps no reference to them
    once the window ends: zero_grad(set_to_none) really frees them."""
    import weakref

    model = make_mlp()
    wrapper = gnts(model)
    wrapper.param_groups[0]["gradient_norm_threshold"] = 1e9  # step at the first micro-step
    loss_of(model, micro_batches(1)[0]).backward()
    grads = [weakref.ref(p.grad) for p in model.parameters()]
    assert wrapper.step()
    assert all(p.grad is None for p in model.parameters())
    assert all(ref() is None for ref in grads)


def test_gnts_matches_hand_written_reference():
    batches = micro_batches(60)
    model, ref_model = make_mlp(), make_mlp()
    decisions, norms = run_gnts(model, gnts(model), batches)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.01)
    ref = reference_gnts(ref_model, ref_opt, batches, THRESHOLD, MAX_DRAWS)
    assert_same_run(decisions, norms, *ref, model, ref_model)


# ---------------------------------------------------------------- host syncs and norm passes
class _Counter:
    def __init__(self, monkeypatch, owner, names):
        self.count = 0
        for name in names:
            original = getattr(owner, name)

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(owner, name, counted)


@pytest.mark.parametrize("algorithm", ["gnts", "gnr", "sbc"])
def test_one_host_sync_and_one_fused_norm_pass_per_micro_step(monkeypatch, algorithm):
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    wrapper = {
        "gnts": lambda: OptimizerWrapperGNTS(optimizer, max_batch_draws=4),
        "gnr": lambda: gqc_dist.OptimizerWrapperGNR(optimizer),
        "sbc": lambda: gqc_dist.OptimizerWrapperSBC(optimizer, physical_batch_size=4, max_batch_draws=3),
    }[algorithm]()
    if algorithm == "gnts":
        wrapper.param_groups[0]["gradient_norm_threshold"] = 0.5
    if algorithm == "sbc":
        wrapper.param_groups[0]["logical_batch_size"] = 8
    decisions = []
    for batch in micro_batches(12):
        loss_of(model, batch).backward()
        with monkeypatch.context() as patch:
            syncs = _Counter(patch, torch.Tensor, ["item", "tolist", "__bool__", "__float__", "__int__"])
            norms = _Counter(patch, torch, ["_foreach_norm"])
            vector_norms = _Counter(patch, torch.linalg, ["vector_norm", "norm"])
            tensor_norms = _Counter(patch, torch.Tensor, ["norm"])
            decisions.append(wrapper.step())
        assert syncs.count == 1, f"{syncs.count} host syncs in one micro-step"
        assert norms.count == 1, f"{norms.count} fused norm passes in one micro-step"
        assert vector_norms.count == tensor_norms.count == 0
    assert True in decisions
    assert algorithm == "gnr" or False in decisions


# ---------------------------------------------------------------- non-finite gradients
def test_nan_micro_batch_drops_window_and_never_reaches_optimizer():
    batches = micro_batches(40)
    poison = {5, 6, 23}
    model, ref_model = make_mlp(), make_mlp()
    wrapper = gnts(model)
    stepped_params = []
    original_step = wrapper.optimizer.step

    def checking_step(*args, **kwargs):
        for p in model.parameters():
            assert torch.isfinite(p.grad).all(), "non-finite gradient reached optimizer.step()"
        stepped_params.append(True)
        return original_step(*args, **kwargs)

    wrapper.optimizer.step = checking_step
    decisions, norms = run_gnts(model, wrapper, batches, poison=poison)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.01)
    ref = reference_gnts(ref_model, ref_opt, batches, THRESHOLD, MAX_DRAWS, poison=poison)
    assert_same_run(decisions, norms, *ref, model, ref_model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    stats = wrapper.statistics()
    assert stats["nonfinite_micro_batches"] == 3
    assert stats["dropped_windows"] == 3
    assert len(stepped_params) == stats["num_steps"] > 0


# ---------------------------------------------------------------- AMP GradScaler
def test_grad_scaler_decisions_see_unscaled_gradients():
    """A scaled run is bit-identical to the unscaled reference: scales are powers of two."""
    batches = micro_batches(50)
    model, ref_model = make_mlp(), make_mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=3)
    wrapper = gnts(model, grad_scaler=scaler)
    decisions, norms = run_gnts(model, wrapper, batches, scaler=scaler)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.01)
    ref = reference_gnts(ref_model, ref_opt, batches, THRESHOLD, MAX_DRAWS)
    assert_same_run(decisions, norms, *ref, model, ref_model, tol=0)
    # the wrapper updates the scaler once per optimizer step: it grew every 3 steps
    steps = wrapper.num_steps
    assert scaler.get_scale() == 2.0**14 * 2.0 ** (steps // 3)


def test_grad_scaler_overflow_drops_window_and_backs_off():
    batches = micro_batches(30)
    model, ref_model = make_mlp(), make_mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    wrapper = gnts(model, grad_scaler=scaler)
    decisions, norms = run_gnts(model, wrapper, batches, poison={9}, scaler=scaler)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.01)
    ref = reference_gnts(ref_model, ref_opt, batches, THRESHOLD, MAX_DRAWS, poison={9})
    assert_same_run(decisions, norms, *ref, model, ref_model, tol=0)
    assert scaler.get_scale() == 2.0**9
    assert wrapper.statistics()["dropped_windows"] == 1


def test_fp16_autocast_overflow_is_caught():
    """A real fp16 overflow (not an injected NaN) under autocast is dropped like any non-finite."""
    model = make_mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    wrapper = gnts(model, grad_scaler=scaler)
    x = torch.full((4, 8), 3.0e4)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(x).float().pow(2).mean()
    before = params(model)
    scaler.scale(loss).backward()
    assert not wrapper.step()
    assert wrapper.statistics()["nonfinite_micro_batches"] == 1
    assert scaler.get_scale() == 2.0**15
    for a, b in zip(before, params(model)):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- checkpoints
def _make(algorithm, model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    if algorithm == "gnts":
        return gqc_dist.make_gnts_with_cosine_annealing_schedule(
            optimizer, 40, 4, initial_threshold=0.5, final_threshold=0.2, max_batch_draws=6)
    if algorithm == "gns":
        return gqc_dist.make_gns_default(optimizer, 0.05, 40, 4, max_batch_draws=6)
    if algorithm == "mht":
        return gqc_dist.make_mht_with_warmup_schedule(optimizer, 0.9, 0.5, 40, 4, max_batch_draws=6)
    if algorithm == "sbc":
        return gqc_dist.make_sbc_with_polynomial_schedule(optimizer, 4, 8, 24, 40, 4, max_batch_draws=6)
    raise AssertionError(algorithm)


def _train(model, wrapper, schedule, batches, algorithm, draws=None):
    decisions = []
    for batch in batches:
        loss = loss_of(model, batch)
        loss.backward()
        stepped = wrapper.step(loss.item()) if algorithm == "mht" else wrapper.step()
        if stepped:
            schedule.step()
        decisions.append(stepped)
        if draws is not None:
            draws.append(wrapper.num_draws)
    return decisions


@pytest.mark.parametrize("algorithm", ["gnts", "gns", "mht", "sbc"])
def test_resume_mid_window_equals_uninterrupted_bitwise(algorithm):
    batches = micro_batches(60)
    model = make_mlp()
    wrapper, schedule = _make(algorithm, model)
    draws = []
    full = _train(model, wrapper, schedule, batches, algorithm, draws)
    final = params(model)
    cut = next(i + 1 for i in range(20, 60) if draws[i] > 1)  # mid-window, 2+ draws held

    model = make_mlp()
    wrapper, schedule = _make(algorithm, model)
    first = _train(model, wrapper, schedule, batches[:cut], algorithm)
    assert wrapper.num_draws > 0, "the cut must fall mid-window for this test to mean anything"
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "gqc": wrapper.state_dict(),
                "schedule": schedule.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    model = make_mlp(seed=123)  # different init: everything must come from the checkpoint
    wrapper, schedule = _make(algorithm, model)
    model.load_state_dict(saved["model"])
    wrapper.load_state_dict(saved["gqc"])
    schedule.load_state_dict(saved["schedule"])
    second = _train(model, wrapper, schedule, batches[cut:], algorithm)
    assert first + second == full
    assert True in full and False in full
    for a, b in zip(final, params(model)):
        assert torch.equal(a, b)


def test_state_dict_is_a_deep_copy():
    model = make_mlp()
    wrapper = gnts(model)
    for batch in micro_batches(9):
        loss_of(model, batch).backward()
        wrapper.step()
    assert wrapper.num_draws > 0 and wrapper.num_steps > 0
    saved = wrapper.state_dict()
    snapshot = copy.deepcopy(saved)
    for batch in micro_batches(9, seed=5):
        loss_of(model, batch).backward()
        wrapper.step()
    state = saved["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(state, snapshot["optimizer"]["state"][0]["exp_avg"])
    assert saved["counters"] == snapshot["counters"]
    for got, want in zip(saved["accumulated_grads"][0], snapshot["accumulated_grads"][0]):
        assert torch.equal(got, want)


def _corruptions(sd):
    yield "missing keys", {k: v for k, v in sd.items() if k != "counters"}, "missing keys"
    yield "format", {**sd, "format": "other/9"}, "format"
    yield "algorithm", {**sd, "algorithm": "gns"}, "algorithm 'gns'"
    grads = copy.deepcopy(sd["accumulated_grads"])
    grads[0][0] = torch.zeros(3, 3)
    yield "grad shape", {**sd, "accumulated_grads": grads}, r"accumulated_grads\[0\]\[0\]"
    yield "grads dropped", {**sd, "accumulated_grads": None}, "no accumulated gradients"
    yield "negative counter", {**sd, "counters": {**sd["counters"], "num_steps": -1}}, "num_steps"
    yield "too many draws", {**sd, "counters": {**sd["counters"], "num_draws": 99}}, "max_draws"
    opt = copy.deepcopy(sd["optimizer"])
    opt["param_groups"] = opt["param_groups"] * 2
    yield "optimizer", {**sd, "optimizer": opt}, "optimizer state"
    yield "not a dict", [1, 2], "must be a dict"


def test_corrupt_checkpoints_are_refused_and_nothing_is_lost():
    model = make_mlp()
    wrapper = gnts(model)
    for batch in micro_batches(9):
        loss_of(model, batch).backward()
        wrapper.step()
    good = wrapper.state_dict()
    before = wrapper.state_dict()
    grads_before = [p.grad.clone() for p in model.parameters()]
    for label, corrupt, needle in _corruptions(good):
        with pytest.raises(CheckpointError, match=needle):
            wrapper.load_state_dict(corrupt)
        after = wrapper.state_dict()
        assert after["counters"] == before["counters"], label
        for p, g in zip(model.parameters(), grads_before):
            assert torch.equal(p.grad, g), label


def test_torch_gqc_checkpoint_at_boundary_loads_and_mid_window_is_refused():
    gqc = pytest.importorskip("gradient_quality_control")
    model = make_mlp()
    old = gqc.OptimizerWrapperGNTS(torch.optim.SGD(model.parameters(), lr=0.1), max_batch_draws=1)
    loss_of(model, micro_batches(1)[0]).backward()
    assert old.step()
    new = OptimizerWrapperGNTS(torch.optim.SGD(model.parameters(), lr=0.1), max_batch_draws=1)
    new.load_state_dict(old.state_dict())
    assert new.num_steps == 1 and new.num_batches == 1
    sd = old.state_dict()
    sd["wrapper_states"]["num_draws"] = {"value": 2, "flag": "optional"}
    with pytest.raises(CheckpointError, match="mid-window"):
        new.load_state_dict(sd)


# ---------------------------------------------------------------- bad input
def _optimizer():
    return torch.optim.SGD(make_mlp().parameters(), lr=0.1)


@pytest.mark.parametrize(
    "build, error, needle",
    [
        (lambda: OptimizerWrapperGNTS("adam"), GQCTypeError, "torch.optim.Optimizer"),
        (lambda: OptimizerWrapperGNTS(_optimizer(), max_batch_draws=0), GQCConfigError, "max_draws must be >= 1"),
        (lambda: OptimizerWrapperGNTS(_optimizer(), max_batch_draws=-3), GQCConfigError, "max_draws"),
        (lambda: OptimizerWrapperGNTS(_optimizer(), max_batch_draws=2.5), GQCTypeError, "max_draws must be an integer"),
        (lambda: OptimizerWrapperGNTS(_optimizer(), max_batch_draws=True), GQCTypeError, "max_draws"),
        (lambda: OptimizerWrapperGNTS(_optimizer(), distributed_mode="ddp"), GQCConfigError, "distributed_mode"),
        (lambda: OptimizerWrapperGNTS(_optimizer(), grad_scaler=object()), GQCTypeError, "grad_scaler"),
        (lambda: OptimizerWrapperGNTS(_optimizer(), verify="yes"), GQCTypeError, "verify"),
        (lambda: OptimizerWrapperGNTS(torch.optim.SGD(
            [{"params": make_mlp().parameters(), "gradient_norm_threshold": -1.0}], lr=0.1)),
         GQCConfigError, r"param_groups\[0\]\['gradient_norm_threshold'\] must be >= 0"),
        (lambda: OptimizerWrapperGNTS(torch.optim.SGD(
            [{"params": make_mlp().parameters(), "gqc_reduction": "replicated"}], lr=0.1)),
         GQCConfigError, "gqc_reduction"),
        (lambda: gqc_dist.make_gnts_with_cosine_annealing_schedule(_optimizer(), 10, 10),
         GQCConfigError, "num_warmup_steps"),
        (lambda: gqc_dist.make_gnts_with_cosine_annealing_schedule(
            _optimizer(), 100, 10, initial_threshold=-0.5), GQCConfigError, "initial_threshold"),
        (lambda: gqc_dist.make_gnts_with_cosine_annealing_schedule(
            _optimizer(), 100, 10, warmup_multiplier=0), GQCConfigError, "warmup_multiplier"),
        (lambda: gqc_dist.OptimizerWrapperSBC(_optimizer(), physical_batch_size=0), GQCConfigError,
         "physical_batch_size"),
        (lambda: gqc_dist.OptimizerWrapperMHT(_optimizer(), update_beta=2.0), GQCConfigError, "update_beta"),
    ],
)
def test_bad_arguments_name_the_problem(build, error, needle):
    with pytest.raises(error, match=needle):
        build()


def test_scheduled_negative_threshold_is_refused_at_step():
    model = make_mlp()
    wrapper = gnts(model)
    wrapper.param_groups[0]["gradient_norm_threshold"] = -0.1
    loss_of(model, micro_batches(1)[0]).backward()
    with pytest.raises(GQCConfigError, match="gradient_norm_threshold"):
        wrapper.step()


def test_zero_grad_is_refused_with_an_explanation():
    wrapper = OptimizerWrapperGNTS(_optimizer())
    with pytest.raises(GQCUsageError, match="zero_grad"):
        wrapper.zero_grad()
    with pytest.raises(GQCUsageError, match="zero_grad"):
        wrapper.zero_grad(set_to_none=True)


def test_step_without_backward_is_refused():
    wrapper = OptimizerWrapperGNTS(_optimizer())
    with pytest.raises(GQCUsageError, match="backward"):
        wrapper.step()


def test_unknown_schedule_target_names_the_key():
    wrapper = OptimizerWrapperGNTS(_optimizer())
    assert "gradient_norm_threshold" in wrapper.valid_schedule_targets
    with pytest.raises(KeyError, match="gradient_norm_treshold"):
        tsa.constant_schedule(wrapper, 0.5, "gradient_norm_treshold")
    with pytest.raises(GQCConfigError, match="behavior"):
        wrapper.statistics("loud")


def test_statistics_for_logging():
    model = make_mlp()
    wrapper = gnts(model)
    for batch in micro_batches(12):
        loss_of(model, batch).backward()
        wrapper.step()
    stats = wrapper.statistics()
    for key in ("num_batches", "num_steps", "num_draws", "last_num_draws", "mean_grad_norm"):
        assert key in stats
    assert all(isinstance(v, (int, float)) for v in stats.values())
    vital = wrapper.vital_statistics()
    assert set(vital) <= set(stats) and "gradient_norm_threshold" in vital
    assert wrapper.last_grad_norm == pytest.approx(stats["mean_grad_norm"]) or stats["num_draws"] > 0
