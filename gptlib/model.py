"""The GPT-2 model of Raschka's *Build a Large Language Model (from Scratch)*, chapter 4.

Module names, creation order and initialisation follow the book, so `torch.manual_seed(42)` gives the
same initial weights as the book's `GPTModel`, and its checkpoints (and the series' published ones) load
as they are. What differs is how the forward pass is computed: attention uses
`scaled_dot_product_attention` (no materialised mask, flash kernels on GPU), and LayerNorm / GELU use
PyTorch's fused functions with the book's formulas (eps 1e-5, biased variance, tanh approximation).

The CPU fast paths (blocked dropout attention, fast dropout masks, the chunked LM-head loss) are
autograd kernels of their own, in gptlib.kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_model
from torch import nn

from gptlib.config import ModelConfig
from gptlib.kernels import (
    Dropout,
    causal_attention_blocks,
    causal_dropout_attention,
    compute_dtype,
    cpu_paths,
    linear_cross_entropy,
)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with the book's separate query/key/value projections."""

    def __init__(self, d_in: int, d_out: int, num_heads: int, dropout: float, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # One matmul for the three projections (the book's three Linear modules keep their
        # parameters, so checkpoints are unchanged): fewer, larger GEMMs forward and backward.
        projections = (self.W_query, self.W_key, self.W_value)
        weight = torch.cat([m.weight for m in projections])
        bias = torch.cat([m.bias for m in projections]) if self.W_query.bias is not None else None
        qkv = F.linear(x, weight, bias).view(b, t, 3, self.num_heads, self.head_dim)
        queries, keys, values = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, heads, t, head_dim]
        dropout = self.dropout if self.training else 0.0
        blockwise = cpu_paths().dropout_attention and not torch.compiler.is_compiling()
        on_cpu = x.device.type == "cpu" and blockwise
        if dropout > 0 and on_cpu:
            # The CPU flash kernel has no dropout; SDPA's fallback would keep the T x T matrices.
            context = causal_dropout_attention(queries, keys, values, dropout)
        elif on_cpu and queries.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            context = causal_attention_blocks(queries, keys, values)  # faster than the bf16 flash kernel
        else:
            context = F.scaled_dot_product_attention(
                queries, keys, values, is_causal=True, dropout_p=dropout
            )
        return self.out_proj(context.transpose(1, 2).reshape(b, t, -1))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # The book registers its causal mask as a persistent buffer; SDPA needs none.
        state_dict.pop(prefix + "mask", None)
        super()._load_from_state_dict(state_dict, prefix, *args)


class LayerNorm(nn.Module):
    """The book's LayerNorm (parameters `scale` and `shift`, eps 1e-5), computed by the fused op."""

    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GELU with the tanh approximation, as GPT-2 and the book use it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(emb_dim, 4 * emb_dim), GELU(), nn.Linear(4 * emb_dim, emb_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.att = MultiHeadAttention(
            cfg.emb_dim, cfg.emb_dim, cfg.n_heads, cfg.drop_rate, cfg.qkv_bias
        )
        self.ff = FeedForward(cfg.emb_dim)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            # Tied after both modules exist, so the RNG stream (and every other weight) is
            # the same as for the untied model.
            self.out_head.weight = self.tok_emb.weight

    def hidden_states(self, in_idx: torch.Tensor) -> torch.Tensor:
        """The final-norm output [batch, tokens, emb] that the output head maps to logits."""
        positions = torch.arange(in_idx.shape[1], device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))
        return self.final_norm(self.trf_blocks(x))

    def forward(self, in_idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, tokens, vocab]; with `targets` [batch, tokens], the mean cross-entropy
        instead (fp32 scalar), computed without materialising the logits (see `loss`)."""
        hidden = self.hidden_states(in_idx)
        if targets is None:
            return self.out_head(hidden)
        weight = self.out_head.weight
        # The plain form where the compiler fuses it well, and for fp16, whose range needs the
        # GradScaler's scale applied before the logit gradients are rounded.
        if torch.compiler.is_compiling() or compute_dtype(weight.device, weight.dtype) == torch.float16:
            logits = self.out_head(hidden).flatten(0, 1)
            return F.cross_entropy(logits.float(), targets.flatten())
        return linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten())

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy, equal within fp tolerance to
        `F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())` but without the
        [batch x tokens x vocab] logits and their gradient (about 206 MB each per 1024 tokens in
        fp32). Goes through `__call__`, so hooks run; a DDP- or compile-wrapped model gets the same
        by being called as `model(inputs, targets)`."""
        return self(inputs, targets)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters())


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix multiply per token: every Linear, the output head too."""
    per_layer = 4 * cfg.emb_dim * cfg.emb_dim + 2 * 4 * cfg.emb_dim * cfg.emb_dim
    return cfg.n_layers * per_layer + cfg.emb_dim * cfg.vocab_size


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token: 6 x matmul parameters + 12 x layers x context x emb (attention)."""
    return 6 * matmul_parameters(cfg) + 12 * cfg.n_layers * cfg.context_length * cfg.emb_dim


def save_weights(model: GPTModel, path: str | Path) -> None:
    """Write the weights as safetensors (a tied head is stored once, as safetensors requires)."""
    save_model(model, str(path))


def load_weights(model: GPTModel, path: str | Path) -> GPTModel:
    """Load safetensors weights strictly: the book's files (with `att.mask` buffers) load as they are,
    and a tied model accepts a file that stores the shared matrix under either name."""
    state = load_file(str(path))
    if model.cfg.tie_weights:
        for name, twin in (("out_head.weight", "tok_emb.weight"), ("tok_emb.weight", "out_head.weight")):
            if name not in state and twin in state:
                state[name] = state[twin]
    model.load_state_dict(state, strict=True)
    return model
