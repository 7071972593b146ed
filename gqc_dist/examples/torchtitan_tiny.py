"""GQC in torchtitan 0.3.0: a tiny language model, FSDP2 over the ranks, under torchrun.

    torchrun --nproc_per_node 2 -m gqc_dist.examples.torchtitan_tiny

This module is a torchtitan config registry: :func:`tiny_gqc` is an ordinary ``Trainer.Config``
function turned into a ``GQCTrainer.Config`` by :func:`gqc_dist.frontends.torchtitan.with_gqc`.
Running the module calls torchtitan's own entry point, ``torchtitan.train.main``, with
``--module gqc_dist.examples.torchtitan_tiny --config tiny_gqc`` and your arguments (any
torchtitan option, or a key of the GQC section: ``--gradient_quality_control.kappa 1.0``). Every
step logs torchtitan's line and a ``gqc:`` line (window, micro-batches so far, applied lr); the
TensorBoard/W&B metrics carry ``gqc/window`` etc. About 20 s on 2 CPU cores, most of it imports.

Your own config function changes the same way (two lines)::

    from gqc_dist.frontends.torchtitan import with_gqc
    def llama3_debugmodel_gqc():
        return with_gqc(llama3_debugmodel(), {"algorithm": "cbc", "kappa": 0.25, "max_draws": 16})

and runs as ``torchrun ... -m torchtitan.train --module <your module> --config llama3_debugmodel_gqc``.

Demo-only scaffolding (not needed on a GPU machine with a stock model): a model of torchtitan's
``Embedding``/``Linear`` (the stock decoders attend with FlexAttention, which has no backward on
CPU in torch 2.13, or CUDA varlen), synthetic data (the torchtitan wheel ships no tokenizer or
dataset), and, only on a machine without an accelerator, :func:`use_cpu` (torchtitan 0.3.0 falls
back to ``"cuda"`` there) plus FSDP2's sum reduction (gloo has no ``PREMUL_SUM``).
"""

import sys
import types
from dataclasses import dataclass

import torch

VOCAB, STEP_CHOICES = 64, 3


def use_cpu() -> bool:
    """On a machine without an accelerator, point torchtitan 0.3.0 at the CPU before anything
    imports ``torchtitan.trainer`` (it picks ``"cuda"`` and binds the choice at import time).
    Returns whether it did."""
    import torchtitan.tools.utils as tools

    if tools._get_available_device_type() is not None:
        return False
    tools.device_type = "cpu"
    tools.device_module = types.SimpleNamespace(  # what torchtitan's memory monitor calls
        set_device=lambda device: None, device_count=lambda: 1, current_device=lambda: 0,
        get_device_name=lambda device=None: "cpu", is_available=lambda: True,
        get_device_properties=lambda device=None: types.SimpleNamespace(total_memory=1 << 34),
        reset_peak_memory_stats=lambda *args: None, empty_cache=lambda: None,
        memory_stats=lambda *args: {}, synchronize=lambda *args: None, manual_seed=torch.manual_seed)
    return True


def tiny_gqc():
    """Config function: the tiny model under ``GQCTrainer`` with CBC and the square-root lr rule."""
    from gqc_dist.frontends.torchtitan import with_gqc

    return with_gqc(_tiny_trainer_config(), {"algorithm": "cbc", "kappa": 2.0, "max_draws": 8,
                                             "lr_coupling": "sqrt"})


