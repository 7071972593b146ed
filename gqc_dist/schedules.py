"""Combining torch-schedule-anything schedules for the factories."""

import contextlib
from typing import List

import torch_schedule_anything as tsa


def synchronous(schedules: List) -> tsa.SynchronousSchedule:
    """``tsa.SynchronousSchedule`` of ``schedules``, stepped once per optimizer step.

    Each tsa schedule drives a stub optimizer that never steps itself, so torch would warn
    "lr_scheduler.step() before optimizer.step()" at the first step; the wrapper's optimizer
    does step before the schedule, so the stubs are marked as stepped.
    """
    for schedule in schedules:
        schedule.optimizer._opt_called = True
    return tsa.SynchronousSchedule(schedules)


@contextlib.contextmanager
def hidden_initial_lr(optimizer):
    """Build tsa schedules on an optimizer that already has a torch lr scheduler.

    torch's schedulers write ``initial_lr`` into every param group; a tsa schedule created later
    would take that real key as its own base value (it namespaces only keys the group lacks), so
    a threshold schedule would start from the learning rate. The key is hidden while the tsa
    schedules are created and restored afterwards.
    """
    saved = [group.pop("initial_lr", None) for group in optimizer.param_groups]
    try:
        yield
    finally:
        for group, value in zip(optimizer.param_groups, saved):
            if value is not None:
                group["initial_lr"] = value
