"""Direct unit tests of the pure modules: rules, packet, grad_norms, reduction, checkpoint_state.

Every expected value is computed here by hand (plain Python / torch / scipy), never by the module
under test. Multi-rank checks run on real processes through ``distributed_harness``.
"""

import math
import statistics

import pytest
import scipy.stats
import torch
import torch.distributed as dist

from distributed_harness import run_distributed
from gqc_dist.core import checkpoint_state, rules
from gqc_dist.errors import CheckpointError, GQCConfigError
from gqc_dist.core.grad_norms import WeightCache, local_group_sums, per_tensor_norms
from gqc_dist.core.packet import StatsPacket
from gqc_dist.core.reduction import POLICY_KEY, Piece, Replicated, Sharded, group_policy, resolve_piece

CPU = torch.device("cpu")


# ================================================================ rules
@pytest.mark.parametrize(
    "norm, threshold, draws, max_draws, expected",
    [
        (0.5, 0.5, 1, 8, True),  # equal to the threshold steps
        (0.5000001, 0.5, 1, 8, False),  # just above does not
        (0.25, 0.5, 3, 8, True),
        (9.0, 0.5, 7, 8, False),  # one draw short of the budget
        (9.0, 0.5, 8, 8, True),  # max_draws forces
        (9.0, 0.5, 9, 8, True),
        (0.0, 0.0, 1, 1, True),
    ],
)
def test_gnts_should_step_boundaries(norm, threshold, draws, max_draws, expected):
    assert rules.gnts_should_step(norm, threshold, draws, max_draws) is expected


@pytest.mark.parametrize(
    "draws, effective, logical, max_draws, expected",
    [
        (4, 8, 32, 64, True),  # 4 * 8 == 32: reached exactly
        (3, 8, 32, 64, False),  # 24 < 32
        (3, 8, 23.5, 64, True),
        (2, 8, 1000, 2, True),  # max_draws forces
        (1, 8, 1000, 2, False),
    ],
)
def test_sbc_should_step_boundaries(draws, effective, logical, max_draws, expected):
    assert rules.sbc_should_step(draws, effective, logical, max_draws) is expected


@pytest.mark.parametrize("norms", [[1.0, 2.0, 3.0, 4.0], [0.3, 0.3], [2.0, 0.5, 7.25], [1e-3, 2e-3, 5e-3]])
def test_gns_estimate_is_unbiased_variance_over_mean_square(norms):
    n = len(norms)
    mean = sum(norms) / n
    variance = sum((x - mean) ** 2 for x in norms) / (n - 1)  # unbiased
    mean_square = sum(x * x for x in norms) / n
    expected = variance / (mean_square + 1e-8)
    got = rules.gns_estimate(norms)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)  # the module works in float32


def test_gns_estimate_hand_value():
    # [1, 2, 3, 4]: mean 2.5, unbiased variance 5/3, mean square 7.5
    assert rules.gns_estimate([1.0, 2.0, 3.0, 4.0]) == pytest.approx((5 / 3) / 7.5, rel=1e-6)


@pytest.mark.parametrize("norms", [[], [3.0]])
def test_gns_estimate_is_nan_below_two_samples(norms):
    assert math.isnan(rules.gns_estimate(norms))


def test_gns_should_step_boundaries():
    assert rules.gns_should_step(0.75, 0.25, 3, 64)  # 0.75 <= 3 * 0.25
    assert not rules.gns_should_step(0.76, 0.25, 3, 64)
    assert rules.gns_should_step(5.0, 0.25, 4, 4)  # max_draws forces
    assert not rules.gns_should_step(math.nan, 0.25, 1, 4)


def test_mht_running_mean_seeds_with_first_mean_then_blends():
    first = rules.mht_running_mean(None, [2.0, 4.0, 9.0], beta=0.1)
    assert first == pytest.approx(5.0)
    second = rules.mht_running_mean(first, [1.0, 3.0], beta=0.1)
    assert second == pytest.approx(5.0 * 0.9 + 2.0 * 0.1)
    assert rules.mht_running_mean(7.0, [3.0], beta=1.0) == pytest.approx(3.0)
    assert rules.mht_running_mean(7.0, [3.0], beta=0.0) == pytest.approx(7.0)


def _t_half_width(values, confidence):
    """Half width of the two-sided t-interval of the mean, by hand."""
    n = len(values)
    sem = statistics.stdev(values) / math.sqrt(n)
    return scipy.stats.t.ppf((1 + confidence) / 2, df=n - 1) * sem