def _tiny_trainer_config():
    """A plain torchtitan ``Trainer.Config``, as a user's config function returns one."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.components.tokenizer import BaseTokenizer
    from torchtitan.components.validate import Validator
    from torchtitan.config import ParallelismConfig, TrainingConfig
    from torchtitan.models.common.embedding import Embedding
    from torchtitan.models.common.linear import Linear
    from torchtitan.protocols.model import BaseModel
    from torchtitan.protocols.model_spec import ModelSpec
    from torchtitan.tools import utils
    from torchtitan.trainer import Trainer

    class TinyLM(BaseModel):
        """Next-token logits from the current token alone (embedding, tanh layer, head)."""

        @dataclass(kw_only=True, slots=True)
        class Config(BaseModel.Config):
            dim: int = 32

            def update_from_config(self, *, config, **kwargs):
                pass

            def get_nparams_and_flops(self, model, seq_len):
                count = sum(p.numel() for p in model.parameters())
                return count, 6 * count

        def __init__(self, config):
            super().__init__()
            self.tok = Embedding.Config(num_embeddings=VOCAB, embedding_dim=config.dim).build()
            self.hidden = Linear.Config(in_features=config.dim, out_features=config.dim).build()
            self.lm_head = Linear.Config(in_features=config.dim, out_features=VOCAB).build()

        def forward(self, tokens, **kwargs):
            return self.lm_head(torch.tanh(self.hidden(self.tok(tokens))))

    def parallelize(model, *, parallel_dims, **kwargs):
        if parallel_dims.dp_shard_enabled:
            fully_shard(model, mesh=parallel_dims.get_mesh("fsdp"),
                        mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
            model.set_gradient_divide_factor(1.0)  # torchtitan's convention: loss / global tokens, FSDP sums
            if utils.device_type == "cpu":
                model.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        return model

    class NoTokenizer(BaseTokenizer):
        @dataclass(kw_only=True, slots=True)
        class Config(BaseTokenizer.Config):
            pass

        def __init__(self, config=None, *, tokenizer_path=None):
            super().__init__()
            self.eos_id = 0

        def encode(self, *args, **kwargs):
            return []

        def decode(self, *args, **kwargs):
            return ""

        def get_vocab_size(self):
            return VOCAB

    class CountingData(BaseDataLoader):
        """Sequences that count up from a random token by a random stride in 1..3: a model that
        sees one token can get the loss from ln 64 down to ln 3, so the gradient noise grows
        relative to the signal as it learns and CBC's windows grow."""

        @dataclass(kw_only=True, slots=True)
        class Config(BaseDataLoader.Config):
            pass

        def __init__(self, config, *, dp_rank, seq_len, local_batch_size, **kwargs):
            self.rank, self.seq_len, self.batch, self.index = dp_rank, seq_len, local_batch_size, 0

        def __iter__(self):
            while True:
                generator = torch.Generator().manual_seed(self.index * 131 + self.rank)
                self.index += 1
                start = torch.randint(0, VOCAB, (self.batch, 1), generator=generator)
                stride = torch.randint(1, STEP_CHOICES + 1, (self.batch, 1), generator=generator)
                tokens = (start + stride * torch.arange(self.seq_len + 1)) % VOCAB
                yield {"input": tokens[:, :-1]}, tokens[:, 1:]

        def state_dict(self):
            return {"index": self.index}

        def load_state_dict(self, state_dict):
            self.index = state_dict["index"]

    spec = ModelSpec(name="tiny", flavor="tiny", model=TinyLM.Config(), parallelize_fn=parallelize,
                     pipelining_fn=None, post_optimizer_build_fn=None, state_dict_adapter=None)
    return Trainer.Config(
        model_spec=spec, tokenizer=NoTokenizer.Config(), dataloader=CountingData.Config(),
        loss=CrossEntropyLoss.Config(global_vocab_size=VOCAB), hf_assets_path="/nonexistent",
        optimizer=default_adamw(lr=1e-2), lr_scheduler=LRSchedulersContainer.Config(warmup_steps=2),
        training=TrainingConfig(local_batch_size=4, seq_len=16, steps=20, mixed_precision_param="float32"),
        parallelism=ParallelismConfig(data_parallel_shard_degree=-1, spmd_backend="partial_dtensor"),
        metrics=MetricsProcessor.Config(log_freq=1, disable_color_printing=True),
        checkpoint=CheckpointManager.Config(enable=False), validator=Validator.Config(enable=False),
        dump_folder="./outputs/torchtitan_tiny")


def main(argv=None) -> None:
    use_cpu()
    from torchtitan.train import main as torchtitan_main

    argv = sys.argv[1:] if argv is None else argv
    sys.argv = ["torchtitan.train", "--module", "gqc_dist.examples.torchtitan_tiny",
                "--config", "tiny_gqc", *argv]
    torchtitan_main()


if __name__ == "__main__":
    main()
