"""Combining torch-schedule-anything schedules for the factories."""

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
