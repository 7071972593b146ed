"""Test configuration shared by every test file."""


def pytest_configure(config):
    # torch-schedule-anything steps its schedules through a stub optimizer that never steps.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`:UserWarning",
    )
