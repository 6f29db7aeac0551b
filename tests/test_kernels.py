"""The CPU kernels behind the model's fast paths (gptlib.kernels): each equals the plain
computation within floating-point tolerance, and the model takes it exactly where it should."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gptlib import kernels
from gptlib import model as model_module
from gptlib.config import ModelConfig
from gptlib.kernels import causal_attention_blocks, causal_dropout_attention, linear_cross_entropy
from gptlib.model import GPTModel

SMALL = ModelConfig(vocab_size=300, context_length=48, emb_dim=32, n_heads=4, n_layers=2)


def _manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      p: float) -> torch.Tensor:
    """The book's attention (masked scores, softmax, dropout) with a given keep-mask, in fp32."""
    n = q.shape[-2]
    scores = (q.float() @ k.float().transpose(-2, -1)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(scores, dim=-1) * keep / (1 - p)) @ v.float()


def _drawn_keep_mask(shape: tuple[int, ...], p: float, block: int, seed: int) -> torch.Tensor:
    """The keep-mask `causal_dropout_attention` draws from the global RNG after manual_seed(seed)."""
    b, h, n, _ = shape
    torch.manual_seed(seed)
    source = kernels.DropMaskSource(p)
    keep = torch.zeros(b * h, n, n, dtype=torch.bool)
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        keep[:, i0:i1, :i1] = ~source.draw((b * h, i1 - i0, i1))
    return keep.view(b, h, n, n)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize(("n", "block"), [(37, 8), (64, 64), (50, 128)])
def test_causal_dropout_attention_matches_the_manual_computation(dtype: torch.dtype, tol: float, n: int,
                                                                 block: int) -> None:
    gen = torch.Generator().manual_seed(n)
    # Non-contiguous [b, h, n, d] views, as the model passes them.
    q, k, v = (torch.randn(2, n, 3, 16, generator=gen).to(dtype).transpose(1, 2).requires_grad_()
               for _ in range(3))
    grad = torch.randn(2, 3, n, 16, generator=gen).to(dtype)
    torch.manual_seed(7)
    out = causal_dropout_attention(q, k, v, 0.3, block)
    assert out.dtype == dtype and out.shape == (2, 3, n, 16)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)

    keep = _drawn_keep_mask((2, 3, n, 16), 0.3, block, seed=7)
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    expected = _manual_attention(q2, k2, v2, keep, 0.3)
    dq2, dk2, dv2 = torch.autograd.grad(expected, (q2, k2, v2), grad.float())
    for ours, theirs in ((out, expected), (dq, dq2), (dk, dk2), (dv, dv2)):
        torch.testing.assert_close(ours.float(), theirs, atol=tol, rtol=tol)


def test_causal_dropout_attention_drops_at_the_rate_and_uses_the_global_rng() -> None:
    q = k = v = torch.ones(1, 4, 256, 8)
    torch.manual_seed(3)
    a = causal_dropout_attention(q, k, v, 0.25)
    torch.manual_seed(3)
    assert torch.equal(a, causal_dropout_attention(q, k, v, 0.25))  # reproducible from the seed
    # With all-equal values each output is (kept weights) / 0.75: its mean over rows is ~1.
    assert a.mean().item() == pytest.approx(1.0, abs=0.03)
    with pytest.raises(ValueError, match="dropout_p"):
        causal_dropout_attention(q, k, v, 0.0)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize(("n", "block"), [(37, 8), (64, 64), (50, 128)])
