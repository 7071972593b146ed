"""Single-process parity of gqc_dist with torch-gqc 0.10.4 (``gradient_quality_control``).

Every algorithm (GNTS, GNS, GNR, SBC, MHT), through every torch-gqc factory and through the
wrapper classes with user-built schedules, is run for ``N_MICRO`` micro-steps with each library
on the same model (small fp32 MLP, fixed seed), the same optimizer (AdamW with weight decay,
SGD with momentum, one- and two-param-group variants with different learning rates) and the
same micro-batch stream (a ``torch.Generator`` with a fixed seed), with the loop exactly as
torch-gqc users write it::

    loss.backward()
    stepped = wrapper.step()          # MHT: wrapper.step(loss.item())
    if stepped:
        schedule.step()

and asserts:

* the step/accumulate decision is identical at every micro-step (first differing index shown);
* the final parameters agree within ``PARAM_ATOL`` (max abs difference recorded per case);
* ``num_steps``, ``num_batches``, ``num_draws``, ``last_num_draws`` are equal and
  ``last_grad_norm`` agrees to float32 precision; the scheduled param-group values are equal;
* both decisions actually occur (GNR always steps: there the rescaling is shown to change the
  trajectory against a plain, un-rescaled run with the same schedules);
* GNTS: ``statistics()["mean_grad_norm"]`` equals, at every micro-step, an independent oracle
  ``||sum of the window's micro-batch gradients|| / draws`` computed from a separate model copy.

A "swap the import" test runs one unchanged user loop (torch-gqc public names and signatures
only) with both modules.
"""

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F
import torch_schedule_anything as tsa

try:
    import gqc_dist
except ImportError:  # running as plain `pytest` without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import gqc_dist

import gradient_quality_control as torch_gqc
from gradient_quality_control.implementations import metric_hypothesis_test as torch_gqc_mht

pytestmark = [
    # torch-schedule-anything schedules stepped through any wrapper trigger torch's LRScheduler
    # "scheduler.step() before optimizer.step()" heuristic (with both libraries alike).
    pytest.mark.filterwarnings(
        "ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`:UserWarning"
    ),
    # GNS: the first draw of a window has one sample; both libraries take torch.var of it (NaN).
    pytest.mark.filterwarnings("ignore:var\\(\\). degrees of freedom:UserWarning"),
]

N_MICRO = 200
SWAP_MICRO = 120
PARAM_ATOL = 1e-6
ORACLE_RTOL = 1e-6
D_IN, HIDDEN, D_OUT, MICRO_BATCH = 8, 16, 4, 8
MODEL_SEED, DATA_SEED = 1234, 7

# torch-gqc 0.10.4 exports MHT only from its implementation module; a torch-gqc user imports both.
TORCH_GQC = SimpleNamespace(
    **{name: getattr(torch_gqc, name) for name in torch_gqc.__all__ if name != "__version__"},
    OptimizerWrapperMHT=torch_gqc_mht.OptimizerWrapperMHT,
    make_mht_with_warmup_schedule=torch_gqc_mht.make_mht_with_warmup_schedule,
)
LIBS = {"torch_gqc": TORCH_GQC, "gqc_dist": gqc_dist}

# max |param difference| per case, filled by the parity tests (shown with `pytest -s`)
OBSERVED_MAX_DIFF: Dict[str, float] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The tensors here are tiny: intra-op threads only add synchronisation (badly so on a busy
    2-core machine). Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- model and data
def make_model() -> torch.nn.Module:
    """Small fp32 MLP with parameters drawn from a fixed-seed generator (global RNG untouched)."""
    model = torch.nn.Sequential(
        torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, D_OUT)
    )
    gen = torch.Generator().manual_seed(MODEL_SEED)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model


