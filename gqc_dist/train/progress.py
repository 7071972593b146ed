"""How far a gqc-train run is through its budget, and the schedules keyed on it.

An adaptive run does not know its step count in advance, so with a token budget
(``train.tokens``) every schedule advances with the tokens consumed, as Megatron's and OLMo's
batch ramps are keyed on consumed samples: adaptive and fixed-accumulation runs then share one
schedule shape over one budget. Without one, schedules count optimizer steps as before.

* learning rate: linear warm-up, then cosine to 0.1x at the end of the budget
  (:func:`lr_multiplier`); the warm-up is ``optimizer.warmup_steps`` optimizer steps, or with a
  token budget ``optimizer.warmup_fraction`` of it.
* the controller's value schedule (tsa, in optimizer steps ``num_training_steps``): with a token
  budget it is placed at ``tokens / train.tokens * num_training_steps``.
"""

import math
import warnings
from typing import Any, Dict


def lr_multiplier(done: float, warmup: float, total: float) -> float:
    """Linear warm-up over ``warmup`` units to 1, then cosine to 0.1 at ``total`` units;
    ``done`` units are behind (units: optimizer steps, or micro-batches with a token budget)."""
    if done < warmup:
        return (done + 1) / warmup
    progress = min(1.0, (done - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class Budget:
    """The run's position: optimizer steps and micro-batches done, and what the budget is.

    ``tokens_per_micro_step``: global tokens one micro-step consumes.
    """

    def __init__(self, train_cfg: Dict[str, Any], optimizer_cfg: Dict[str, Any], tokens_per_micro_step: int):
        self.tokens = train_cfg["tokens"]
        self.optimizer_steps = train_cfg["optimizer_steps"]
        self.max_micro_steps = train_cfg["max_micro_steps"]
        self.tokens_per_micro_step = tokens_per_micro_step
        self.steps_done = 0
        self.micro_steps_done = 0
        if self.tokens is None:
            self._lr_args = (optimizer_cfg["warmup_steps"], self.optimizer_steps)
        else:
            total = self.tokens / tokens_per_micro_step
            self._lr_args = (optimizer_cfg["warmup_fraction"] * total, total)

    @property
    def fraction(self) -> float:
        """How much of the budget is spent, in [0, 1]."""
        if self.tokens is None:
            return min(1.0, self.steps_done / self.optimizer_steps)
        return min(1.0, self.micro_steps_done * self.tokens_per_micro_step / self.tokens)

    def exhausted(self) -> bool:
        """No further micro-step: the step cap, the micro-step cap or the token budget is reached."""
        return (self.steps_done >= self.optimizer_steps or self.micro_steps_done >= self.max_micro_steps
                or (self.tokens is not None and self.micro_steps_done * self.tokens_per_micro_step >= self.tokens))

    def lr_multiplier(self, steps_done: int) -> float:
        """The learning-rate multiplier for the next optimizer step, ``steps_done`` steps in (the
        scheduler's own count: it steps right after the optimizer, before the loop knows)."""
        done = steps_done if self.tokens is None else self.micro_steps_done
        return lr_multiplier(done, *self._lr_args)


class TokenKeyedSchedule:
    """A tsa schedule over ``num_training_steps`` optimizer steps, placed by the budget spent:
    each ``step()`` moves it to ``fraction * num_training_steps`` instead of one step on."""

    def __init__(self, schedule, num_training_steps: int, budget: Budget):
        self.schedule = schedule
        self.num_training_steps = num_training_steps
        self.budget = budget

    def step(self) -> None:
        position = round(self.budget.fraction * self.num_training_steps)
        with warnings.catch_warnings():  # torch deprecates step(epoch); LambdaLR still honours it
            warnings.simplefilter("ignore", UserWarning)
            self.schedule.step(position)

    def state_dict(self):
        return self.schedule.state_dict()

    def load_state_dict(self, state) -> None:
        self.schedule.load_state_dict(state)
