"""Divergence: a run whose windows keep going non-finite ends, instead of spending its budget.

The GQC wrapper drops a window whose gradient holds inf/NaN on any rank (nothing is stepped).
A few such windows are normal (fp16 loss-scale overflows); a run that drops most of its windows
has diverged, and more micro-batches will not bring it back. :class:`DivergenceWatch` counts the
windows (stepped or dropped) as every rank sees them, from values the micro-step's all-reduce
delivered, so every rank decides alike, and stops the run when ``limit`` windows in a row, or
``limit`` of the last ``2 * limit``, were dropped or stepped with a non-finite loss
(``train.max_nonfinite_windows``).

It also tells which checkpoint a diverged run can go back to (:attr:`DivergenceWatch.last_good`):
a checkpoint holds the parameters the next window's micro-batches are computed with, so it is
known good only once a window after it stepped with a finite loss. A checkpoint taken right before
the windows went non-finite has finite parameters that give a non-finite loss (or gradient) on the
next micro-batch: it is never named good (measured: ``optimizer.lr=1e6`` named ``step_000002``,
whose model gives a NaN loss on any input, while ``step_000001``'s loss is finite).
"""

import math
from collections import deque
from typing import Optional


class TrainDiverged(Exception):
    """The run diverged; ``str()`` is the one line gqc-train prints."""


class DivergenceWatch:
    """Args: ``limit``, the number of bad windows that ends the run (see the module docstring);
    ``last_good``: the newest checkpoint known good before this process (a resumed run: what the
    checkpoint it resumed from recorded); ``unproven``: a checkpoint no window has stepped from
    yet (a resumed run: the one it resumed from)."""

    def __init__(self, limit: int, last_good: Optional[str] = None, unproven: Optional[str] = None):
        self.limit = limit
        self._recent = deque(maxlen=2 * limit)  # (bad, dropped, step, micro_step, loss) per window
        self._streak = 0
        #: the newest checkpoint a later window stepped from with a finite loss (``None``: none)
        self.last_good = last_good
        self._unproven = unproven

    def saved(self, name: str) -> None:
        """A checkpoint ``name`` was just written: good once the next stepped window's loss is finite."""
        self._unproven = name

    def window(self, dropped: bool, loss: float, step: int, micro_step: int) -> None:
        """Account one window: ``dropped`` by the wrapper, or stepped with mean ``loss``; ``step``
        and ``micro_step``: the run's counters when it ended."""
        bad = dropped or not math.isfinite(loss)
        self._streak = self._streak + 1 if bad else 0
        self._recent.append((bad, dropped, step, micro_step, loss))
        # a dropped window changed no parameter and proves nothing (a fp16 overflow is no verdict on
        # the checkpoint); a stepped one computed its loss from the unproven checkpoint's parameters
        if not dropped and self._unproven is not None:
            if not bad:
                self.last_good = self._unproven
            self._unproven = None

    @property
    def healthy(self) -> bool:
        """Whether a checkpoint now would hold a sound state: the last window was good and fewer
        than half the limit of the recent windows were bad (a few fp16 overflows are fine)."""
        return self._streak == 0 and sum(entry[0] for entry in self._recent) < max(1, self.limit // 2)

    def verdict(self) -> Optional[str]:
        """``None`` while the run is sound; else what went wrong and since when."""
        bad = [entry for entry in self._recent if entry[0]]
        if self._streak < self.limit and len(bad) < self.limit:
            return None
        dropped = sum(entry[1] for entry in bad)
        first = bad[0]
        what = []
        if dropped:
            what.append(f"{dropped} had a non-finite gradient (dropped)")
        if len(bad) > dropped:
            what.append(f"{len(bad) - dropped} a non-finite loss")
        last_loss = next((entry[4] for entry in reversed(self._recent) if entry[4] is not None), math.nan)
        return (f"{len(bad)} of the last {len(self._recent)} windows went non-finite ({', '.join(what)}; "
                f"last loss {last_loss:g}) since optimizer step {first[2]} (micro-step {first[3]})")
