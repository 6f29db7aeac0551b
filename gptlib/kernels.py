"""CPU autograd kernels behind gptlib.model's fast paths, and the switch that turns them off.

The fast paths keep results equal to the plain computation within floating-point tolerance:

* CPU training with attention dropout: PyTorch's CPU flash kernel refuses dropout, so SDPA would fall
  back to its math path, which materialises (and keeps for backward) the whole attention matrix.
  `causal_dropout_attention` computes it in blocks of query rows instead, skipping the blocks above
  the diagonal, keeping only the boolean dropout masks, and recomputing the scores in backward.
  Its masks come from numpy's SFC64 generator seeded by one draw of the global torch RNG per call
  (`DropMaskSource`): reproducible and exactly resumable, but not torch's own dropout stream.
* CPU training with dropout on the residual stream and embeddings: `Dropout` draws its masks the
  same way (one global-RNG draw per call) instead of torch's CPU bernoulli, about 5x faster for
  these sizes; on CUDA and under torch.compile it is `nn.Dropout`.
* CPU attention without autograd in bf16 (evaluation) uses the same blocks without dropout
  (`causal_attention_blocks`): SDPA's CPU flash kernel is about 2x slower there.
* The query, key and value projections run as one matmul over the concatenated weights.
* `model(inputs, targets)` returns the mean cross-entropy without materialising the logits: the
  output head and the loss run in chunks of rows, and the gradients for the head's input and weight
  are computed in the same pass (`linear_cross_entropy`). `model(inputs)` still returns logits.
  (Under torch.compile and in fp16 autocast it computes the plain logits + cross-entropy instead.)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

ATTENTION_TILE_BYTES = 6 * 2**20  # score-tile size of the CPU dropout-attention path (cache-sized)
LOSS_CHUNK = 256  # rows of logits alive at a time in `linear_cross_entropy`


@dataclass(frozen=True)
class CpuPaths:
    """Which CPU fast paths are on (both, except where `gptlib bench --ablate` measures one)."""

    dropout_attention: bool = True  # False: SDPA's math fallback instead
    fast_dropout: bool = True  # False: torch's own dropout on the CPU too


ALL_ON = CpuPaths()
_CPU_PATHS: contextvars.ContextVar[CpuPaths] = contextvars.ContextVar("cpu_paths")


def cpu_paths() -> CpuPaths:
    return _CPU_PATHS.get(ALL_ON)


@contextlib.contextmanager
def cpu_paths_set(**changes: bool) -> Iterator[CpuPaths]:
    """Within the block, the CPU fast paths named in `changes` are switched as given."""
    token = _CPU_PATHS.set(replace(cpu_paths(), **changes))
    try:
        yield cpu_paths()
    finally:
        _CPU_PATHS.reset(token)


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast would give a matmul of `dtype` tensors on `device`."""
    if dtype.is_floating_point and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class DropMaskSource:
    """Boolean dropout masks (True = dropped) with P(drop) = p to within 2**-32, from numpy's SFC64
    generator -- several times faster than torch's CPU RNG for these sizes. Seeded with one draw
    from the global torch RNG, so runs stay reproducible and resume exactly."""

    def __init__(self, p: float):
        self.bits = np.random.SFC64(int(torch.randint(0, 2**62, (1,)).item()))
        self.threshold = round(p * 2**32)

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        raw = self.bits.random_raw((n + 1) // 2).view(np.uint32)[:n]
        return torch.from_numpy((raw < self.threshold).reshape(shape))


class _CausalDropoutAttention(torch.autograd.Function):
    """Causal attention with dropout on the attention weights, in blocks of query rows.

    Saved for backward: q, k, v and the boolean dropout masks of the causal blocks, instead of the
    score, softmax and dropout tensors of the whole T x T matrix; backward recomputes each block's
    softmax (flash-attention style). Each block is a few large tensor ops, so the Python loop costs
    little. Softmax and its backward are PyTorch's own kernels, in the compute dtype (as autocast
    runs them)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                block: int) -> torch.Tensor:
        b, h, n, d = q.shape
        dtype = compute_dtype(q.device, q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            # [b * h, n, d] operands: q pre-scaled by 1/sqrt(d), v by the dropout's 1/(1 - p).
            qs = (q.to(dtype) * d**-0.5).reshape(b * h, n, d)
            k3 = k.to(dtype).reshape(b * h, n, d)
            vs = (v.to(dtype) * (1.0 / (1.0 - dropout_p))).reshape(b * h, n, d)
            bias = _causal_bias(n, dtype, q.device)
            out = torch.empty(b * h, n, d, dtype=dtype, device=q.device)
            masks = DropMaskSource(dropout_p)
            drops = []
            for i0 in range(0, n, block):
                i1 = min(i0 + block, n)
                probs = _block_probs(qs, k3, bias, i0, i1)
                drop = masks.draw(tuple(probs.shape)).to(probs.device)
                torch.bmm(probs.masked_fill_(drop, 0.0), vs[:, :i1], out=out[:, i0:i1])
                drops.append(drop)
            out = out.view(b, h, n, d)
        ctx.block, ctx.keep_scale = block, 1.0 / (1.0 - dropout_p)
        ctx.save_for_backward(qs, k3, vs, *drops)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qs, k3, vs, *drops = ctx.saved_tensors
        bh, n, d = qs.shape
        dtype, device = qs.dtype, qs.device
        with torch.autocast(device.type, enabled=False):
            go = grad_out.to(dtype).reshape(bh, n, d)
            bias = _causal_bias(n, dtype, device)
            dq = torch.empty(bh, n, d, dtype=dtype, device=device)
            # Several blocks add into the key/value gradients: accumulate those in fp32.
            acc = dtype if len(drops) == 1 else torch.float32
            dk = torch.zeros(bh, n, d, dtype=acc, device=device)
            dv = torch.zeros(bh, n, d, dtype=acc, device=device)
            for index, i0 in enumerate(range(0, n, ctx.block)):
                i1 = min(i0 + ctx.block, n)
                drop, go_i = drops[index], go[:, i0:i1]
                probs = _block_probs(qs, k3, bias, i0, i1)
                dv[:, :i1] += torch.bmm(probs.masked_fill(drop, 0.0).transpose(1, 2), go_i)
                grad_probs = torch.bmm(go_i, vs[:, :i1].transpose(1, 2)).masked_fill_(drop, 0.0)
                grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, dtype)
                del probs, grad_probs
                torch.bmm(grad_scores, k3[:, :i1], out=dq[:, i0:i1])
                dk[:, :i1] += torch.bmm(grad_scores.transpose(1, 2), qs[:, i0:i1])
            # q was scaled by 1/sqrt(d) and v by 1/(1 - p) before use: the chain rule's factors.
            shape = grad_out.shape
            dq = dq.mul_(d**-0.5).view(shape)
            dk = dk.to(dtype).view(shape)
            dv = dv.mul_(ctx.keep_scale).to(dtype).view(shape)
        return dq, dk, dv, None, None


class _MaskedScale(torch.autograd.Function):
    """x with the `dropped` elements zeroed and the rest scaled by 1 / (1 - p); saves the mask."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dropped: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(dropped)
        ctx.scale = scale
        return x.masked_fill(dropped, 0).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (dropped,) = ctx.saved_tensors
        return grad.masked_fill(dropped, 0).mul_(ctx.scale), None, None


class Dropout(nn.Dropout):
    """`nn.Dropout` whose CPU training masks come from `DropMaskSource` (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or self.p == 0.0 or x.device.type != "cpu" or not cpu_paths().fast_dropout
                or torch.compiler.is_compiling()):
            return super().forward(x)
        dropped = DropMaskSource(self.p).draw(tuple(x.shape))
        return _MaskedScale.apply(x, dropped, 1.0 / (1.0 - self.p))


def _causal_bias(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[n, n]: 0 on and below the diagonal, -inf above."""
    return torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu_(1)


def _block_probs(qs: torch.Tensor, k3: torch.Tensor, bias: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
    """Causal softmax of query rows [i0, i1) over keys [0, i1); q is pre-scaled."""
    return torch.softmax(torch.baddbmm(bias[i0:i1, :i1], qs[:, i0:i1], k3[:, :i1].transpose(1, 2)), dim=-1)


def attention_block(batch_heads: int, tokens: int, itemsize: int) -> int:
    """Query rows per block: a power of two (>= 32) whose [batch x heads, rows, tokens] score tile
    fits ATTENTION_TILE_BYTES -- 128 rows in fp32 and 256 in bf16 at GPT-2 small's 12 heads x 1024
    tokens, the fastest on a 2-core AVX-512 CPU (measured)."""
    rows = ATTENTION_TILE_BYTES // max(1, batch_heads * tokens * itemsize)
    return max(32, 1 << max(0, rows.bit_length() - 1))


def causal_dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                             block: int | None = None) -> torch.Tensor:
    """`scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)` for
    [batch, heads, tokens, head_dim] inputs, computed in blocks of `block` query rows (see
    `_CausalDropoutAttention`). Dropout draws come from the global RNG."""
    if not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in (0, 1); use SDPA without dropout")
    if block is None:
        itemsize = compute_dtype(q.device, q.dtype).itemsize
        block = attention_block(q.shape[0] * q.shape[1], q.shape[2], itemsize)
    return _CausalDropoutAttention.apply(q, k, v, dropout_p, block)


def causal_attention_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            block: int | None = None) -> torch.Tensor:
    """`scaled_dot_product_attention(q, k, v, is_causal=True)` without autograd, in blocks of query
    rows (batched matmuls and softmax, in q's dtype). On CPUs with native bf16 dot products it is
    about 2x faster than SDPA's CPU flash kernel in bf16 at GPT-2 small's shape (measured: 5.8 vs
    13.7 ms per layer); used for no-grad bf16 attention on the CPU (evaluation, generation)."""
    b, h, n, d = q.shape
    if block is None:
        block = attention_block(b * h, n, q.dtype.itemsize)
    qs, k3, v3 = (q * d**-0.5).reshape(b * h, n, d), k.reshape(b * h, n, d), v.reshape(b * h, n, d)
    bias = _causal_bias(n, q.dtype, q.device)
    out = torch.empty(b * h, n, d, dtype=q.dtype, device=q.device)
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        torch.bmm(_block_probs(qs, k3, bias, i0, i1), v3[:, :i1], out=out[:, i0:i1])
    return out.view(b, h, n, d)


