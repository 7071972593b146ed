"""GNS, SBC, MHT and GNR under DDP (2 real ranks) against hand-written whole-model oracles.

Each oracle implements its rule from the published formula (not from gqc_dist.core.rules) on the
shard gradients and losses that the ranks see.
"""

import pytest
import scipy.stats
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import gqc_dist
from distributed_harness import run_distributed
from reference import loss_of, make_mlp, micro_batches, reference_data_parallel

WORLD = 2
LOCAL_BATCH = 4
MICRO_STEPS = 30
MAX_DRAWS = 6
SETTINGS = {
    "gns": {"noise_tolerance": 0.12},
    "sbc": {"logical_batch_size": 20},
    "mht": {"confidence_level": 0.8, "percent_error_threshold": 0.35},
    "gnr": {"target_gradient_norm": 0.3},
}


def _batches():
    return micro_batches(MICRO_STEPS, batch=LOCAL_BATCH * WORLD)


def _wrap(algorithm, optimizer):
    if algorithm == "gns":
        wrapper = gqc_dist.OptimizerWrapperGNS(optimizer, MAX_DRAWS)
    elif algorithm == "sbc":
        wrapper = gqc_dist.OptimizerWrapperSBC(optimizer, LOCAL_BATCH, MAX_DRAWS)
    elif algorithm == "mht":
        wrapper = gqc_dist.OptimizerWrapperMHT(optimizer, MAX_DRAWS, update_beta=0.2)
    else:
        wrapper = gqc_dist.OptimizerWrapperGNR(optimizer)
    for group in wrapper.param_groups:
        group.update(SETTINGS[algorithm])
    return wrapper


def _rank_run(rank, world_size, algorithm):
    model = make_mlp()
    ddp = DDP(model)
    wrapper = _wrap(algorithm, torch.optim.AdamW(ddp.parameters(), lr=1e-2))
    decisions = []
    for x, y in _batches():
        loss = loss_of(ddp, (x.chunk(world_size)[rank], y.chunk(world_size)[rank]))
        loss.backward()
        decisions.append(wrapper.step(loss.item()) if algorithm == "mht" else wrapper.step())
    return decisions, [p.detach().clone() for p in model.parameters()]


def _gns_rule(window):
    history = torch.tensor(window["shard_norms"], dtype=torch.float32)
    if len(history) < 2:
        gns_small = False
    else:
        gns = history.var() / (history.pow(2).mean() + 1e-8)
        gns_small = bool(gns <= window["draws"] * SETTINGS["gns"]["noise_tolerance"])
    return gns_small or window["draws"] >= MAX_DRAWS


class _MHTRule:
    def __init__(self, beta=0.2):
        self.beta, self.running = beta, None

    def __call__(self, window):
        new = window["shard_losses"][-WORLD:]
        update = sum(new) / len(new)
        self.running = update if self.running is None else self.running * (1 - self.beta) + update * self.beta
        values = [self.running] + window["shard_losses"]
        if window["draws"] >= MAX_DRAWS:
            return True
        mean = sum(values) / len(values)
        low, high = scipy.stats.t.interval(SETTINGS["mht"]["confidence_level"], len(values) - 1,
                                           loc=mean, scale=scipy.stats.sem(values) + 1e-12)
        error = SETTINGS["mht"]["percent_error_threshold"]
        return bool(low >= mean * (1 - error) and high <= mean * (1 + error))


def _oracle(algorithm):
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rescale = None
    if algorithm == "gns":
        rule = _gns_rule
    elif algorithm == "sbc":
        rule = lambda w: w["draws"] * LOCAL_BATCH * WORLD >= SETTINGS["sbc"]["logical_batch_size"] or w["draws"] >= MAX_DRAWS
    elif algorithm == "mht":
        rule = _MHTRule()
    else:
        rule, rescale = (lambda w: True), SETTINGS["gnr"]["target_gradient_norm"]
    decisions = reference_data_parallel(model, optimizer, _batches(), WORLD, rule, rescale)
    return decisions, [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("algorithm", ["gns", "sbc", "mht", "gnr"])
def test_algorithm_under_ddp_matches_whole_model_oracle(algorithm):
    results = run_distributed(_rank_run, WORLD, algorithm)
    decisions, params = _oracle(algorithm)
    if algorithm != "gnr":
        assert True in decisions and False in decisions
    for rank, (got_decisions, got_params) in enumerate(results):
        assert got_decisions == decisions, f"rank {rank}"
        for got, want in zip(got_params, params):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