def micro_batches(num: int, seed: int = DATA_SEED):
    """The micro-batch stream: a noisy teacher regression drawn from a fixed-seed generator."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(D_IN, D_OUT, generator=gen)
    for _ in range(num):
        x = torch.randn(MICRO_BATCH, D_IN, generator=gen)
        y = torch.tanh(x @ teacher) + 0.5 * torch.randn(MICRO_BATCH, D_OUT, generator=gen)
        yield x, y


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


def _two_groups(model, first: dict, second: dict) -> List[dict]:
    return [
        {"params": list(model[0].parameters()), **first},
        {"params": list(model[2].parameters()), **second},
    ]


OPTIMIZERS: Dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "adamw_2groups": lambda m: torch.optim.AdamW(
        _two_groups(m, {"lr": 1e-2}, {"lr": 3e-3, "weight_decay": 0.05}), weight_decay=0.1
    ),
    "sgd_momentum": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3
    ),
    "sgd_momentum_2groups": lambda m: torch.optim.SGD(
        _two_groups(m, {"lr": 0.05}, {"lr": 0.02}), momentum=0.9, weight_decay=1e-3
    ),
}


# ----------------------------------------------------------------------------- cases
def _set_group_values(wrapper, name: str, values: List[float]) -> None:
    for group, value in zip(wrapper.param_groups, values):
        group[name] = value


def _class_gnts(lib, opt):
    wrapper = lib.OptimizerWrapperGNTS(opt, max_batch_draws=6)
    _set_group_values(wrapper, "gradient_norm_threshold", [1.2, 1.0][: len(opt.param_groups)])
    schedule = tsa.cosine_annealing_with_warmup(
        wrapper, 1.5, 0.8, 5, 120, schedule_target="gradient_norm_threshold"
    )
    return wrapper, schedule


def _class_gns(lib, opt):
    wrapper = lib.OptimizerWrapperGNS(opt, max_batch_draws=4)
    _set_group_values(wrapper, "noise_tolerance", [0.004])
    schedule = tsa.cosine_annealing_with_warmup(wrapper, 1.0, 0.1, 5, 120, schedule_target="lr")
    return wrapper, schedule


def _class_gnr_lr_schedule(optimizer_or_wrapper):
    return tsa.cosine_annealing_with_warmup(
        optimizer_or_wrapper, 1.0, 0.0, 10, N_MICRO, schedule_target="lr"
    )


def _class_gnr(lib, opt):
    wrapper = lib.OptimizerWrapperGNR(opt)
    _set_group_values(wrapper, "target_gradient_norm", [0.3])
    return wrapper, _class_gnr_lr_schedule(wrapper)


def _class_sbc(lib, opt):
    wrapper = lib.OptimizerWrapperSBC(opt, physical_batch_size=MICRO_BATCH, max_batch_draws=3)
    _set_group_values(wrapper, "logical_batch_size", [24.0, 40.0])  # max (40) rules; forced at 3
    schedule = tsa.cosine_annealing_with_warmup(wrapper, 1.0, 0.0, 5, 120, schedule_target="lr")
    return wrapper, schedule


def _class_mht(lib, opt):
    wrapper = lib.OptimizerWrapperMHT(opt, max_batch_draws=8, update_beta=0.1)
    _set_group_values(wrapper, "confidence_level", [0.8])
    _set_group_values(wrapper, "percent_error_threshold", [0.15])
    schedule = tsa.cosine_annealing_with_warmup(wrapper, 1.0, 0.1, 5, 120, schedule_target="lr")
    return wrapper, schedule


def _plain_gnr_cosine(opt):  # lr / weight-decay schedules of make_gnr_with_cosine_annealing_schedule
    return tsa.SynchronousSchedule([
        tsa.constant_with_warmup(opt, 1.0, 5, schedule_target="lr"),
        tsa.cosine_annealing_with_warmup(opt, 1.0, 0.0, 5, N_MICRO, schedule_target="weight_decay"),
    ])


def _plain_gnr_cosine_conventional(opt):  # lr schedule of the _conventional_lr factory
    return tsa.cosine_annealing_with_warmup(opt, 1.0, 0.0, 5, N_MICRO, schedule_target="lr")


@dataclass
class Case:
    id: str
    algorithm: str
    optimizer: str
    build: Callable  # (lib, optimizer) -> (wrapper, schedule)
    metric: bool = False  # MHT: step(loss.item())
    plain_schedule: Optional[Callable] = None  # GNR: schedules of an un-rescaled reference run


CASES = [
    # ---- GNTS
    Case("gnts_cosine-adamw", "gnts", "adamw",
         lambda L, o: L.make_gnts_with_cosine_annealing_schedule(
             o, num_training_steps=100, num_warmup_steps=5,
             initial_threshold=2.0, final_threshold=0.8)),
    Case("gnts_cosine-sgd_momentum", "gnts", "sgd_momentum",
         lambda L, o: L.make_gnts_with_cosine_annealing_schedule(
             o, num_training_steps=100, num_warmup_steps=5,
             initial_threshold=2.0, final_threshold=0.8, max_batch_draws=16)),
    Case("gnts_cosine_conventional_lr-adamw_2groups", "gnts", "adamw_2groups",
         lambda L, o: L.make_gnts_with_cosine_annealing_schedule_conventional_lr(
             o, num_training_steps=100, num_warmup_steps=5,
             initial_threshold=2.0, final_threshold=0.8, warmup_multiplier=4, max_batch_draws=16)),
    Case("gnts_class-adamw_2groups", "gnts", "adamw_2groups", _class_gnts),
    # ---- GNS
    Case("gns_cosine-adamw", "gns", "adamw",
         lambda L, o: L.make_gns_with_cosine_annealing_schedule(
             o, initial_tolerance=0.01, final_tolerance=0.005,
             num_training_steps=100, num_warmup_steps=5)),
    Case("gns_default-sgd_momentum_2groups", "gns", "sgd_momentum_2groups",
         lambda L, o: L.make_gns_default(
             o, tolerance=0.005, num_training_steps=100, num_warmup_steps=5, max_batch_draws=12)),
    Case("gns_class-sgd_momentum", "gns", "sgd_momentum", _class_gns),
    # ---- GNR
    Case("gnr_cosine-adamw", "gnr", "adamw",
         lambda L, o: L.make_gnr_with_cosine_annealing_schedule(
             o, initial_norm=1.0, final_norm=0.1, num_training_steps=N_MICRO, num_warmup_steps=5),
         plain_schedule=_plain_gnr_cosine),
    Case("gnr_cosine_conventional_lr-sgd_momentum_2groups", "gnr", "sgd_momentum_2groups",
         lambda L, o: L.make_gnr_with_cosine_annealing_schedule_conventional_lr(
             o, initial_norm=1.0, final_norm=0.1, num_training_steps=N_MICRO, num_warmup_steps=5),
         plain_schedule=_plain_gnr_cosine_conventional),
    Case("gnr_class-sgd_momentum", "gnr", "sgd_momentum", _class_gnr,
         plain_schedule=_class_gnr_lr_schedule),
    # ---- SBC
    Case("sbc_polynomial-adamw_2groups", "sbc", "adamw_2groups",
         lambda L, o: L.make_sbc_with_polynomial_schedule(
             o, physical_batch_size=MICRO_BATCH, initial_batch_size=16, final_batch_size=64,
             num_training_steps=60, num_warmup_steps=5)),
    Case("sbc_polynomial_conventional_lr-sgd_momentum", "sbc", "sgd_momentum",
         lambda L, o: L.make_sbc_with_polynomial_schedule_conventional_lr(
             o, physical_batch_size=MICRO_BATCH, initial_batch_size=16, final_batch_size=48,
             num_training_steps=60, num_warmup_steps=5, polynomial_power=1.5, max_batch_draws=5)),
    Case("sbc_class-adamw_2groups", "sbc", "adamw_2groups", _class_sbc),
    # ---- MHT
    Case("mht_warmup-adamw", "mht", "adamw",
         lambda L, o: L.make_mht_with_warmup_schedule(
             o, confidence_level=0.9, percent_error_threshold=0.2,
             num_training_steps=100, num_warmup_steps=5),
         metric=True),
    Case("mht_warmup-sgd_momentum_2groups", "mht", "sgd_momentum_2groups",
         lambda L, o: L.make_mht_with_warmup_schedule(
             o, confidence_level=0.9, percent_error_threshold=0.2,
             num_training_steps=100, num_warmup_steps=5, max_batch_draws=10),
         metric=True),
    Case("mht_class-adamw", "mht", "adamw", _class_mht, metric=True),
]

# every torch-gqc factory (and MHT's) is exercised by at least one case
FACTORIES = {
    "make_gnts_with_cosine_annealing_schedule", "make_gnts_with_cosine_annealing_schedule_conventional_lr",
    "make_gnr_with_cosine_annealing_schedule", "make_gnr_with_cosine_annealing_schedule_conventional_lr",
    "make_sbc_with_polynomial_schedule", "make_sbc_with_polynomial_schedule_conventional_lr",
    "make_gns_with_cosine_annealing_schedule", "make_gns_default", "make_mht_with_warmup_schedule",
}


# ----------------------------------------------------------------------------- the runs
@dataclass
class Run:
    decisions: List[bool]
    params: List[torch.Tensor]
    wrapper: object
    oracle_checks: int = 0


class GradientOracle:
    """Per-micro-batch gradients from a separate copy of the model, never reading ``.grad``.

    Before each micro-step the copy takes the trained model's current weights; its gradient of the
    same micro-batch loss comes from ``torch.autograd.grad``. The window's sum is kept here.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.copy = make_model()
        self.window: Optional[List[torch.Tensor]] = None
        self.draws = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad():
            for dst, src in zip(self.copy.parameters(), self.model.parameters()):
                dst.copy_(src)
        params = list(self.copy.parameters())
        g = torch.autograd.grad(loss_fn(self.copy(x), y), params)
        self.window = list(g) if self.window is None else [a + b for a, b in zip(self.window, g)]
        self.draws += 1

    def mean_grad_norm(self) -> float:
        """``||sum_i g_i|| / n`` over the current window, in float64."""
        return math.sqrt(sum(float((t.double() ** 2).sum()) for t in self.window)) / self.draws

    def reset(self) -> None:
        self.window, self.draws = None, 0


