"""The cost-aware rule (algorithm ``goodput``): its choice against brute force, its windows against
a hand-written reference on fixed costs and noise, identical decisions on every rank when one
rank's measured costs differ (2 real ranks, rank-local accumulation, each step equal to a
single-process step on the window), and the shaped link the benchmark runs on."""

import math
import subprocess
import sys
import time

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import gqc_dist
from distributed_harness import run_distributed
from gqc_dist.algorithms.goodput import goodput_draws
from gqc_dist.core.costs import FIELDS, CostMeter
from reference import LOCAL_BATCH, adamw, loss_of, make_mlp, micro_batches, reference_windows
from test_local_mode import _replay
from test_noise_scale import synthetic_gradients, window_lengths
from virtual_cluster import VirtualHosts, missing


def brute_force(b, c, r, low, high):
    """argmax over every n in [low, high] of n / ((n + b)(n c + r)), the smallest on a tie."""
    best, best_n = -1.0, None
    for n in range(low, high + 1):
        value = n / ((n + b) * (n * c + r))
        if value > best * (1 + 1e-12):
            best, best_n = value, n
    return best_n


@pytest.mark.parametrize("b", [0.0, 0.3, 2.0, 8.0, 40.0])
@pytest.mark.parametrize("c, r", [(0.1, 0.0), (0.1, 0.02), (0.1, 0.2), (0.02, 1.0), (0.1, 2.0)])
@pytest.mark.parametrize("low, high", [(1, 16), (2, 8)])
def test_goodput_draws_is_the_best_integer_window(b, c, r, low, high):
    assert goodput_draws(b, c, r, low, high) == brute_force(b, c, r, low, high)


def test_goodput_draws_before_estimates_and_with_noise_dominating():
    assert goodput_draws(None, 0.1, 0.1, 1, 16) is None and goodput_draws(4.0, None, 0.1, 1, 16) is None
    assert math.isinf(goodput_draws(math.inf, 0.1, 0.1, 1, 16))  # an unknown signal: CBC's bounds creep up
    # a slow link (a reduction costs 20 micro-steps) and B_simple 20: n* = sqrt(20 * 20) = 20
    assert goodput_draws(20.0, 0.1, 2.0, 1, 64) == 20


class FixedCosts(CostMeter):
    """A cost meter whose own measurements are the given constants (the rule's inputs fixed; the
    packet still carries and averages them over the ranks)."""

    def __init__(self, micro_step_s, reduction_s, optimizer_step_s):
        super().__init__()
        self.local = dict(zip(FIELDS, (micro_step_s, reduction_s, optimizer_step_s)))

    def _add(self, name, seconds):
        pass


def _goodput_lengths(grads, costs, max_draws=32, probe=24):
    param = torch.nn.Parameter(torch.zeros(grads[0].numel()))
    wrapper = gqc_dist.OptimizerWrapperGoodput(torch.optim.SGD([param], lr=0.0), max_draws, probe_interval=probe)
    wrapper._costs = FixedCosts(*costs)
    return window_lengths(wrapper, param, grads), wrapper.statistics()


@pytest.mark.parametrize("noise_scale, costs", [(24.0, (0.1, 0.0, 0.01)), (24.0, (0.1, 0.9, 0.1)),
                                                (2.0, (0.05, 2.0, 0.1)), (0.3, (0.1, 0.5, 0.1))])
def test_goodput_windows_match_the_hand_written_rule(noise_scale, costs):
    grads = synthetic_gradients(3000, 256, noise_scale)
    c, window_s = costs[0], costs[1] + costs[2]
    want = reference_windows(grads, lambda noise, signal: brute_force(
        max(0.0, noise) / signal, c, window_s, 1, 32) if signal > 0 else math.inf, 32, 24)
    got, stats = _goodput_lengths(grads, costs)
    assert got == want
    assert stats["cost_micro_step_s"] == pytest.approx(c) and stats["cost_reduction_s"] == pytest.approx(costs[1])
    settled = sum(got[-200:]) / 200
    star = math.sqrt(noise_scale * window_s / c)  # the continuous optimum, where it is inside the bounds
    if 1 < star < 32:
        assert settled == pytest.approx(star, rel=0.35)


STEPS = 40


