"""docs/library.md "Differences from torch-gqc": the one-line migrations, checked against torch-gqc 0.10.4 on
2 real ranks whose gradients are plain-tensor shards (``distributed_mode="sharded"``). A
threshold tuned on torch-gqc, times ``sqrt(W)``, and a logical batch times ``W``, give gqc_dist
the same decisions at every micro-step."""

import math

import gradient_quality_control as torch_gqc
import torch

import gqc_dist
from distributed_harness import run_distributed

WORLD, SHARD, MICRO_STEPS = 2, 8, 60


def _gradients(rank):
    """This rank's shard of a sequence of global gradients ``G + noise`` (16 elements)."""
    generator = torch.Generator().manual_seed(3)
    mean = torch.randn(WORLD * SHARD, generator=generator)
    return [(mean + 2.0 * torch.randn(WORLD * SHARD, generator=generator))[rank * SHARD:(rank + 1) * SHARD]
            for _ in range(MICRO_STEPS)]


def _decisions(make, rank):
    param = torch.nn.Parameter(torch.zeros(SHARD))
    wrapper = make(torch.optim.SGD([param], lr=0.01))
    decisions = []
    for g in _gradients(rank):
        param.grad = g.clone() if param.grad is None else param.grad + g
        decisions.append(bool(wrapper.step()))
    return decisions


def _gnts(module, threshold):
    def make(optimizer):
        wrapper = module.OptimizerWrapperGNTS(optimizer, 6, "sharded")
        wrapper.param_groups[0]["gradient_norm_threshold"] = threshold
        return wrapper
    return make


def _sbc(module, logical):
    def make(optimizer):
        wrapper = module.OptimizerWrapperSBC(optimizer, physical_batch_size=4, max_batch_draws=8,
                                             distributed_mode="sharded")
        wrapper.param_groups[0]["logical_batch_size"] = logical
        return wrapper
    return make


def _both(rank, world_size):
    threshold = 4.5  # between the windows' mean norms (about 3.7 to 6.3 on torch-gqc's sharded scale)
    return {"gnts": (_decisions(_gnts(torch_gqc, threshold), rank),
                     _decisions(_gnts(gqc_dist, threshold * math.sqrt(world_size)), rank)),
            "sbc": (_decisions(_sbc(torch_gqc, 12.0), rank), _decisions(_sbc(gqc_dist, 12.0 * world_size), rank))}


def test_tuned_torch_gqc_thresholds_and_batches_migrate_by_the_documented_factor():
    results = run_distributed(_both, WORLD, timeout=240)
    for name in ("gnts", "sbc"):
        theirs, ours = results[0][name]
        assert ours == theirs, name
        assert True in ours and False in ours, name  # both decisions occur
        assert results[1][name] == results[0][name], name
    # and without the conversion they differ: the factor is what makes them agree
    unconverted = run_distributed(_unconverted, WORLD, timeout=240)[0]
    assert unconverted[0] != unconverted[1]


def _unconverted(rank, world_size):
    return (_decisions(_gnts(torch_gqc, 4.5), rank), _decisions(_gnts(gqc_dist, 4.5), rank))