def train(lib, case: Case, *, gnts_oracle: bool = False) -> Run:
    """The torch-gqc user's loop, ``N_MICRO`` micro-steps (plus the GNTS oracle check)."""
    model = make_model()
    optimizer = OPTIMIZERS[case.optimizer](model)
    wrapper, schedule = case.build(lib, optimizer)
    oracle = GradientOracle(model) if gnts_oracle else None
    decisions: List[bool] = []
    checks = 0
    for index, (x, y) in enumerate(micro_batches(N_MICRO)):
        if oracle is not None:
            oracle.add(x, y)  # at the weights this micro-batch's backward sees
        loss = loss_fn(model(x), y)
        loss.backward()
        stepped = wrapper.step(loss.item()) if case.metric else wrapper.step()
        if stepped:
            schedule.step()
        decisions.append(bool(stepped))
        if oracle is not None:
            expected = oracle.mean_grad_norm()
            got = wrapper.statistics()["mean_grad_norm"]
            assert got == pytest.approx(expected, rel=ORACLE_RTOL, abs=0.0), (
                f"{case.id}: micro-step {index} (draw {oracle.draws} of the window): gqc_dist "
                f"mean_grad_norm {got!r} != oracle ||sum g_i||/n {expected!r}"
            )
            checks += 1
            if stepped:
                oracle.reset()
    params = [p.detach().clone() for p in model.parameters()]
    return Run(decisions, params, wrapper, checks)


