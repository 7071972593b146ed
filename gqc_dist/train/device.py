"""Where gqc-train runs and in what precision, and what the hardware could do at best.

* ``device``: ``auto`` (each rank on its ``LOCAL_RANK`` GPU when CUDA is present, else the CPU),
  ``cpu`` or ``cuda``. ``GQC_TRAIN_SHARE_GPUS=1`` puts rank ``LOCAL_RANK mod GPUs`` on each GPU
  (several ranks sharing one, with ``GQC_TRAIN_BACKEND=gloo``: NCCL refuses that). Model, batches (pinned host memory, non-blocking copies), evaluation and
  the controller's statistics live there; collectives use NCCL on CUDA and gloo on the CPU.
* ``precision``: ``fp32``; ``bf16`` (autocast; FSDP2 keeps bf16 parameters for compute and
  reduces gradients in fp32; DeepSpeed gets its ``bf16`` section); ``fp16`` (autocast with the
  wrapper's GradScaler on the torch engines; DeepSpeed's ``fp16`` section).
* Model FLOPs utilization: ``6 N + 12 L d T`` FLOPs per token (PaLM's count: ``N`` parameters,
  ``L`` layers, width ``d``, sequence ``T``) against the device's dense peak.
"""

import contextlib
import os
from typing import Optional

import torch

from gqc_dist.errors import GQCConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; fp32 uses TF32 where
# the card has it. Matched by substring of torch.cuda.get_device_name(); --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "V100": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def resolve_device(choice: str) -> torch.device:
    """The device this rank trains on for ``choice`` (one of :data:`DEVICES`)."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GQCConfigError("device 'cuda' was asked for, but torch sees no CUDA device "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if os.environ.get("GQC_TRAIN_SHARE_GPUS") == "1":  # several ranks per GPU (benchmarks/gpu_check.sh)
        local %= torch.cuda.device_count()
    if local >= torch.cuda.device_count():
        raise GQCConfigError(f"LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()}")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def autocast(device: torch.device, precision: str):
    """The forward pass's autocast context (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> Optional[torch.amp.GradScaler]:
    """A GradScaler for fp16 on the torch engines (the GQC wrapper updates it); else ``None``."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def peak_tflops(device: torch.device, override: Optional[float]) -> Optional[float]:
    """The device's dense peak in TFLOP/s: ``override``, a table entry for the GPU, or ``None``
    (CPUs and unknown cards: no MFU is reported)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def flops_per_token(num_params: int, layers: int, dim: int, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward): ``6 N + 12 L d T``."""
    return 6.0 * num_params + 12.0 * layers * dim * seq_len