def _chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
    need_hidden: bool, need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(sum of row losses, d sum / d hidden, d sum / d weight), both gradients fp32 or None.

    fp32 accumulates the weight gradient chunk by chunk; a 16-bit compute dtype keeps the logit
    gradients (rows x vocab, 16-bit) and computes it with one matmul, converted to fp32 once."""
    dtype = compute_dtype(hidden.device, weight.dtype)
    rows, device = hidden.shape[0], hidden.device
    with torch.autocast(device.type, enabled=False):
        h, w = hidden.to(dtype), weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=device) if need_hidden else None
        grad_w: torch.Tensor | None = None
        all_grads = (torch.empty(rows, w.shape[0], dtype=dtype, device=device)
                     if need_weight and dtype != torch.float32 else None)
        for r0 in range(0, rows, chunk):
            x, t = h[r0 : r0 + chunk], targets[r0 : r0 + chunk, None]
            log_probs = torch.log_softmax(torch.matmul(x, w.t()), dim=-1, dtype=torch.float32)
            total -= log_probs.gather(1, t).sum()
            if not (need_hidden or need_weight):
                continue
            # d(sum of row losses) / d logits = softmax - one_hot. The 1 / rows factor is applied
            # in backward, so fp16 gradients cannot underflow here.
            probs = log_probs.exp_()
            probs.scatter_add_(1, t, torch.full(t.shape, -1.0, device=device))
            if all_grads is not None:
                g = all_grads[r0 : r0 + chunk].copy_(probs)
            else:
                g = probs.to(dtype)
            del log_probs, probs
            if grad_h is not None:
                grad_h[r0 : r0 + chunk] = torch.matmul(g, w)
            if need_weight and all_grads is None:
                grad_w = torch.matmul(g.t(), x) if grad_w is None else grad_w.addmm_(g.t(), x)
        if all_grads is not None:  # in vocabulary slices, so the 16-bit product stays small
            grad_w = torch.empty(w.shape, dtype=torch.float32, device=device)
            for v0 in range(0, w.shape[0], 8192):
                grad_w[v0 : v0 + 8192] = torch.matmul(all_grads[:, v0 : v0 + 8192].t(), h)
    return total, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(hidden @ weight.T, targets)) without materialising all the logits.

    The loss ends the graph, so its gradient is known up to the incoming scalar: forward computes
    d loss / d hidden and d loss / d weight chunk by chunk, and backward only scales them."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        total, grad_h, grad_w = _chunked_cross_entropy(
            hidden, weight, targets, chunk, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.rows, ctx.hidden_dtype, ctx.weight_dtype = hidden.shape[0], hidden.dtype, weight.dtype
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        return total / hidden.shape[0]

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        scale = grad_loss.float() / ctx.rows
        # In place: the saved buffers are used once (a second backward fails the version check).
        grad_h = saved.pop(0).mul_(scale).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        grad_w = saved.pop(0).mul_(scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets)` (mean over rows, fp32) in chunks of `chunk`
    rows: [rows, emb] hidden states, [vocab, emb] weight, [rows] int64 targets (no ignore_index).
    Matmuls run in the autocast dtype when autocast is on, log-softmax in fp32."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)
    total, _, _ = _chunked_cross_entropy(hidden, weight, targets, chunk, False, False)
    return total / hidden.shape[0]
