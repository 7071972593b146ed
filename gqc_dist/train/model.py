"""A small byte-level GPT (nanoGPT-like) for ``gqc-train``, dense or mixture-of-experts.

Pre-LayerNorm blocks, causal self-attention through
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, learned positional
embeddings, vocabulary 256 (one token = one byte). The output head is UNTIED (its own
``Linear(dim, 256, bias=False)``), so every module can be FSDP2-sharded on its own.
Linear layers have no bias; LayerNorms do. With ``num_experts > 0`` every block's MLP is a
:class:`gqc_dist.engines.moe.ExpertParallelMoE` (top-1, experts split over ``ep_group``).

Initialization is deterministic from ``seed``, draws from private generators only (the global
RNG is left as it was) and is identical on every rank and every expert-parallel layout: dense
weights ~ N(0, 0.02) (residual projections N(0, 0.02 / sqrt(2 * layers))), LayerNorms 1/0;
block ``i``'s MoE layer (router and experts) is drawn by the MoE layer itself from seed
``(seed + 1) * 1_000_003 + i``, whole-model then sliced by EP rank.
"""

import math
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gqc_dist.errors import GQCConfigError
from gqc_dist.engines.moe import ExpertParallelMoE

VOCAB_SIZE = 256


@dataclass
class ModelConfig:
    """Model shape. ``seq_len``: context length in tokens (bytes), the size of the positional
    table; ``dim``: model width; ``layers``: transformer blocks; ``heads``: attention heads
    (``dim % heads == 0``); ``mlp_ratio``: MLP / expert hidden width is ``mlp_ratio * dim``;
    ``num_experts``: experts per block in the whole model (0 = dense MLP); ``ep_size``:
    expert-parallel group size (divides ``num_experts``; > 1 needs ``num_experts > 0``);
    ``dropout``: probability in ``[0, 1)`` (attention weights, residual branches, embeddings).
    """

    seq_len: int = 64
    dim: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    num_experts: int = 0
    ep_size: int = 1
    dropout: float = 0.0

    def validate(self) -> "ModelConfig":
        """Return ``self``; raise ``ValueError`` naming the first bad field."""
        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("seq_len", "dim", "layers", "heads", "mlp_ratio", "ep_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise GQCConfigError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if not is_int(self.num_experts) or self.num_experts < 0:
            raise GQCConfigError(f"ModelConfig.num_experts must be an int >= 0 (0 = dense MLP), "
                             f"got {self.num_experts!r}")
        if self.dim % self.heads:
            raise GQCConfigError(f"ModelConfig.dim={self.dim} must be a multiple of "
                             f"ModelConfig.heads={self.heads}")
        if self.num_experts == 0 and self.ep_size != 1:
            raise GQCConfigError(f"ModelConfig.ep_size={self.ep_size} needs num_experts > 0 "
                             f"(a dense model has no experts to split)")
        if self.num_experts % self.ep_size:
            raise GQCConfigError(f"ModelConfig.num_experts={self.num_experts} must be a multiple of "
                             f"ModelConfig.ep_size={self.ep_size}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise GQCConfigError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        return self


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads, self.dropout = config.heads, config.dropout
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, dim = x.shape
        q, k, v = (t.view(batch, time, self.heads, dim // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(dim, dim=2))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(batch, time, dim)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.dim, config.mlp_ratio * config.dim, bias=False)
        self.fc_out = nn.Linear(config.mlp_ratio * config.dim, config.dim, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc_out(F.gelu(self.fc_in(x))))


class Block(nn.Module):
    """``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``. ``ExpertParallelMoE`` returns its input
    plus the gated expert output, so for MoE the update is ``moe(h) - h`` with ``h = ln2(x)``."""

    def __init__(self, config: ModelConfig, ep_group, moe_seed: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.dim)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.dim)
        self.is_moe = config.num_experts > 0
        if self.is_moe:
            self.mlp = ExpertParallelMoE(config.dim, config.mlp_ratio * config.dim,
                                         config.num_experts, ep_group, seed=moe_seed)
            self.moe_drop = nn.Dropout(config.dropout)
        else:
            self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        h = self.ln2(x)
        if self.is_moe:
            return x + self.moe_drop(self.mlp(h) - h)
        return x + self.mlp(h)


def _moe_seed(seed: int, block: int) -> int:
    return (seed + 1) * 1_000_003 + block


class GPT(nn.Module):
    """Byte-level GPT. ``forward(idx)``: int64 ``[batch, time]`` (``time <= seq_len``) ->
    float logits ``[batch, time, 256]``; ``loss(idx, targets)``: mean cross-entropy in nats per
    token (``ln 256 ~ 5.545`` for a uniform guess).

    ``ep_group``: the expert-parallel process group (``None``: all experts local); its size
    must equal ``config.ep_size``. ``seed``: a non-negative int fixing the initialization.
    With experts split over EP ranks, every EP rank in a group must call forward with the same
    number of tokens (``ExpertParallelMoE`` all_to_all uses equal splits).
    """

    def __init__(self, config: ModelConfig, ep_group=None, seed: int = 0):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise GQCConfigError(f"config must be a ModelConfig, got {type(config).__name__}")
        config.validate()
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise GQCConfigError(f"seed must be a non-negative int, got {seed!r}")
        ep_world = 1 if ep_group is None else dist.get_world_size(ep_group)
        if ep_world != config.ep_size:
            raise GQCConfigError(f"ModelConfig.ep_size={config.ep_size} but the ep_group has "
                             f"{ep_world} ranks" + (" (ep_group=None)" if ep_group is None else ""))
        self.config = config
        with torch.random.fork_rng(devices=[]):  # default inits below are overwritten
            self.wte = nn.Embedding(VOCAB_SIZE, config.dim)
            self.wpe = nn.Embedding(config.seq_len, config.dim)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(
                Block(config, ep_group, _moe_seed(seed, i)) for i in range(config.layers))
            self.ln_f = nn.LayerNorm(config.dim)
            self.head = nn.Linear(config.dim, VOCAB_SIZE, bias=False)
        self._init_dense(seed)

    @torch.no_grad()
    def _init_dense(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.layers)
        for name, module in self.named_modules():
            if isinstance(module, ExpertParallelMoE):
                continue  # router and experts: drawn by the MoE layer from its own seed
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, (nn.Linear, nn.Embedding)) and \
                    not name.endswith("mlp.router"):
                std = residual_std if name.endswith(("attn.proj", "mlp.fc_out")) else 0.02
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise GQCConfigError(f"idx must be an int64 [batch, time] tensor, got {idx.dtype} "
                             f"{tuple(idx.shape)}")
        if idx.shape[1] > self.config.seq_len:
            raise GQCConfigError(f"sequence of {idx.shape[1]} tokens exceeds "
                             f"ModelConfig.seq_len={self.config.seq_len}")
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all ``batch * time`` tokens (nats per token)."""
        return token_loss(self(idx), targets)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per token) of ``(batch, time, vocab)`` logits, computed in fp32."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def expert_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The expert weights (``w_in``, ``w_out`` of every ``ExpertParallelMoE``); routers are
    dense and not included. Empty for a dense model."""
    return [p for m in model.modules() if isinstance(m, ExpertParallelMoE)
            for p in m.expert_parameters()]


def block_modules(model: GPT) -> List[nn.Module]:
    """The submodules to ``fully_shard`` one by one (FSDP2), before sharding the root.

    * Dense model: ``[model.blocks[0], ..., model.blocks[L-1]]``. Then ``fully_shard(model)``
      takes the rest (``wte``, ``wpe``, ``ln_f``, ``head``).
    * MoE model: the dense parts of each block, block by block:
      ``[blocks[i].ln1, blocks[i].attn, blocks[i].ln2, blocks[i].mlp.router for i in 0..L-1]``
      (4 per block). Expert weights must NOT be FSDP-sharded (they are split over the EP
      group, ``gqc_dist.Sharded(ep_group)``), so shard the root with
      ``fully_shard(model, ignored_params=set(expert_parameters(model)))``, or instead shard
      ``model.wte``, ``model.wpe``, ``model.ln_f`` and ``model.head`` one by one and leave the
      root unsharded.
    """
    if not isinstance(model, GPT):
        raise GQCConfigError(f"block_modules expects a GPT, got {type(model).__name__}")
    if model.config.num_experts == 0:
        return list(model.blocks)
    return [m for b in model.blocks for m in (b.ln1, b.attn, b.ln2, b.mlp.router)]


def count_parameters(model: nn.Module) -> int:
    """Parameters in the WHOLE model, identical on every rank and layout: shared parameters
    once, FSDP2 DTensors at their full size, and expert-parallel experts counted for all
    ``num_experts`` (this rank's slice times the EP size), not just the local ones."""
    ep_factor = {id(p): m.ep_size for m in model.modules() if isinstance(m, ExpertParallelMoE)
                 for p in m.expert_parameters()}
    return sum(p.numel() * ep_factor.get(id(p), 1) for p in model.parameters())