@pytest.mark.parametrize("judgment", [[3.0], []])
def test_mht_fewer_than_two_values_never_steps(judgment):
    assert rules.mht_should_step(judgment, num_draws=10, max_draws=2, confidence_level=0.5,
                                 percent_error_threshold=100.0) is False


def test_mht_max_draws_forces_with_two_values():
    assert rules.mht_should_step([1.0, 100.0], num_draws=4, max_draws=4, confidence_level=0.99,
                                 percent_error_threshold=0.0) is True


@pytest.mark.parametrize("judgment, confidence", [
    ([1.0, 1.01, 0.99, 1.0], 0.95),
    ([2.0, 2.3, 1.9, 2.1, 2.05, 1.95], 0.9),
    ([5.0, 4.0], 0.8),
])
def test_mht_tight_interval_steps_and_wide_one_does_not(judgment, confidence):
    mean = sum(judgment) / len(judgment)
    relative_half = _t_half_width(judgment, confidence) / mean
    # the interval lies within mean * (1 +- pct) iff half width <= mean * pct
    assert rules.mht_should_step(judgment, 1, 100, confidence, relative_half * 1.01) is True
    assert rules.mht_should_step(judgment, 1, 100, confidence, relative_half * 0.99) is False


@pytest.mark.parametrize("norm, target, expected", [
    (4.0, 2.0, 0.5),
    (0.25, 1.0, 4.0),
    (0.0, 1.0, 0.0),
    (math.inf, 1.0, 0.0),
    (math.nan, 1.0, 0.0),
])
def test_gnr_rescale_factor(norm, target, expected):
    assert rules.gnr_rescale_factor(norm, target) == expected


# ================================================================ packet
def _fill_packet(packet, rank):
    """The same mixed packet on every rank, with rank-dependent values."""
    packet.add_sum("s_dev", torch.tensor([rank + 1.0, 10.0 * (rank + 1)]))
    packet.add_root("r_host", [7.5, 2.0] if rank == 0 else [99.0, -99.0])
    packet.add_per_rank("p_dev", torch.tensor([float(rank), rank + 0.5]))
    packet.add_root("r_dev", torch.tensor([[1.25], [3.0]]) if rank == 0 else torch.tensor([[50.0], [60.0]]))
    packet.add_per_rank("p_host", [100.0 + rank])
    packet.add_sum("s_dev2", torch.tensor([0.125 * (rank + 1)], dtype=torch.float32))


def test_packet_one_process_round_trips_in_field_order(monkeypatch):
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(1) or real(*a, **k))
    packet = StatsPacket(CPU)
    assert (packet.rank, packet.world_size) == (0, 1)
    _fill_packet(packet, 0)
    out = packet.reduce()
    assert list(out) == ["s_dev", "r_host", "p_dev", "r_dev", "p_host", "s_dev2"]
    assert out == {"s_dev": [1.0, 10.0], "r_host": [7.5, 2.0], "p_dev": [[0.0, 0.5]],
                   "r_dev": [1.25, 3.0], "p_host": [[100.0]], "s_dev2": [0.125]}
    assert calls == []  # nothing to reduce on one process


def test_packet_only_host_values_and_empty_packet():
    packet = StatsPacket(CPU)
    packet.add_root("a", [1.0, 2.0])
    packet.add_per_rank("b", [3.0])
    assert packet.reduce() == {"a": [1.0, 2.0], "b": [[3.0]]}
    assert StatsPacket(CPU).reduce() == {}


def _packet_two_ranks(rank, world_size):
    calls = []
    real = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):  # instrumentation: the real collective still runs
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        first = StatsPacket(CPU)
        _fill_packet(first, rank)
        out = first.reduce()
        after_first = len(calls)
        second = StatsPacket(CPU)
        second.add_per_rank("only", [rank * 2.0, -1.0])
        out2 = second.reduce()
    finally:
        dist.all_reduce = real
    return out, out2, after_first, len(calls)


def test_packet_two_ranks_sum_root_per_rank_one_all_reduce_each():
    results = run_distributed(_packet_two_ranks, 2)
    expected = {"s_dev": [1.0 + 2.0, 10.0 + 20.0], "r_host": [7.5, 2.0], "p_dev": [[0.0, 0.5], [1.0, 1.5]],
                "r_dev": [1.25, 3.0], "p_host": [[100.0], [101.0]], "s_dev2": [0.125 + 0.25]}
    for rank, (out, out2, after_first, total) in enumerate(results):
        assert list(out) == list(expected), rank
        assert out == expected, rank
        assert out2 == {"only": [[0.0, -1.0], [2.0, -1.0]]}, rank
        assert after_first == 1 and total == 2, rank


