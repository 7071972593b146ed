"""A Lightning 2.6 script with GQC: the lines that differ from plain Lightning are marked ``# GQC``.

    python -m gqc_dist.examples.lightning_mlp                       # one process
    python -m gqc_dist.examples.lightning_mlp --manual              # manual optimization
    python -m gqc_dist.examples.lightning_mlp --devices 2           # DDP, 2 processes (Lightning launches them)
    python -m gqc_dist.examples.lightning_mlp --devices 2 --deepspeed   # GQCDeepSpeedStrategy, ZeRO-2

A small MLP regression, built from code, on CPU unless ``--accelerator gpu``; rank 0 prints one
line per optimizer step (micro-batches in the window, the lr it stepped with) and, at the end,
``trainer.global_step`` next to the controller's own step count.
"""

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator on import

import lightning.pytorch as pl  # noqa: E402

import gqc_dist  # noqa: E402
from gqc_dist.frontends.lightning import GQCDeepSpeedStrategy, GQCLightningModule  # noqa: E402  # GQC

SECTION = {"algorithm": "gnts", "threshold": 1.1, "max_draws": 5}


class Regression(GQCLightningModule):  # GQC: was pl.LightningModule
    def __init__(self, manual: bool = False, deepspeed: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.automatic_optimization = not manual
        self.deepspeed = deepspeed

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        if not self.automatic_optimization:
            self.manual_backward(loss)
            if self.optimizers().step():  # GQC: True when the optimizer stepped (no zero_grad)
                self.lr_schedulers().step()
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-2, weight_decay=0.01)
        if not self.deepspeed:  # under DeepSpeed the strategy attaches GQC to the engine
            optimizer = gqc_dist.OptimizerWrapperGNTS(optimizer, max_batch_draws=SECTION["max_draws"])  # GQC
            optimizer.param_groups[0]["gradient_norm_threshold"] = SECTION["threshold"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 0.3 * step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        window = self.gqc.last_window
        if self.gqc_stepped and self.trainer.is_global_zero:
            print(f"step {window.step + 1:3d}: {window.num_draws} micro-batches, lr {window.lr:.5f}", flush=True)


def batches(count: int, batch: int, rank: int, world: int):
    """The same global micro-batches for every world size; each rank takes its rows."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        x, y = torch.randn(batch, 8, generator=generator), torch.randn(batch, 1, generator=generator)
        out.append((x.chunk(world)[rank], y.chunk(world)[rank]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--manual", action="store_true")
    parser.add_argument("--deepspeed", action="store_true")
    parser.add_argument("--micro-batches", type=int, default=48)
    args = parser.parse_args(argv)

    strategy = "ddp" if args.devices > 1 else "auto"
    if args.deepspeed:  # GQC: the strategy, with the section (caller-owned accumulation, ZeRO-2)
        strategy = GQCDeepSpeedStrategy(stage=2, gqc=SECTION, logging_batch_size_per_gpu=8 // args.devices,
                                        zero_allow_untested_optimizer=True)
    trainer = pl.Trainer(max_epochs=1, accelerator=args.accelerator, devices=args.devices, strategy=strategy,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    model = Regression(manual=args.manual, deepspeed=args.deepspeed)
    # each rank's loader yields its rows of the same global micro-batches (8 samples each)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    data = batches(args.micro_batches, 8, rank, args.devices)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=None))
    if trainer.is_global_zero:
        print(f"trainer.global_step {trainer.global_step} = optimizer steps {model.gqc.num_steps} "
              f"over {model.gqc.num_batches} micro-batches", flush=True)


if __name__ == "__main__":
    main()