def _local_goodput_run(rank, world_size, costs):
    """DDP under no_sync with goodput; rank r's meter reports ``costs[r]``."""
    model = make_mlp()
    ddp = DDP(model)
    wrapper = gqc_dist.OptimizerWrapperGoodput(adamw(model.parameters()), 8, local_accumulation=True)
    wrapper._costs = FixedCosts(*costs[rank])
    decisions = []
    for x, y in micro_batches(STEPS, batch=LOCAL_BATCH * world_size):
        with ddp.no_sync():
            loss_of(ddp, (x.chunk(world_size)[rank], y.chunk(world_size)[rank])).backward()
        decisions.append(wrapper.step())
    return {"decisions": decisions, "stats": wrapper.statistics(),
            "params": [p.detach().clone() for p in model.parameters()]}


def test_goodput_decides_alike_on_every_rank_when_their_costs_differ():
    """Rank 0 measures a cheap reduction, rank 1 a dear one: both decide from the mean, take the
    same windows, and each step equals a single-process step on the window (local mode's
    exactness oracle)."""
    costs = [(0.1, 0.1, 0.0), (0.1, 1.5, 0.0)]  # mean: c 0.1, r 0.8
    results = run_distributed(_local_goodput_run, 2, costs, timeout=240)
    decisions = results[0]["decisions"]
    assert results[1]["decisions"] == decisions and True in decisions and False in decisions
    for result in results:
        assert result["stats"]["cost_reduction_s"] == pytest.approx(0.8)
        assert result["stats"]["estimated_decisions"] == STEPS
    lengths, run = [], 0
    for stepped in decisions:
        run += 1
        if stepped:
            lengths.append(run)
            run = 0
    assert max(lengths) > 1  # the dear reduction makes it accumulate
    want = _replay(decisions, 2)
    for result in results:
        for got, ref in zip(result["params"], want):
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the shaped link
SINK = """
import socket, sys
server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", int(sys.argv[1]))); server.listen(1); print("ready", flush=True)
conn, _ = server.accept()
while conn.recv(1 << 20):
    pass
"""
SOURCE = """
import socket, sys, time
data = b"x" * (1 << 20)
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
start = time.perf_counter()
for _ in range(int(sys.argv[3])):
    conn.sendall(data)
conn.shutdown(socket.SHUT_WR); conn.recv(1)
print(time.perf_counter() - start)
"""


def _throughput_mbit(hosts, megabytes):
    port = 23456
    sink = subprocess.Popen(hosts.command(1, [sys.executable, "-c", SINK, port]), stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "ready"
        seconds = float(subprocess.run(hosts.command(0, [sys.executable, "-c", SOURCE, hosts.addresses[1], port,
                                                         megabytes]), capture_output=True, text=True, check=True,
                                       timeout=120).stdout)
    finally:
        sink.kill()
        sink.wait()
    return megabytes * 8 * 2**20 / seconds / 1e6


@pytest.mark.skipif(bool(missing("tc")), reason=missing("tc") or "runs")
def test_the_shaped_link_is_slower_and_is_torn_down():
    hosts = VirtualHosts(2).start()
    try:
        fast = _throughput_mbit(hosts, 64)
        hosts.shape(100)
        slow = _throughput_mbit(hosts, 8)
    finally:
        hosts.stop()
    print(f"link: {fast:.0f} Mbit/s unshaped, {slow:.0f} Mbit/s shaped to 100")
    assert 60 <= slow <= 110 and fast > 5 * slow
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in hosts.namespaces) and hosts.bridge not in links


def test_cost_meter_separates_a_micro_step_from_the_windows_reduction_and_step():
    meter = CostMeter(beta=0.0)
    meter.returned()
    time.sleep(0.05)  # the caller's forward and backward
    start = time.perf_counter()
    time.sleep(0.1)  # the step's reduction
    meter.reduced(time.perf_counter() - start)
    meter.stepped(0.0)
    meter.returned()
    assert 0.045 <= meter.local["micro_step_s"] <= 0.09 and meter.local["reduction_s"] >= 0.1
    meter.share([2 * v for v in meter.packet_values()], 2)  # two ranks that measured the same
    assert meter.statistics() == {f"cost_{k}": pytest.approx(v) for k, v in meter.local.items()}