# ================================================================ grad_norms
def test_per_tensor_norms_match_vector_norm():
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(5, 7, generator=generator), torch.zeros(4, 4),
               torch.randn(2, 3, 4, generator=generator).to(torch.bfloat16),
               torch.randn(3, generator=generator).to(torch.float16), torch.tensor([3.0, 4.0])]
    got = per_tensor_norms(tensors)
    assert got.dtype == torch.float32 and got.shape == (len(tensors),)
    expected = [torch.linalg.vector_norm(t.double()).item() for t in tensors]
    for g, e in zip(got.tolist(), expected):
        assert g == pytest.approx(e, rel=1e-6, abs=1e-12)
    assert got[-1].item() == 5.0
    assert per_tensor_norms([]).numel() == 0


def test_per_tensor_norms_of_float64_tensors():  # a float64 model once crashed its first step()
    tensors = [torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([1.0, 2.0, 2.0])]
    assert per_tensor_norms(tensors).tolist() == pytest.approx([5.0, 3.0], rel=1e-6)


def _pieces():
    generator = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(n, generator=generator) for n in (6, 4, 9, 3))
    pieces = [(0, Piece(a, 1, True)), (1, Piece(b, 2, False)), (0, Piece(c, 4, True)),
              (2, Piece(d, 1, False))]
    return pieces, [float(t.double().pow(2).sum()) for t in (a, b, c, d)]


def test_local_group_sums_weighted_and_fingerprint_match_hand_sums():
    pieces, (sa, sb, sc, sd) = _pieces()
    weights = WeightCache().get(pieces, 3, CPU, layout_version=1)
    weighted, fingerprint = local_group_sums(pieces, 3, CPU, weights)
    assert weighted.dtype == torch.float64 and fingerprint.dtype == torch.float64
    assert weighted.shape == (3,) and fingerprint.shape == (1,)
    expected = [sa + sc / 4, sb / 2, sd]
    for got, want in zip(weighted.tolist(), expected):
        assert got == pytest.approx(want, rel=1e-6)
    assert fingerprint.item() == pytest.approx(sa + sc, rel=1e-6)  # pieces with check_replicated


def test_local_group_sums_without_pieces_are_zero():
    weights = WeightCache().get([], 2, CPU, layout_version=None)
    weighted, fingerprint = local_group_sums([], 2, CPU, weights)
    assert weighted.tolist() == [0.0, 0.0] and fingerprint.tolist() == [0.0]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_piece_makes_its_group_nonfinite(bad):
    pieces, _ = _pieces()
    pieces[1][1].tensor[2] = bad  # group 1
    weights = WeightCache().get(pieces, 3, CPU, layout_version=None)
    weighted, _ = local_group_sums(pieces, 3, CPU, weights)
    assert not math.isfinite(weighted[1].item())


def test_weight_cache_reuses_while_layout_version_is_unchanged():
    pieces, _ = _pieces()
    cache = WeightCache()
    first = cache.get(pieces, 3, CPU, layout_version=7)
    # documented contract: same version -> the cached matrix, pieces not looked at
    assert cache.get(pieces, 3, CPU, layout_version=7) is first
    # a new version with an identical layout is not rebuilt either
    same = [(g, Piece(p.tensor.clone(), p.rho, p.check_replicated)) for g, p in pieces]
    assert cache.get(same, 3, CPU, layout_version=8) is first
    # a new version with another rho is rebuilt with the new weight
    changed = list(pieces)
    changed[1] = (1, Piece(pieces[1][1].tensor, 8, False))
    rebuilt = cache.get(changed, 3, CPU, layout_version=9)
    assert rebuilt is not first
    assert rebuilt[1, 1].item() == 1 / 8 and first[1, 1].item() == 1 / 2
    # a changed number of groups under the same version is rebuilt
    assert cache.get(changed, 4, CPU, layout_version=9).shape == (4, 5)


def test_weight_cache_matrix_by_hand():
    pieces, _ = _pieces()
    matrix = WeightCache().get(pieces, 3, CPU)
    expected = torch.tensor([[1.0, 0, 0, 1], [0, 0.5, 0, 0], [0.25, 0, 0, 1], [0, 0, 1.0, 0]],
                            dtype=torch.float64)
    assert torch.equal(matrix, expected)