def test_causal_attention_blocks_matches_the_manual_computation(dtype: torch.dtype, tol: float, n: int,
                                                                block: int) -> None:
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, n, 3, 16, generator=gen).to(dtype).transpose(1, 2) for _ in range(3))
    with torch.no_grad():
        out = causal_attention_blocks(q, k, v, block)
    keep_all = torch.ones(2, 3, n, n, dtype=torch.bool)
    expected = _manual_attention(q.float(), k.float(), v.float(), keep_all, 0.0)
    assert out.dtype == dtype and out.shape == (2, 3, n, 16)
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_bf16_evaluation_on_cpu_takes_the_blockwise_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = model_module.causal_attention_blocks
    monkeypatch.setattr(model_module, "causal_attention_blocks",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    model = GPTModel(SMALL).eval()
    tokens = torch.randint(0, SMALL.vocab_size, (2, 17))
    with torch.no_grad():
        fp32 = model(tokens[:, :-1], tokens[:, 1:])
    assert calls == []  # fp32: SDPA's flash kernel
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(tokens[:, :-1], tokens[:, 1:])
    assert len(calls) == SMALL.n_layers
    assert bf16.item() == pytest.approx(fp32.item(), abs=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens[:, :-1], tokens[:, 1:]).backward()  # with autograd: SDPA again
    assert len(calls) == SMALL.n_layers


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_linear_cross_entropy_matches_logits_then_cross_entropy(precision: str) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=gen, requires_grad=True)
    weight = torch.randn(1000, 32, generator=gen, requires_grad=True)
    targets = torch.randint(0, 1000, (300,), generator=gen)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    with autocast:
        ours = linear_cross_entropy(hidden, weight, targets, chunk=64)
    (ours * 3).backward()  # a scaled loss (gradient accumulation, a GradScaler) scales the gradients
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with autocast:
        plain = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    (plain * 3).backward()
    tol = 1e-5 if precision == "fp32" else 2e-2
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, plain, atol=tol, rtol=tol)
    torch.testing.assert_close(grads[0], hidden.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(grads[1], weight.grad, atol=tol, rtol=tol)
    with torch.inference_mode(), autocast:
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk=64), ours)


def test_linear_cross_entropy_refuses_a_second_backward() -> None:
    hidden, weight = torch.randn(8, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.randint(0, 10, (8,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()




@pytest.mark.parametrize("tie_weights", [False, True])
def test_model_loss_equals_cross_entropy_of_the_logits(tie_weights: bool) -> None:
    cfg = dataclasses.replace(SMALL, drop_rate=0.0, tie_weights=tie_weights)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 41))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    loss = model(inputs, targets)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    plain = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    plain.backward()
    torch.testing.assert_close(loss, plain, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert torch.equal(model.loss(inputs, targets).detach(), loss.detach())


def test_training_with_dropout_on_cpu_takes_the_blockwise_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = model_module.causal_dropout_attention
    monkeypatch.setattr(model_module, "causal_dropout_attention",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    model = GPTModel(dataclasses.replace(SMALL, drop_rate=0.1))
    tokens = torch.randint(0, SMALL.vocab_size, (2, 17))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert len(calls) == SMALL.n_layers
    model.eval()
    model(tokens)
    assert len(calls) == SMALL.n_layers  # eval: SDPA (its flash kernel), no dropout


def test_drop_mask_source_rate_and_reproducibility() -> None:
    torch.manual_seed(11)
    mask = kernels.DropMaskSource(0.1).draw((1000, 1000))
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    assert mask.float().mean().item() == pytest.approx(0.1, abs=0.002)
    torch.manual_seed(11)
    assert torch.equal(kernels.DropMaskSource(0.1).draw((1000, 1000)), mask)


def test_fast_dropout_equals_masking_with_its_own_draws_forward_and_backward() -> None:
    layer = kernels.Dropout(0.25).train()
    x = torch.randn(4, 8, 64, requires_grad=True)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = kernels.DropMaskSource(0.25).draw((4, 8, 64))  # the same one global-RNG draw
    expected = torch.where(dropped, 0.0, x.detach() * (1 / 0.75))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, torch.where(dropped, 0.0, grad * (1 / 0.75)), rtol=0, atol=0)
    assert dropped.float().mean().item() == pytest.approx(0.25, abs=0.03)
    # Evaluation and p = 0 are the identity; switched off, it is torch's own dropout stream.
    assert torch.equal(layer.eval()(x), x) and torch.equal(kernels.Dropout(0.0).train()(x), x)
    layer.train()
    torch.manual_seed(5)
    torch_dropout = torch.nn.functional.dropout(x, 0.25, training=True)
    with kernels.cpu_paths_set(fast_dropout=False):
        torch.manual_seed(5)
        assert torch.equal(layer(x), torch_dropout)
