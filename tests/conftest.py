"""Test configuration shared by every test file."""

import pytest


def pytest_configure(config):
    # torch-schedule-anything steps its schedules through a stub optimizer that never steps.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`:UserWarning",
    )


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One single-process ``gqc-train --quick`` run, the reference several tests compare against.
    Returns (output directory, stdout)."""
    from train_runs import gqc_train

    out = tmp_path_factory.mktemp("quick") / "run"
    stdout = gqc_train("--quick", "--out-dir", str(out), "--no-progress")
    return out, stdout
