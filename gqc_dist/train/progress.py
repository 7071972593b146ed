"""How far a gqc-train run is through its budget, and the schedules keyed on the window.

An adaptive run does not know its step count in advance, so with a token budget
(``train.tokens``) every schedule advances with the tokens consumed, as Megatron's and OLMo's
batch ramps are keyed on consumed samples: adaptive and fixed-accumulation runs then share one
schedule shape over one budget. Without one, schedules count optimizer steps.

Schedules read the :class:`gqc_dist.core.window.Window` each optimizer step is taken on (identical on
every rank, restored with the controller from a checkpoint), never the loop's own counters:

* learning rate (:func:`lr_hook`): linear warm-up, then cosine to 0.1x at the end of the budget
  (:meth:`LRSchedule.warmup` times :meth:`LRSchedule.decay`), times the window coupling
  (``optimizer.lr_coupling``, default the square-root rule) and, with ``optimizer.seesaw``,
  batch growth where the cosine decays; the warm-up is ``optimizer.warmup_steps`` optimizer
  steps, or with a token budget ``optimizer.warmup_fraction`` of it.
* the controller's value schedule (tsa, in optimizer steps ``num_training_steps``): with a token
  budget it is placed at ``tokens / train.tokens * num_training_steps``
  (:class:`TokenKeyedSchedule`).
"""

import math
import warnings
from typing import Any, Dict

from gqc_dist.core.window import LRCoupling, Window


class Budget:
    """The loop's position: optimizer steps and micro-batches done, and what the budget is.

    ``tokens_per_micro_step``: global tokens one micro-step consumes.
    """

    def __init__(self, train_cfg: Dict[str, Any], tokens_per_micro_step: int):
        self.tokens = train_cfg["tokens"]
        self.optimizer_steps = train_cfg["optimizer_steps"]
        self.max_micro_steps = train_cfg["max_micro_steps"]
        self.tokens_per_micro_step = tokens_per_micro_step
        self.steps_done = 0
        self.micro_steps_done = 0

    @property
    def fraction(self) -> float:
        """How much of the budget is spent, in [0, 1]."""
        return self.fraction_at(self.steps_done, self.micro_steps_done)

    def fraction_at(self, steps: int, micro_steps: int) -> float:
        """The budget spent after ``steps`` optimizer steps and ``micro_steps`` micro-batches."""
        if self.tokens is None:
            return min(1.0, steps / self.optimizer_steps)
        return min(1.0, micro_steps * self.tokens_per_micro_step / self.tokens)

    def exhausted(self) -> bool:
        """No further micro-step: the step cap, the micro-step cap or the token budget is reached."""
        return self.spent(self.steps_done, self.micro_steps_done)

    def spent(self, steps: int, micro_steps: int) -> bool:
        """Whether ``steps`` optimizer steps and ``micro_steps`` micro-steps reach this budget."""
        return (steps >= self.optimizer_steps or micro_steps >= self.max_micro_steps
                or (self.tokens is not None and micro_steps * self.tokens_per_micro_step >= self.tokens))


class LRSchedule:
    """gqc-train's learning-rate shape as two functions of the window: a linear warm-up over
    ``warmup`` units and a cosine from 1 to 0.1 over the rest of ``total`` units. Units are
    micro-batches consumed before the window (token budget) or optimizer steps before it."""

    def __init__(self, budget: Budget, optimizer_cfg: Dict[str, Any]):
        self.by_tokens = budget.tokens is not None
        if self.by_tokens:
            self.total = budget.tokens / budget.tokens_per_micro_step
            self.warmup_units = optimizer_cfg["warmup_fraction"] * self.total
        else:
            self.total = budget.optimizer_steps
            self.warmup_units = optimizer_cfg["warmup_steps"]

    def done(self, window: Window) -> int:
        """Units behind when ``window`` began (what was known when its micro-batches were drawn)."""
        return window.micro_batches_seen - window.num_draws if self.by_tokens else window.step

    def warmup(self, window: Window) -> float:
        done = self.done(window)
        return (done + 1) / self.warmup_units if done < self.warmup_units else 1.0

    def decay(self, window: Window) -> float:
        done = self.done(window)
        if done < self.warmup_units:
            return 1.0
        progress = min(1.0, (done - self.warmup_units) / max(1, self.total - self.warmup_units))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def lr_hook(budget: Budget, optimizer_cfg: Dict[str, Any]) -> LRCoupling:
    """The window hook that sets every step's learning rate and weight decay (the optimizer's
    own values are the peak): :class:`LRSchedule` times the window coupling."""
    schedule = LRSchedule(budget, optimizer_cfg)
    return LRCoupling(optimizer_cfg["lr_coupling"], schedule=schedule.decay, warmup=schedule.warmup,
                      seesaw=optimizer_cfg["seesaw"])


class TokenKeyedSchedule:
    """A tsa schedule over ``num_training_steps`` optimizer steps, placed by the budget spent at
    the controller's last window: each ``step()`` (right after an optimizer step) moves it to
    ``fraction * num_training_steps`` instead of one step on."""

    def __init__(self, schedule, num_training_steps: int, budget: Budget, controller):
        self.schedule = schedule
        self.num_training_steps = num_training_steps
        self.budget = budget
        self.controller = controller

    def step(self) -> None:
        window = self.controller.last_window
        position = round(self.budget.fraction_at(window.step + 1, window.micro_batches_seen)
                         * self.num_training_steps)
        with warnings.catch_warnings():  # torch deprecates step(epoch); LambdaLR still honours it
            warnings.simplefilter("ignore", UserWarning)
            self.schedule.step(position)

    def state_dict(self):
        return self.schedule.state_dict()

    def load_state_dict(self, state) -> None:
        self.schedule.load_state_dict(state)
