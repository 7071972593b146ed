"""Import paths from before the layout of core/, engines/ and frontends/ (0.1.0 of 2026-12-07):
``import gqc_dist.deepspeed``, ``from gqc_dist.integrations.hf import GQCTrainer`` and the rest
still work and give the module itself (not a copy), so users' scripts and anything pickled by
module path keep loading."""

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "gqc_dist.checkpoint_state": "gqc_dist.core.checkpoint_state",
    "gqc_dist.collectives": "gqc_dist.core.collectives",
    "gqc_dist.costs": "gqc_dist.core.costs",
    "gqc_dist.grad_norms": "gqc_dist.core.grad_norms",
    "gqc_dist.local_mode": "gqc_dist.core.local_mode",
    "gqc_dist.micro_step": "gqc_dist.core.micro_step",
    "gqc_dist.noise_scale": "gqc_dist.core.noise_scale",
    "gqc_dist.optimizer_lookalike": "gqc_dist.core.optimizer_lookalike",
    "gqc_dist.packet": "gqc_dist.core.packet",
    "gqc_dist.reduction": "gqc_dist.core.reduction",
    "gqc_dist.rules": "gqc_dist.core.rules",
    "gqc_dist.window": "gqc_dist.core.window",
    "gqc_dist.wrapper": "gqc_dist.core.wrapper",
    "gqc_dist.deepspeed_checkpoint": "gqc_dist.engines.deepspeed_checkpoint",
    "gqc_dist.fsdp2_sync": "gqc_dist.engines.fsdp2",
    "gqc_dist.moe": "gqc_dist.engines.moe",
    "gqc_dist.deepspeed": "gqc_dist.frontends.deepspeed",
    "gqc_dist.framework_leftovers": "gqc_dist.core.framework_leftovers",
    "gqc_dist.integrations": "gqc_dist.frontends",
    "gqc_dist.integrations.accelerate": "gqc_dist.frontends.accelerate",
    "gqc_dist.integrations.hf": "gqc_dist.frontends.hf",
    "gqc_dist.integrations.lightning": "gqc_dist.frontends.lightning",
    "gqc_dist.integrations.torchtitan": "gqc_dist.frontends.torchtitan",
    "gqc_dist.train.engines": "gqc_dist.train.backends",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and loads it as the module at its new one."""

    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=name == "gqc_dist.integrations")

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # the module at the new name is already executed


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # before the path finder, which would load a second copy
