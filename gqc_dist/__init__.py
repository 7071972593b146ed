"""gqc_dist: Gradient Quality Control (adaptive gradient accumulation) for distributed training.

A drop-in for torch-gqc (``gradient_quality_control``) whose norms are exact on every layout
(single process, DDP, FSDP2/HSDP, mixed MoE) with one small all-reduce per micro-step and
decisions identical on every rank.
"""

from gqc_dist import _moved

_moved.install()

from gqc_dist.algorithms.cbc import OptimizerWrapperCBC, make_cbc_with_cosine_annealing_schedule
from gqc_dist.algorithms.fixed import OptimizerWrapperFixed
from gqc_dist.algorithms.goodput import OptimizerWrapperGoodput
from gqc_dist.algorithms.gnr import (
    OptimizerWrapperGNR,
    make_gnr_with_cosine_annealing_schedule,
    make_gnr_with_cosine_annealing_schedule_conventional_lr,
)
from gqc_dist.algorithms.gns import (
    OptimizerWrapperGNS,
    make_gns_default,
    make_gns_with_cosine_annealing_schedule,
)
from gqc_dist.algorithms.gnts import (
    OptimizerWrapperGNTS,
    make_gnts_with_cosine_annealing_schedule,
    make_gnts_with_cosine_annealing_schedule_conventional_lr,
)
from gqc_dist.algorithms.mht import OptimizerWrapperMHT, make_mht_with_warmup_schedule
from gqc_dist.algorithms.sbc import (
    OptimizerWrapperSBC,
    make_sbc_with_polynomial_schedule,
    make_sbc_with_polynomial_schedule_conventional_lr,
)
from gqc_dist.errors import (
    CheckpointError,
    CollectiveTimeoutError,
    GQCConfigError,
    GQCError,
    GQCTypeError,
    GQCUsageError,
    PartialGradientError,
    RankDivergenceError,
)
from gqc_dist.core.reduction import Replicated, Sharded
from gqc_dist.core.window import LRCoupling, Window
from gqc_dist.core.wrapper import GQCOptimizerWrapper

__version__ = "0.1.0"

__all__ = [
    "GQCOptimizerWrapper",
    "OptimizerWrapperGNTS",
    "make_gnts_with_cosine_annealing_schedule",
    "make_gnts_with_cosine_annealing_schedule_conventional_lr",
    "OptimizerWrapperGNS",
    "make_gns_default",
    "make_gns_with_cosine_annealing_schedule",
    "OptimizerWrapperGNR",
    "make_gnr_with_cosine_annealing_schedule",
    "make_gnr_with_cosine_annealing_schedule_conventional_lr",
    "OptimizerWrapperSBC",
    "make_sbc_with_polynomial_schedule",
    "make_sbc_with_polynomial_schedule_conventional_lr",
    "OptimizerWrapperMHT",
    "make_mht_with_warmup_schedule",
    "OptimizerWrapperFixed",
    "OptimizerWrapperCBC",
    "make_cbc_with_cosine_annealing_schedule",
    "OptimizerWrapperGoodput",
    "LRCoupling",
    "Window",
    "Replicated",
    "Sharded",
    "GQCError",
    "GQCConfigError",
    "GQCTypeError",
    "GQCUsageError",
    "PartialGradientError",
    "RankDivergenceError",
    "CheckpointError",
    "CollectiveTimeoutError",
    "__version__",
]
