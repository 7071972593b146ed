"""Lightning's ``DeepSpeedStrategy`` with ``engine.step()`` a GQC decision (re-exported by
:mod:`gqc_dist.frontends.lightning`, where users import it from)."""

import argparse
from typing import Optional

from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from gqc_dist.core.wrapper import GQCOptimizerWrapper
from gqc_dist.errors import GQCConfigError
from gqc_dist.frontends.lightning import GQCLightningModule, check_trainer


def _deepspeed_on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


class GQCDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` with ``engine.step()`` a GQC decision.

    Takes ``DeepSpeedStrategy``'s arguments and ``gqc``: a ``gradient_quality_control`` section
    (e.g. ``{"algorithm": "gnts", "threshold": 0.5, "max_draws": 16}``), or ``None`` for the
    section inside ``config``. DeepSpeed runs with caller-owned accumulation
    (``gqc_dist.frontends.deepspeed.split_config`` / ``attach_controller``); ``gradient_clip_val`` (DeepSpeed's
    ``gradient_clipping``) is applied by GQC to the window mean. ``configure_optimizers``
    returns the plain torch optimizer. Runs on CPU too when DeepSpeed's accelerator is the CPU
    (``DS_ACCELERATOR=cpu``, ``Trainer(accelerator="cpu")``).
    """

    strategy_name = "gqc_deepspeed"

    def __init__(self, *args, gqc: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        from gqc_dist.config import parse_section

        self.gqc_section = None if gqc is None else parse_section(gqc)

    def _on_cpu(self) -> bool:
        return self.root_device.type == "cpu" and _deepspeed_on_cpu()

    def setup_environment(self) -> None:
        if self._on_cpu():  # DeepSpeedStrategy refuses anything but CUDA; DeepSpeed's CPU accelerator works
            DDPStrategy.setup_environment(self)
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if self._on_cpu():  # the parent insists on CUDA device indices
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
        else:
            super().setup_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        """PRIVATE in Lightning 2.6 (``DeepSpeedStrategy._setup_model_and_optimizer``): the one
        place Lightning calls ``deepspeed.initialize`` for training."""
        import deepspeed

        from gqc_dist.frontends.deepspeed import attach_controller, split_config

        if isinstance(optimizer, GQCOptimizerWrapper):
            raise GQCConfigError(
                "under GQCDeepSpeedStrategy configure_optimizers returns the plain torch optimizer; the GQC section goes "
                "to GQCDeepSpeedStrategy(gqc={...}) or into the DeepSpeed config")
        module = self.lightning_module
        if not isinstance(module, GQCLightningModule):
            raise GQCConfigError(
                f"GQCDeepSpeedStrategy needs a GQCLightningModule (it owns zeroing, scheduler steps and step counting), "
                f"got {type(module).__name__}")
        check_trainer(module.trainer, module)
        ds_config, section, clip = split_config(self.config, model, self.gqc_section)
        index = self.root_device.index
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank if index is None else index),
            config=ds_config, model=model, model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False)
        attach_controller(engine, section, clip)
        return engine, ds_optimizer
