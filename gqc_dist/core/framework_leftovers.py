"""Whose loop drives a GQC wrapper, and what to tell a framework's user who handed the wrapper to
the stock loop (a plain ``transformers.Trainer``, a plain ``LightningModule``): the messages of
the wrapper's ``step()`` and ``zero_grad()`` refusals. Read only on those paths (and a few frame
reads per ``step()``), never on the decision path."""

import os
from typing import Optional


def _in_package(*parts: str) -> str:
    return os.sep + os.sep.join(parts)


_TRAINER_LOOP = _in_package("transformers", "trainer.py")
_LIGHTNING = (_in_package("lightning", "pytorch", ""), _in_package("pytorch_lightning", ""))
# between a loop and the wrapper: an lr scheduler's step patch, GradScaler, AcceleratedOptimizer
_PASS_THROUGH = (_in_package("torch", "optim", ""), _in_package("torch", "amp", ""),
                 _in_package("accelerate", "optimizer.py"))

STOCK_TRAINER = ("a plain transformers.Trainer is driving a GQC wrapper (optimizers=(wrapper, scheduler)): it would "
                 "count every micro-batch as an optimizer step, step the lr scheduler on each and zero the window "
                 "after each; use gqc_dist.frontends.hf.GQCTrainer(..., gqc={...}) with the plain torch optimizer")
_STOCK_LIGHTNING = ("zero_grad() on a GQC wrapper was called by Lightning's loop: a plain LightningModule zeroes the "
                    "gradients every micro-batch, which would clear GQC's window; make "
                    "gqc_dist.frontends.lightning.GQCLightningModule the module's base class (it leaves zeroing, "
                    "scheduler steps and step counting to GQC)")


def calling_loop(frame) -> Optional[str]:
    """Whose loop called a wrapper method: ``"transformers"`` (the stock ``Trainer`` loop),
    ``"lightning"``, or ``None`` (a user's loop, gqc_dist's integrations, anything else). Frames
    of torch's optimizer and AMP code and of Accelerate's ``AcceleratedOptimizer`` in between are
    passed over; at most 6 frames are read."""
    for _ in range(6):
        if frame is None:
            return None
        name = frame.f_code.co_filename
        if name.endswith(_TRAINER_LOOP):
            return "transformers"
        if _LIGHTNING[0] in name or _LIGHTNING[1] in name:
            return "lightning"
        if not (_PASS_THROUGH[0] in name or _PASS_THROUGH[1] in name or _PASS_THROUGH[2] in name):
            return None
        frame = frame.f_back
    return None


def zero_grad_message(loop: Optional[str]) -> str:
    if loop == "transformers":
        return STOCK_TRAINER
    if loop == "lightning":
        return _STOCK_LIGHTNING
    return ("zero_grad() must not be called on a GQC wrapper: it accumulates gradients across micro-batches and "
            "zeroes them itself after each optimizer step. Remove the zero_grad() call from the training loop.")
