"""Throughput of a gqc-train run: tokens per second, time per micro-step, model FLOPs
utilization, and the share of time the GQC statistics take.

Measured per optimizer step (the window since the previous one). The GQC share is sampled: every
``sample_every``-th micro-step's controller call that did not step (pure statistics: local norms,
one all-reduce, the decision) is timed, fenced by device synchronisations on CUDA so that queued
backward kernels are not counted; the mean is scaled by the window's micro-steps.
"""

import time
from typing import Dict, Optional

import torch


class Throughput:
    """Args: global tokens per micro-step, world size, training FLOPs per token, the device's
    peak TFLOP/s (``None``: no MFU), the device."""

    def __init__(self, tokens_per_micro_step: int, world: int, flops_per_token: float,
                 peak_tflops: Optional[float], device: torch.device, sample_every: int = 8):
        self.tokens_per_micro_step = tokens_per_micro_step
        self.world = world
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.device = device
        self.sample_every = sample_every
        self._window_start = time.perf_counter()
        self._micro_steps = 0
        self._count = 0
        self._gqc_seconds = 0.0
        self._gqc_samples = 0
        self._timing = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_decision(self) -> None:
        """Call right before the controller's step()."""
        self._micro_steps += 1
        self._count += 1
        self._timing = None
        if self._count % self.sample_every == 0:
            self._sync()
            self._timing = time.perf_counter()

    def after_decision(self, stepped: bool) -> None:
        """Call right after it; a sampled call that did not step counts as statistics time."""
        if self._timing is not None and not stepped:
            self._sync()
            self._gqc_seconds += time.perf_counter() - self._timing
            self._gqc_samples += 1

    def window(self) -> Dict[str, Optional[float]]:
        """The figures of the window that just ended in an optimizer step; starts the next."""
        now = time.perf_counter()
        seconds = max(now - self._window_start, 1e-9)
        tokens_per_s = self._micro_steps * self.tokens_per_micro_step / seconds
        out = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_rank": tokens_per_s / self.world,
               "micro_step_s": seconds / max(1, self._micro_steps), "mfu": None, "gqc_fraction": None}
        if self.peak_tflops:
            out["mfu"] = tokens_per_s / self.world * self.flops_per_token / (self.peak_tflops * 1e12)
        if self._gqc_samples:
            out["gqc_fraction"] = min(1.0, self._gqc_seconds / self._gqc_samples / out["micro_step_s"])
        self._window_start, self._micro_steps = now, 0
        return out