def _fmt(decisions: List[bool]) -> str:
    return "".join("S" if d else "." for d in decisions)


def _assert_same_decisions(case_id: str, ref: List[bool], got: List[bool]) -> None:
    assert len(ref) == len(got) == N_MICRO
    if ref != got:
        first = next(i for i, (a, b) in enumerate(zip(ref, got)) if a != b)
        lo = max(0, first - 10)
        pytest.fail(
            f"{case_id}: step/accumulate decisions diverge first at micro-step {first}: "
            f"torch-gqc {ref[first]}, gqc_dist {got[first]}\n"
            f"  torch-gqc [{lo}:{first + 10}] {_fmt(ref[lo:first + 10])}\n"
            f"  gqc_dist  [{lo}:{first + 10}] {_fmt(got[lo:first + 10])}"
        )


def _max_abs_diff(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _scalar_group_values(wrapper) -> List[Dict[str, float]]:
    return [
        {k: v for k, v in g.items()
         if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for g in wrapper.param_groups
    ]


# ----------------------------------------------------------------------------- tests
def test_cases_cover_every_algorithm_factory_and_optimizer():
    assert {c.algorithm for c in CASES} == {"gnts", "gns", "gnr", "sbc", "mht"}
    sources = Path(__file__).read_text()
    for name in FACTORIES:
        assert f"L.{name}(" in sources, name
        assert callable(getattr(gqc_dist, name)) and callable(getattr(TORCH_GQC, name))
    for algorithm in ("GNTS", "GNS", "GNR", "SBC", "MHT"):
        assert f"lib.OptimizerWrapper{algorithm}(" in sources
    assert {"adamw", "adamw_2groups", "sgd_momentum", "sgd_momentum_2groups"} <= {
        c.optimizer for c in CASES
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decision_and_parameter_parity(case: Case):
    ref = train(LIBS["torch_gqc"], case)
    got = train(LIBS["gqc_dist"], case, gnts_oracle=case.algorithm == "gnts")

    # 1. identical decision at every micro-step
    _assert_same_decisions(case.id, ref.decisions, got.decisions)

    # 2. both decisions occur. GNR always steps: show instead that its rescaling matters, i.e.
    #    an un-rescaled run with the same schedules ends far beyond the parity tolerance away.
    if case.algorithm == "gnr":
        assert all(ref.decisions), f"{case.id}: GNR must step every micro-step"
        moved = _max_abs_diff(plain_run(case), got.params)
        assert moved > 1e-2, f"{case.id}: GNR ends {moved:.3e} from an un-rescaled run"
    else:
        steps = sum(ref.decisions)
        assert 0 < steps < N_MICRO, (
            f"{case.id}: hyperparameters give no mix of decisions ({steps} steps): "
            f"{_fmt(ref.decisions)}"
        )
        assert sum(ref.decisions) >= 5 and N_MICRO - steps >= 20, _fmt(ref.decisions)

    # 3. final parameters
    diff = _max_abs_diff(ref.params, got.params)
    OBSERVED_MAX_DIFF[case.id] = diff
    print(f"\n[parity] {case.id}: steps={sum(ref.decisions)}/{N_MICRO} max|dparam|={diff:.3e}")
    assert diff <= PARAM_ATOL, f"{case.id}: max |param difference| {diff:.3e} > {PARAM_ATOL}"
    # the run actually trained (parity of two frozen models would prove nothing)
    assert _max_abs_diff(ref.params, [p.detach() for p in make_model().parameters()]) > 1e-2

    # 4. counters and reported values
    rw, gw = ref.wrapper, got.wrapper
    for name in ("num_steps", "num_batches", "num_draws", "last_num_draws", "max_draws"):
        assert getattr(gw, name) == getattr(rw, name), (
            f"{case.id}: {name}: torch-gqc {getattr(rw, name)!r}, gqc_dist {getattr(gw, name)!r}"
        )
    assert rw.num_batches == N_MICRO and rw.num_steps == sum(ref.decisions)
    assert gw.last_grad_norm == pytest.approx(rw.last_grad_norm, rel=1e-5), "last_grad_norm"
    assert _scalar_group_values(gw) == _scalar_group_values(rw), "scheduled param-group values"
    if case.algorithm == "mht":
        assert gw.running_mean == pytest.approx(rw.running_mean, rel=1e-12, abs=0.0), (
            f"{case.id}: running_mean torch-gqc {rw.running_mean!r}, gqc_dist {gw.running_mean!r}"
        )
    if case.algorithm == "gnts":
        assert got.oracle_checks == N_MICRO


def plain_run(case: Case) -> List[torch.Tensor]:
    """GNR's reference without rescaling: the same model, optimizer, lr / weight-decay schedules
    and stream, ``optimizer.step()`` every micro-batch on the raw gradient."""
    model = make_model()
    optimizer = OPTIMIZERS[case.optimizer](model)
    schedule = case.plain_schedule(optimizer)
    for x, y in micro_batches(N_MICRO):
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return [p.detach().clone() for p in model.parameters()]


# ---- "swap the import": one user loop, torch-gqc public names and signatures only ----------
def user_training_loop(lib, gqc_mht_module, num_micro: int = SWAP_MICRO):
    """What a torch-gqc user writes; run unchanged with ``lib`` = torch-gqc or gqc_dist.

    ``gqc_mht_module`` is where the user imports MHT from (torch-gqc: its implementation module).
    """
    log = []
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    wrapper, schedule = lib.make_gnts_with_cosine_annealing_schedule(
        optimizer, num_training_steps=100, num_warmup_steps=5,
        initial_threshold=2.0, final_threshold=0.8, max_batch_draws=16,
    )
    mht_model = make_model()
    mht_optimizer = torch.optim.SGD(mht_model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    mht, mht_schedule = gqc_mht_module.make_mht_with_warmup_schedule(
        mht_optimizer, 0.9, 0.2, 100, 5, max_batch_draws=10
    )
    assert "gradient_norm_threshold" in wrapper.valid_schedule_targets
    assert "confidence_level" in mht.valid_schedule_targets
    for x, y in micro_batches(num_micro):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if wrapper.step():
            schedule.step()
        mht_loss = F.mse_loss(mht_model(x), y)
        mht_loss.backward()
        if mht.step(mht_loss.item()):
            mht_schedule.step()
        stats = wrapper.statistics()
        vital = wrapper.vital_statistics()
        log.append((
            stats["num_steps"], stats["num_batches"], stats["num_draws"],
            stats.get("last_num_draws"), stats["lr"], stats["weight_decay"],
            stats["gradient_norm_threshold"],
            vital["num_steps"], vital.get("last_num_draws"), vital["lr"],
            vital["gradient_norm_threshold"],
            wrapper.num_steps, wrapper.num_batches, wrapper.last_num_draws,
            mht.num_steps, mht.num_draws, mht.statistics()["num_steps"],
            mht.statistics()["confidence_level"], mht.statistics()["percent_error_threshold"],
        ))
    with pytest.raises(Exception):
        wrapper.zero_grad()  # both libraries own zero_grad
    params = [p.detach().clone() for p in (*model.parameters(), *mht_model.parameters())]
    return log, params, wrapper.last_grad_norm


def test_swap_the_import():
    ref_log, ref_params, ref_norm = user_training_loop(torch_gqc, torch_gqc_mht)
    got_log, got_params, got_norm = user_training_loop(gqc_dist, gqc_dist)
    assert len(ref_log) == len(got_log) == SWAP_MICRO
    for index, (a, b) in enumerate(zip(ref_log, got_log)):
        assert a == b, f"micro-step {index}: torch-gqc {a} != gqc_dist {b}"
    assert 0 < ref_log[-1][0] < SWAP_MICRO and 0 < ref_log[-1][14] < SWAP_MICRO  # mixed decisions
    assert _max_abs_diff(ref_params, got_params) <= PARAM_ATOL
    assert got_norm == pytest.approx(ref_norm, rel=1e-5)


def test_statistics_keys_are_a_superset_of_torch_gqc():
    """A torch-gqc user may index any key torch-gqc reports; gqc_dist should report it too
    (booleans excepted: torch-gqc lists optimizer flags such as ``amsgrad`` as numbers; so is the
    raw per-window ``history`` list that torch-gqc's reporter aggregates)."""
    missing = {}
    for case in [c for c in CASES if c.id.endswith("-adamw")]:
        runs = {}
        for name, lib in LIBS.items():
            model = make_model()
            wrapper, schedule = case.build(lib, OPTIMIZERS[case.optimizer](model))
            for x, y in micro_batches(12):
                loss = loss_fn(model(x), y)
                loss.backward()
                if (wrapper.step(loss.item()) if case.metric else wrapper.step()):
                    schedule.step()
            runs[name] = wrapper
        for method in ("statistics", "vital_statistics"):
            ref = getattr(runs["torch_gqc"], method)()
            got = getattr(runs["gqc_dist"], method)()
            lost = sorted(
                k for k, v in ref.items()
                if not isinstance(v, bool) and k not in got and k.rstrip("*") != "history"
            )
            if lost:
                missing[f"{case.id}.{method}"] = lost
    assert not missing, f"keys torch-gqc reports that gqc_dist lacks: {missing}"
