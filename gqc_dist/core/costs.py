"""What a micro-step, a window's gradient reduction and an optimizer step cost, in seconds.

Measured by the wrapper where they happen, with the host clock, on every rank:

* ``micro_step_s``: the time from one ``step()`` call's return to the next one's, less what that
  call spent reducing and stepping: the forward, backward and GQC's own statistics of one
  micro-batch (each call ends in the packet's host synchronisation, so on a GPU the queued
  kernels are inside it; an optimizer step's kernels that are still queued when ``step()``
  returns land in the next micro-step).
* ``reduction_s``: local accumulation only: averaging the rank-local sums over the ranks at a
  step (``reduce_local`` and the exact re-read that ends in a host synchronisation). In exact
  mode the engine reduces inside every backward, so it is part of ``micro_step_s``.
* ``optimizer_step_s``: the window hook, averaging and the engine's optimizer step.

Each is an exponential moving average (factor ``beta`` per sample) of samples capped at three
times the average so far: the host loop's own pauses between two ``step()`` calls (an
evaluation, a checkpoint) are not a micro-step's cost, and one of them must not swing it. Every
micro-step's packet carries this rank's averages as a sum field (three floats), so every rank
reads the mean over the ranks: ``statistics()`` is the same everywhere and a rule that decides
on costs (``goodput``) decides alike without a new collective.
"""

import time
from typing import Dict, List, Optional

FIELDS = ("micro_step_s", "reduction_s", "optimizer_step_s")


class CostMeter:
    """This rank's smoothed costs, and the last values shared by every rank (see the module)."""

    def __init__(self, beta: float = 0.9):
        self.beta = beta
        self.local: Dict[str, Optional[float]] = {name: None for name in FIELDS}
        self.shared: Dict[str, Optional[float]] = {name: None for name in FIELDS}
        self._last_return: Optional[float] = None
        self._spent = 0.0  # seconds of this call spent reducing and stepping

    def _add(self, name: str, seconds: float) -> None:
        old = self.local[name]
        if old is None:
            self.local[name] = seconds
        else:
            self.local[name] = self.beta * old + (1 - self.beta) * min(seconds, 3 * old)

    def reduced(self, seconds: float) -> None:
        """This call averaged the local sums over the ranks in ``seconds``."""
        self._add("reduction_s", seconds)
        self._spent += seconds

    def stepped(self, seconds: float) -> None:
        """This call took the optimizer step in ``seconds``."""
        self._add("optimizer_step_s", seconds)
        self._spent += seconds

    def returned(self) -> None:
        """``step()`` is about to return: the time since the previous return, less this call's
        reduction and step, is one micro-step."""
        now = time.perf_counter()
        if self._last_return is not None:
            self._add("micro_step_s", max(0.0, now - self._last_return - self._spent))
        self._last_return, self._spent = now, 0.0

    def packet_values(self) -> List[float]:
        """This rank's averages for the packet (0 where not yet measured)."""
        return [self.local[name] or 0.0 for name in FIELDS]

    def share(self, summed: List[float], world: int) -> None:
        """The packet's sum over ranks: every rank now holds the same means."""
        self.shared = {name: value / world for name, value in zip(FIELDS, summed)}

    def statistics(self) -> Dict[str, float]:
        """The means over the ranks from the last packet (0 for what no rank has measured yet)."""
        return {f"cost_{name}": value for name, value in self.shared.items() if value is not None}
