"""A GQC wrapper's ``state_dict()`` / ``load_state_dict()`` (a mixin of
:class:`gqc_dist.core.wrapper.GQCOptimizerWrapper`); the format and its checks are
:mod:`gqc_dist.core.checkpoint_state`."""

import copy
from typing import Any, Dict

from gqc_dist.core import checkpoint_state
from gqc_dist.core.reduction import POLICY_KEY
from gqc_dist.errors import CheckpointError, GQCUsageError


class WrapperCheckpoints:
    """Per-rank checkpoints of the wrapper, its optimizer and the open window's gradients."""

    def state_dict(self, include_optimizer: bool = True) -> Dict[str, Any]:
        """A deep copy of the wrapper, optimizer and accumulated-gradient state.

        ``include_optimizer=False`` leaves the optimizer's state out (``"optimizer": None``) for
        callers whose engine checkpoints it (torch.distributed.checkpoint, DeepSpeed).

        Mid-window (``num_draws > 0``) it carries this rank's accumulated gradients (as the
        engine adapter keeps them), so that ``load_state_dict`` resumes exactly where the run
        stopped. Each rank saves its own (under FSDP2 and ZeRO, its own shards). Process-group
        policies are not saved. Format: :mod:`gqc_dist.core.checkpoint_state`.
        """
        if self._part is not None:
            raise GQCUsageError("state_dict() between after_part() and after_backward(): the micro-batch's first "
                                "part would not be saved; checkpoint after its after_backward()")
        optimizer_state = None
        if include_optimizer:
            optimizer_state = self._optimizer.state_dict()
            optimizer_state["param_groups"] = [
                {k: v for k, v in group.items() if k != POLICY_KEY}
                for group in optimizer_state["param_groups"]
            ]
        return {
            "format": checkpoint_state.FORMAT,
            "algorithm": self.ALGORITHM,
            "max_draws": self._max_draws,
            "counters": dict(self._counters),
            "algorithm_state": copy.deepcopy(self._algorithm_state()),
            "optimizer": copy.deepcopy(optimizer_state),
            "accumulated_grads": self._gradients.save_accumulated() if self._counters["num_draws"] else None,
            "noise_state": self._noise.state_dict(),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; validates everything before changing anything.

        Also accepts torch-gqc's ``{"wrapper_states", "optimizer_states"}`` saved at a step
        boundary. Raises :class:`CheckpointError` naming what is wrong otherwise.
        """
        state_dict = checkpoint_state.upgrade_torch_gqc(state_dict, self.ALGORITHM, self._max_draws,
                                                        self._algorithm_state_from_torch_gqc)
        checkpoint_state.validate(state_dict, self.ALGORITHM, self._max_draws, self._gradients.check_accumulated)
        if state_dict["optimizer"] is not None:  # None: the engine restores the optimizer itself
            policies = [group.get(POLICY_KEY) for group in self._optimizer.param_groups]
            try:
                self._optimizer.load_state_dict(copy.deepcopy(state_dict["optimizer"]))
            except (ValueError, KeyError, RuntimeError) as error:
                raise CheckpointError(f"optimizer state does not fit this optimizer: {error}") from error
            for group, policy in zip(self._optimizer.param_groups, policies):
                if policy is not None:
                    group[POLICY_KEY] = policy
        self._gradients.restore_accumulated(state_dict["accumulated_grads"])
        self._counters = dict(state_dict["counters"])
        if "noise_state" in state_dict:
            self._noise.load_state_dict(state_dict["noise_state"])
        self._load_algorithm_state(copy.deepcopy(state_dict["algorithm_state"]))

    def _algorithm_state_from_torch_gqc(self, values: Dict[str, Any]) -> Dict[str, Any]:
        return self._algorithm_state()
