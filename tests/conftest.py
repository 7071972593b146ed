"""Test configuration shared by every test file."""

import os

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


@pytest.fixture(scope="session", autouse=True)
def _session_working_directory(tmp_path_factory):
    """The suite runs outside the checkout: what a run writes by default (``runs/...``) lands in a
    temporary folder, never beside a user's own runs, so the tests pass wherever they run, twice."""
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path, monkeypatch):
    """Each test in its own temporary folder (see ``_session_working_directory``)."""
    monkeypatch.chdir(tmp_path)
