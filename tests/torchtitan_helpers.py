"""Test-only scaffolding for the torchtitan recipe on CPU (none of it belongs in the library).

torchtitan 0.3.0 cannot train on a CPU out of the box; each piece here works around one measured
obstacle (see the research notes of issue 18, section 4.3):

* the CPU device shim is in ``tests/torchtitan_launch.py``: it must run before this module (or
  anything else) imports ``torchtitan.trainer``.
* :class:`TinyLM` and :func:`tiny_spec`: the stock decoders attend with FlexAttention (no
  backward on CPU in torch 2.13) or varlen (CUDA flash), so the test model is an embedding, a
  hidden layer and a head built from torchtitan's own ``Embedding``/``Linear`` configs.
* :func:`parallelize_tiny`: FSDP2 over the ``fsdp`` mesh with torchtitan's divide factor 1 (the
  loss is divided by the global token count, FSDP sums) and the force-sum reduction, because gloo
  rejects the ``PREMUL_SUM`` FSDP2 would otherwise use.
* :class:`NullTokenizer`, :class:`SyntheticLoader`: the wheel ships no tokenizer or dataset
  assets; the loader yields seeded random tokens, a pure function of (micro-batch index, rank)
  (:func:`micro_batch`), so the oracle loop can draw the very same micro-batches.
* :class:`RecordingGQCTrainer`: ``GQCTrainer`` plus observation only (per-step records, a
  metrics logger that keeps what torchtitan logs, parameters at init and at close) in
  :data:`RUNS`, read by ``tests/torchtitan_launch.py``.
"""

import dataclasses
import os
from dataclasses import dataclass

import torch

VOCAB, DIM, SEQ, LOCAL_BATCH = 64, 32, 8, 2
LR, WARMUP, STEPS, MAX_NORM = 2e-3, 2, 5, 0.4
#: the GQC section the recorded runs start from (max_draws is overridden on the command line)
SECTION = {"algorithm": "gnts", "max_draws": 6, "lr_coupling": "sqrt",
           "schedule": {"num_training_steps": STEPS, "num_warmup_steps": 1,
                        "initial_threshold": 0.5, "final_threshold": 0.3, "warmup_multiplier": 2}}
#: one dict per trainer this process built: {"init", "steps", "metrics", "final", ...}
RUNS = []


def micro_batch(index: int, rank: int, seed: int = 0):
    """Micro-batch ``index`` of data-parallel rank ``rank``: ``({"input": x}, labels)``."""
    generator = torch.Generator().manual_seed(seed * 100003 + index * 131 + rank)
    tokens = torch.randint(0, VOCAB, (LOCAL_BATCH, SEQ + 1), generator=generator)
    return {"input": tokens[:, :-1]}, tokens[:, 1:]


def lr_factor(step_index: int) -> float:
    """The lr multiplier of torchtitan's default scheduler (linear warmup over WARMUP steps, one
    stable step, linear decay to 0 at STEPS), written out independently for the oracle."""
    if step_index < WARMUP:
        return (step_index + 1) / WARMUP
    if step_index == WARMUP:
        return 1.0
    return 1.0 - (step_index - WARMUP) / (STEPS - WARMUP)


from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torchtitan.components.checkpoint import CheckpointManager  # noqa: E402
from torchtitan.components.dataloader import BaseDataLoader  # noqa: E402
from torchtitan.components.loss import CrossEntropyLoss  # noqa: E402
from torchtitan.components.metrics import BaseLogger, MetricsProcessor  # noqa: E402
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw  # noqa: E402
from torchtitan.components.tokenizer import BaseTokenizer  # noqa: E402
from torchtitan.components.validate import Validator  # noqa: E402
from torchtitan.config import ParallelismConfig, TrainingConfig  # noqa: E402
from torchtitan.models.common.embedding import Embedding  # noqa: E402
from torchtitan.models.common.linear import Linear  # noqa: E402
from torchtitan.protocols.model import BaseModel  # noqa: E402
from torchtitan.protocols.model_spec import ModelSpec  # noqa: E402
from torchtitan.trainer import Trainer  # noqa: E402

from gqc_dist.frontends.torchtitan import GQCTrainer, with_gqc  # noqa: E402


class TinyLM(BaseModel):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseModel.Config):
        vocab: int = VOCAB
        dim: int = DIM

        def update_from_config(self, *, config, **kwargs):
            pass

        def get_nparams_and_flops(self, model, seq_len):
            count = sum(p.numel() for p in model.parameters())
            return count, 6 * count

    def __init__(self, config):
        super().__init__()
        self.tok = Embedding.Config(num_embeddings=config.vocab, embedding_dim=config.dim).build()
        self.hidden = Linear.Config(in_features=config.dim, out_features=config.dim).build()
        self.lm_head = Linear.Config(in_features=config.dim, out_features=config.vocab).build()

    def forward(self, tokens, **kwargs):
        return self.lm_head(torch.tanh(self.hidden(self.tok(tokens))))


