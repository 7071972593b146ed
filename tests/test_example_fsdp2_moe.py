"""The FSDP2 + MoE example under a real torchrun on 4 CPU ranks: every rank logs the same steps."""

import os
import re
from pathlib import Path

from distributed_harness import run_launcher, torchrun_command


def test_torchrun_fsdp2_moe_example_every_rank_logs_the_same_steps(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = torchrun_command(4, "--log-dir", tmp_path, "--redirects", "3",
                               "-m", "gqc_dist.examples.fsdp2_moe", "--ep-size", "2", "--micro-steps", "40")
    finished = run_launcher(command, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    logs = sorted(tmp_path.rglob("stdout.log"), key=lambda p: int(p.parent.name))
    assert len(logs) == 4
    per_rank = [[re.sub(r"^\[rank \d\] ", "", line) for line in Path(log).read_text().splitlines()]
                for log in logs]
    assert all(lines == per_rank[0] for lines in per_rank), "ranks logged different steps"
    draws = [int(re.search(r"draws +(\d+)", line).group(1)) for line in per_rank[0]]
    assert len(draws) >= 5 and len(set(draws)) > 1  # the batch size varied
