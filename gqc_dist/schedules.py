"""Combining torch-schedule-anything schedules for the factories."""

import contextlib
import functools
from typing import Callable, List

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


def lr_and_weight_decay(wrapper, num_warmup_steps: int, num_training_steps: int,
                        conventional_lr: bool, constant_weight_decay: bool = False) -> List:
    """torch-gqc's factories' learning-rate and weight-decay schedules (multipliers of the
    optimizer's own values, per optimizer step).

    ``conventional_lr``: lr warms up then cosine-anneals to zero (weight decay constant when
    ``constant_weight_decay``, else not scheduled). Otherwise lr warms up to a constant and weight
    decay warms up then cosine-anneals to zero.
    """
    if conventional_lr:
        schedules = [tsa.cosine_annealing_with_warmup(
            wrapper, 1.0, 0.0, num_warmup_steps, num_training_steps, schedule_target="lr")]
        if constant_weight_decay:
            schedules.append(tsa.constant_schedule(wrapper, 1.0, "weight_decay"))
        return schedules
    return [tsa.constant_with_warmup(wrapper, 1.0, num_warmup_steps, schedule_target="lr"),
            tsa.cosine_annealing_with_warmup(wrapper, 1.0, 0.0, num_warmup_steps, num_training_steps,
                                             schedule_target="weight_decay")]


def conventional_lr_twin(factory: Callable, doc: str) -> Callable:
    """torch-gqc's ``*_conventional_lr`` twin of ``factory``: the same arguments, called with
    ``conventional_lr=True``."""

    @functools.wraps(factory)
    def twin(*args, **kwargs):
        return factory(*args, conventional_lr=True, **kwargs)

    twin.__name__ = twin.__qualname__ = factory.__name__ + "_conventional_lr"
    twin.__doc__ = doc
    return twin
