"""The optimizer look-alike half of a GQC wrapper: what makes it usable where a
``torch.optim.Optimizer`` is expected (param groups for schedules, state, ``add_param_group``,
attribute forwarding) and its one refusal (``zero_grad``).

It subclasses ``torch.optim.Optimizer`` without running its ``__init__`` (as Accelerate's
``AcceleratedOptimizer`` does): torch's lr schedulers, ``accelerator.prepare`` and Lightning check
``isinstance(..., Optimizer)``, while every piece of state stays the wrapped optimizer's."""

import sys
from typing import List, Tuple

import torch

from gqc_dist.errors import GQCUsageError
from gqc_dist.core.framework_leftovers import calling_loop, zero_grad_message
from gqc_dist.core.reduction import group_policy
from gqc_dist.validation import check_number


class OptimizerLookalike(torch.optim.Optimizer):
    """Stands in for ``self._optimizer``; the wrapper sets ``_optimizer``, ``_distributed_mode``,
    ``_gradients`` and its ``SCHEDULABLE`` keys."""

    SCHEDULABLE = {}

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._optimizer

    @property
    def param_groups(self) -> List[dict]:
        """The wrapped optimizer's param groups (schedules write thresholds here)."""
        return self._optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups) -> None:
        self._optimizer.param_groups = groups

    @property
    def state(self):
        return self._optimizer.state

    @state.setter
    def state(self, state) -> None:
        self._optimizer.state = state

    @property
    def defaults(self):
        return self._optimizer.defaults

    @defaults.setter
    def defaults(self, defaults) -> None:
        self._optimizer.defaults = defaults

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._optimizer!r})"

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group to the wrapped optimizer, with the algorithm's schedulable keys."""
        group_policy(param_group, self._distributed_mode)
        self._optimizer.add_param_group(param_group)
        self._extend_param_groups(self._optimizer.param_groups[-1:])
        self._gradients.params_changed()

    def __getattr__(self, name: str):
        # Only reached for attributes the wrapper lacks: forward them to the optimizer.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._optimizer, name)

    def zero_grad(self, *args, **kwargs) -> None:
        """Refused: the wrapper zeroes gradients itself after each optimizer step. The message
        names the fix for the loop that called it (a stock Trainer or LightningModule)."""
        raise GQCUsageError(zero_grad_message(calling_loop(sys._getframe(1))))

    def _extend_param_groups(self, groups) -> None:
        for name, initial in self.SCHEDULABLE.items():
            for index, group in enumerate(groups):
                if name in group:
                    check_number(f"param_groups[{index}]['{name}']", group[name], minimum=0)
                else:
                    group[name] = initial

    @property
    def device(self) -> torch.device:
        """Device of the first parameter."""
        return self._optimizer.param_groups[0]["params"][0].device

    @property
    def valid_schedule_targets(self) -> List[str]:
        """Numeric param-group keys present in every group: what schedules may target."""
        return [name for name, _ in self._scalar_group_values()]

    def _group_values(self, name: str) -> List[float]:
        return [group[name] for group in self._optimizer.param_groups]

    def _scalar_group_values(self) -> List[Tuple[str, List[float]]]:
        groups = self._optimizer.param_groups
        out = []
        for name, value in groups[0].items():
            if name == "params" or isinstance(value, bool):
                continue
            values = [group.get(name) for group in groups]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                out.append((name, values))
        return out