def test_weight_cache_without_layout_version_always_compares_pieces():
    pieces, (sa, sb, sc, sd) = _pieces()
    cache = WeightCache()
    first = cache.get(pieces, 3, CPU, layout_version=None)
    assert cache.get(pieces, 3, CPU, layout_version=None) is first
    changed = list(pieces)
    changed[0] = (0, Piece(pieces[0][1].tensor, 2, False))
    rebuilt = cache.get(changed, 3, CPU, layout_version=None)
    assert rebuilt is not first
    weighted, fingerprint = local_group_sums(changed, 3, CPU, rebuilt)
    assert weighted[0].item() == pytest.approx(sa / 2 + sc / 4, rel=1e-6)
    assert fingerprint.item() == pytest.approx(sc, rel=1e-6)


# ================================================================ reduction
def test_resolve_piece_one_process():
    grad = torch.randn(3)
    piece = resolve_piece(grad, None, distributed=False)
    assert piece.tensor is grad and piece.rho == 1 and piece.check_replicated is False
    assert resolve_piece(grad, Replicated(), False)[1:] == (1, True)
    assert resolve_piece(grad, Sharded(), False)[1:] == (1, False)


def test_group_policy_explicit_mode_and_bad_policy():
    replicated, sharded = Replicated(), Sharded()
    assert group_policy({POLICY_KEY: replicated}, None) is replicated
    assert group_policy({POLICY_KEY: sharded}, "replicated") is sharded  # the explicit key wins
    assert group_policy({}, "replicated") == Replicated()
    assert group_policy({}, "sharded") == Sharded()
    assert group_policy({}, None) is None
    assert group_policy({POLICY_KEY: None}, None) is None
    with pytest.raises(GQCConfigError, match="'gqc_reduction'.*str"):
        group_policy({POLICY_KEY: "replicated"}, None)


def _resolve_two_ranks(rank, world_size):
    grad = torch.full((4,), float(rank))
    singles = [dist.new_group([r]) for r in range(world_size)]  # every rank creates every group
    mine = singles[rank]
    out = {
        "plain": resolve_piece(grad, None, True)[1:],
        "replicated": resolve_piece(grad, Replicated(), True)[1:],
        "sharded": resolve_piece(grad, Sharded(), True)[1:],
        "replicated_self": resolve_piece(grad, Replicated(mine), True)[1:],
        "sharded_self": resolve_piece(grad, Sharded(mine), True)[1:],
        "tensor_kept": resolve_piece(grad, Replicated(), True).tensor is grad,
    }
    return out


def test_resolve_piece_two_ranks():
    for out in run_distributed(_resolve_two_ranks, 2):
        assert out["plain"] == (2, True)  # DDP assumption: rho = world, verified
        assert out["replicated"] == (2, True)
        assert out["sharded"] == (1, False)  # world / group size = 2 / 2
        assert out["replicated_self"] == (1, False)  # a group of one does not span the world
        assert out["sharded_self"] == (2, False)  # 2 / 1: the other rank holds an identical copy
        assert out["tensor_kept"] is True


# ================================================================ checkpoint_state
def test_new_counters():
    counters = checkpoint_state.new_counters()
    assert set(counters) == set(checkpoint_state.COUNTERS)
    # the values that are unknown before the first decision / step, and the plain counts
    unknown = {"last_num_draws", "last_grad_norm", "mean_grad_norm"}
    counts = {"num_batches", "num_steps", "num_draws", "nonfinite_micro_batches", "dropped_windows",
              "dropped_micro_batches"}
    assert unknown | counts <= set(counters)
    assert all(counters[name] is None for name in unknown)
    assert all(type(value) is int and value == 0 for name, value in counters.items() if name not in unknown)
    assert checkpoint_state.new_counters() is not counters  # a fresh dict each time


def _good_sd(num_draws=0):
    counters = checkpoint_state.new_counters()
    counters.update(num_batches=5, num_steps=2, num_draws=num_draws, last_num_draws=3)
    return {"format": checkpoint_state.FORMAT, "algorithm": "gnts", "max_draws": 4, "counters": counters,
            "algorithm_state": {}, "optimizer": {"state": {}, "param_groups": []},
            "accumulated_grads": ["g"] if num_draws else None}


def test_validate_accepts_good_state_dicts_and_checks_accumulated():
    seen = []
    checkpoint_state.validate(_good_sd(), "gnts", 4, seen.append)
    assert seen == []  # no gradients at a window boundary
    checkpoint_state.validate(_good_sd(num_draws=3), "gnts", 4, seen.append)
    assert seen == [["g"]]


def _with(sd, **changes):
    out = dict(sd)
    out.update(changes)
    return out