def parallelize_tiny(model, *, parallel_dims, **kwargs):
    if parallel_dims.dp_shard_enabled:
        policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        fully_shard(model, mesh=parallel_dims.get_mesh("fsdp"), mp_policy=policy)
        model.set_gradient_divide_factor(1.0)  # torchtitan's convention: loss / global tokens, FSDP sums
        model.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


class NullTokenizer(BaseTokenizer):
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


class SyntheticLoader(BaseDataLoader):
    """Endless :func:`micro_batch` es of this rank; its position is checkpointed."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        seed: int = 0

    def __init__(self, config, *, dp_rank, **kwargs):
        self.rank, self.seed, self.index = dp_rank, config.seed, 0

    def __iter__(self):
        while True:
            batch = micro_batch(self.index, self.rank, self.seed)
            self.index += 1
            yield batch

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state_dict):
        self.index = state_dict["index"]


def tiny_spec():
    return ModelSpec(name="tiny", flavor="tiny", model=TinyLM.Config(), parallelize_fn=parallelize_tiny,
                        pipelining_fn=None, post_optimizer_build_fn=None, state_dict_adapter=None)


def tiny_trainer_config():
    """A plain ``Trainer.Config`` for the tiny model, as a user's config function returns it."""
    return Trainer.Config(
        model_spec=tiny_spec(), tokenizer=NullTokenizer.Config(), dataloader=SyntheticLoader.Config(),
        loss=CrossEntropyLoss.Config(global_vocab_size=VOCAB), hf_assets_path="/nonexistent",
        optimizer=default_adamw(lr=LR), lr_scheduler=LRSchedulersContainer.Config(warmup_steps=WARMUP),
        training=TrainingConfig(local_batch_size=LOCAL_BATCH, seq_len=SEQ, steps=STEPS, max_norm=MAX_NORM,
                                   mixed_precision_param="float32"),
        parallelism=ParallelismConfig(data_parallel_shard_degree=-1, spmd_backend="partial_dtensor"),
        metrics=MetricsProcessor.Config(log_freq=1, disable_color_printing=True),
        checkpoint=CheckpointManager.Config(enable=True, interval=2, last_save_model_only=False),
        validator=Validator.Config(enable=False))


class RecordingLogger(BaseLogger):
    """Keeps what torchtitan's MetricsProcessor hands its loggers (TensorBoard, W&B)."""

    def __init__(self, sink):
        self.sink = sink

    def log(self, metrics, step):
        self.sink.append({"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})


def _full_params(model_parts):
    return {name: param.full_tensor().detach().clone() if hasattr(param, "full_tensor") else param.detach().clone()
            for part in model_parts for name, param in part.named_parameters()}


class RecordingGQCTrainer(GQCTrainer):
    """GQCTrainer plus observation: nothing here changes what it computes."""

    @dataclass(kw_only=True, slots=True)
    class Config(GQCTrainer.Config):
        pass

    def __init__(self, config):
        super().__init__(config)
        self.record = {"init": _full_params(self.model_parts), "steps": [], "metrics": [],
                       "section": dict(config.gradient_quality_control)}
        RUNS.append(self.record)
        self.metrics_processor.logger = RecordingLogger(self.record["metrics"])

    def train_step(self, data_iterator):
        if not self.record["steps"]:  # after torchtitan's checkpoint load, before the first step
            self.record["loaded"] = {"step": self.step, "num_steps": self.gqc.num_steps,
                                     "num_batches": self.gqc.num_batches,
                                     "dataloader": self.dataloader.state_dict()}
        scheduled = self.lr_schedulers.get_metrics()["lr/AdamW"]
        super().train_step(data_iterator)
        window = self.gqc.last_window
        self.record["steps"].append({
            "step": self.step, "window": window.num_draws, "applied_lr": window.lr, "scheduled_lr": scheduled,
            "group_lr_after": self.gqc.param_groups[0]["lr"],
            "threshold": self.gqc.param_groups[0]["gradient_norm_threshold"],
            "num_steps": self.gqc.num_steps, "num_batches": self.gqc.num_batches,
            "last_epoch": self.lr_schedulers.schedulers[0].last_epoch,
            "grad_norm": self.gqc.last_grad_norm})

    def close(self):
        if hasattr(self, "record"):
            self.record["final"] = _full_params(self.model_parts)
            self.record["final_step"] = self.step
        super().close()


def recorded():
    """Config function (``--module torchtitan_helpers --config recorded``): the tiny model under
    the recording GQCTrainer with :data:`SECTION`."""
    config = with_gqc(tiny_trainer_config(), SECTION)
    return RecordingGQCTrainer.Config(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})


def out_dir() -> str:
    return os.environ["GQC_TITAN_OUT"]
