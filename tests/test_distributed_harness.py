"""Tests of the multi-process harness itself (real gloo processes)."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from distributed_harness import (
    DistributedRankError,
    DistributedTimeoutError,
    run_distributed,
)


# ---- rank bodies: module level so they pickle -----------------------------

def _all_reduce_body(rank, world_size, scale, *, offset=0.0):
    t = torch.tensor([float(rank + 1)]) * scale + offset
    dist.all_reduce(t)  # SUM
    return {
        "rank": rank,
        "dist_rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "sum": t.item(),
        "env": (os.environ["RANK"], os.environ["LOCAL_RANK"],
                os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"],
                os.environ["OMP_NUM_THREADS"], os.environ.get("GQC_TEST_FLAG")),
        "threads": torch.get_num_threads(),
        "tensor": torch.arange(3) * rank,
    }


def _raise_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from the body")
    dist.barrier()  # the other ranks wait in a collective for rank 1
    return rank


def _hang_on_last_rank(rank, world_size):
    if rank == world_size - 1:
        time.sleep(10_000)
    dist.barrier()
    return rank


def _exit_without_result(rank, world_size):
    if rank == 0:
        os._exit(3)
    dist.barrier()


def _env_only(rank, world_size):
    # init_process_group=False: the body does its own env:// init.
    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()


# ---- tests -----------------------------------------------------------------

@pytest.mark.parametrize("world_size", [2, 4])
def test_results_in_rank_order_with_all_reduce(world_size):
    out = run_distributed(_all_reduce_body, world_size, 2.0, offset=1.0,
                          env={"GQC_TEST_FLAG": "x"}, timeout=60)
    expected_sum = sum(2.0 * (r + 1) + 1.0 for r in range(world_size))
    assert [o["rank"] for o in out] == list(range(world_size))
    assert [o["dist_rank"] for o in out] == list(range(world_size))
    for r, o in enumerate(out):
        assert o["world"] == world_size
        assert o["sum"] == expected_sum
        assert o["env"] == (str(r), str(r), str(world_size), "127.0.0.1", "1", "x")
        assert o["threads"] == 1
        assert torch.equal(o["tensor"], torch.arange(3) * r)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_exception_names_rank_and_has_traceback(world_size):
    t0 = time.monotonic()
    with pytest.raises(DistributedRankError) as ei:
        run_distributed(_raise_on_rank_1, world_size, timeout=60)
    assert time.monotonic() - t0 < 20  # survivors killed, not waited for
    err = ei.value
    assert err.rank == 1
    assert "rank 1 failed" in str(err)
    assert "ValueError: boom from the body" in err.child_traceback
    assert "Traceback (most recent call last)" in err.child_traceback
    assert "_raise_on_rank_1" in err.child_traceback


def test_hanging_rank_times_out_and_is_named():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as ei:
        run_distributed(_hang_on_last_rank, 2, timeout=3)
    elapsed = time.monotonic() - t0
    assert isinstance(ei.value, DistributedTimeoutError)
    assert 1 in ei.value.ranks
    assert "did not finish within 3 s" in str(ei.value)
    assert elapsed < 3 + 8, elapsed


def test_rank_dying_without_result_is_reported():
    with pytest.raises(DistributedRankError) as ei:
        run_distributed(_exit_without_result, 2, timeout=60)
    assert ei.value.rank == 0
    assert "exitcode 3" in str(ei.value)


def test_env_only_mode_lets_body_init_itself():
    assert run_distributed(_env_only, 2, init_process_group=False,
                           timeout=60) == [2.0, 2.0]


def test_lambda_rejected_up_front():
    with pytest.raises(TypeError, match="module-level"):
        run_distributed(lambda r, w: r, 2)