def _with_counter(name, value, num_draws=0):
    sd = _good_sd(num_draws)
    sd["counters"] = {**sd["counters"], name: value}
    return sd


def _refusals():
    good = _good_sd()
    missing = dict(good)
    del missing["optimizer"], missing["counters"]
    yield "missing keys", missing, r"missing keys \['counters', 'optimizer'\]"
    yield "format", _with(good, format="torch-gqc/0"), "unknown state dict format 'torch-gqc/0'"
    yield "algorithm", _with(good, algorithm="sbc"), "saved by algorithm 'sbc'.*'gnts'"
    counters = dict(good["counters"])
    del counters["num_steps"]
    yield "counter missing", _with(good, counters=counters), "'counters' must have exactly the keys"
    yield "counter extra", _with(good, counters={**good["counters"], "x": 1}), "exactly the keys"
    yield "counters not a dict", _with(good, counters=[1]), "exactly the keys"
    yield "negative counter", _with_counter("num_steps", -1), "counter 'num_steps' must be an int >= 0, got -1"
    yield "float counter", _with_counter("num_batches", 2.0), "counter 'num_batches' must be an int"
    yield "bool counter", _with_counter("dropped_windows", True), "counter 'dropped_windows'"
    yield "num_draws at max", _with_counter("num_draws", 4, num_draws=4), "num_draws=4.*max_draws is 4"
    yield "grads absent", _with(_good_sd(num_draws=2), accumulated_grads=None), "num_draws=2 but no accumulated"
    yield "grads present", _with(good, accumulated_grads=["g"]), "num_draws=0 but unexpected accumulated"
    yield "noise state", _with(good, noise_state={"ema": 1.0}), "'noise_state' must have exactly the keys"


@pytest.mark.parametrize("label, sd, needle", list(_refusals()), ids=[r[0] for r in _refusals()])
def test_validate_refuses_naming_the_problem(label, sd, needle):
    with pytest.raises(CheckpointError, match=needle):
        checkpoint_state.validate(sd, "gnts", 4, lambda grads: None)


def test_validate_passes_on_the_adapter_refusal():
    def refuse(grads):
        raise CheckpointError("accumulated gradient shapes differ")

    with pytest.raises(CheckpointError, match="shapes differ"):
        checkpoint_state.validate(_good_sd(num_draws=1), "gnts", 4, refuse)


def _torch_gqc_sd(num_draws=0):
    values = {"num_batches": 9, "num_steps": 3, "num_draws": num_draws, "last_num_draws": 4,
              "last_grad_norm": 0.42, "history": [1.0]}
    return {"wrapper_states": {k: {"value": v, "flag": "optional"} for k, v in values.items()},
            "optimizer_states": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}


def test_upgrade_torch_gqc_state_dict():
    seen = []
    sd = _torch_gqc_sd()
    upgraded = checkpoint_state.upgrade_torch_gqc(sd, "gnts", 6, lambda v: seen.append(v) or {"k": 1})
    counters = checkpoint_state.new_counters()
    counters.update(num_batches=9, num_steps=3, num_draws=0, last_num_draws=4, last_grad_norm=0.42)
    assert upgraded == {"format": checkpoint_state.FORMAT, "algorithm": "gnts", "max_draws": 6,
                        "counters": counters, "algorithm_state": {"k": 1},
                        "optimizer": sd["optimizer_states"], "accumulated_grads": None}
    assert seen == [{"num_batches": 9, "num_steps": 3, "num_draws": 0, "last_num_draws": 4,
                     "last_grad_norm": 0.42, "history": [1.0]}]
    checkpoint_state.validate(upgraded, "gnts", 6, lambda grads: None)  # loads as is


def test_upgrade_leaves_own_format_and_refuses_bad_input():
    own = _good_sd()
    assert checkpoint_state.upgrade_torch_gqc(own, "gnts", 4, dict) is own
    with pytest.raises(CheckpointError, match="mid-window .num_draws=2"):
        checkpoint_state.upgrade_torch_gqc(_torch_gqc_sd(num_draws=2), "gnts", 4, dict)
    with pytest.raises(CheckpointError, match="must be a dict, got list"):
        checkpoint_state.upgrade_torch_gqc([1], "gnts", 4, dict)
    with pytest.raises(CheckpointError, match="malformed"):
        checkpoint_state.upgrade_torch_gqc({"wrapper_states": {"num_steps": 3}}, "gnts", 4, dict)
    with pytest.raises(CheckpointError, match="malformed"):
        checkpoint_state.upgrade_torch_gqc({"wrapper_states": {}}, "gnts", 4, dict)
