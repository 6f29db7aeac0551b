"""`gptlib bench` machinery on a tiny shape, and the model's fast paths it measures.

No speed assertions here: the targets live in the benchmark itself (`gptlib bench`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlib import bench
from gptlib import model as model_module
from gptlib.config import ModelConfig
from gptlib.model import (
    GPTModel,
    causal_attention_blocks,
    causal_dropout_attention,
    flops_per_token,
    linear_cross_entropy,
)

TINY = ["--layers", "2", "--heads", "2", "--emb", "32", "--context", "32", "--vocab", "512",
        "--microbatch", "2", "--drop-rate", "0"]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One end-to-end run: both sides, fp32, training + evaluation + the data-reader probe."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    code = bench.main([*TINY, "--precision", "fp32", "--steps", "2", "--warmup", "1",
                       "--eval-batches", "1", "--data-tokens", "20000,2000000", "--quiet",
                       "--json", str(path)])
    assert code == 0
    return json.loads(path.read_text())


def test_json_has_both_sides_and_the_expected_fields(result: dict) -> None:
    assert result["shape"]["n_layers"] == 2 and result["shape"]["microbatch_size"] == 2
    rows = result["train"]["fp32"]
    for side in ("gptlib", "reference"):
        row = rows[side]
        assert len(row["step_times_s"]) == 1 and len(row["step_times_s"][0]) == 3  # 1 round: 1 + 2
        assert len(row["losses"]) == 3 and row["rounds"] == 1
        assert row["median_s"] == pytest.approx(sorted(row["step_times_s"][0][1:])[0] / 2
                                                + sorted(row["step_times_s"][0][1:])[1] / 2)
        assert row["tokens_per_step"] == 2 * 32
        assert row["tokens_per_s"] == pytest.approx(64 / row["median_s"])
        assert 0 < row["cpu_use"] and row["tokens_per_cpu_s"] > 0
        assert row["peak_rss_mb"] >= row["rss_ready_mb"] > 0
        assert result["eval"]["fp32"][side]["batch_shape"] == [2, 32]
    assert rows["ratios"]["tokens_per_s"] == pytest.approx(
        rows["gptlib"]["tokens_per_s"] / rows["reference"]["tokens_per_s"])
    assert rows["ratios"]["peak_rss"] == pytest.approx(
        rows["gptlib"]["peak_rss_mb"] / rows["reference"]["peak_rss_mb"])
    assert {t["name"] for t in result["targets"]} >= {
        "train tokens/s vs reference (fp32)", "train peak RSS vs reference (fp32)",
        "eval tokens/s, gptlib fp32 vs reference fp32", "data reader RSS growth MB, small -> large file"}


def test_reference_side_is_the_books_model(result: dict) -> None:
    rows = result["train"]["fp32"]
    assert rows["reference"]["model_class"] == "llms_from_scratch.ch04.GPTModel"
    assert rows["gptlib"]["model_class"] == "gptlib.model.GPTModel"
    assert rows["gptlib"]["fused_adamw"] and not rows["reference"]["fused_adamw"]
    # Same seed and data, no dropout: the same initial weights give the same first loss...
    assert rows["gptlib"]["losses"][0] == pytest.approx(rows["reference"]["losses"][0], abs=1e-4)
    # ...and the same optimizer settings keep the two runs together.
    for ours, theirs in zip(rows["gptlib"]["losses"], rows["reference"]["losses"], strict=True):
        assert ours == pytest.approx(theirs, abs=1e-3)
    evals = result["eval"]["fp32"]
    assert evals["gptlib"]["losses"] == pytest.approx(evals["reference"]["losses"], abs=1e-4)


def test_mfu_is_tokens_per_s_times_flops_per_token_over_peak(result: dict) -> None:
    cfg = ModelConfig(**{f.name: result["shape"][f.name] for f in dataclasses.fields(ModelConfig)})
    assert result["flops_per_token"] == flops_per_token(cfg)
    peak = result["peak_flops"]["fp32"]
    assert peak > 0
    for side in ("gptlib", "reference"):
        row = result["train"]["fp32"][side]
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * flops_per_token(cfg) / peak)
        evaluation = result["eval"]["fp32"][side]  # forward only: a third of the training FLOPs
        expected = evaluation["tokens_per_s"] * flops_per_token(cfg) / 3 / peak
        assert evaluation["mfu"] == pytest.approx(expected)


def test_data_probe_reads_both_files_with_both_loaders(result: dict) -> None:
    data = result["data"]
    assert data["tokens"] == [20_000, 2_000_000]
    for loader in ("gptlib", "series"):
        runs = data[loader]["runs"]
        assert set(runs) == {"20000", "2000000"}
        assert runs["2000000"]["batches_read"] == (2_000_000 - 1) // 64  # every micro-batch, in order
        assert data[loader]["growth_mb"] == pytest.approx(
            runs["2000000"]["growth_mb"] - runs["20000"]["growth_mb"])
    # The series' loader holds the whole split: its anonymous memory grows by the file's size.
    large = data["series"]["runs"]["2000000"]
    assert large["anon_growth_mb"] >= 0.9 * large["file_mb"]
    assert data["gptlib"]["runs"]["2000000"]["checksum"] == large["checksum"]


def test_report_table_shows_ratios_and_targets(result: dict) -> None:
    text = bench.format_report(result)
    assert "reference" in text and "gptlib" in text and "ratio" in text
    assert "targets (issue #6)" in text and "data reader" in text


def test_load_whole_token_file_matches_the_reader(tmp_path: Path) -> None:
    from gptlib.data import TokenFile

    path = bench.write_synthetic_token_file(tmp_path / "t.safetensors", 5000, chunk=777)
    tokens = bench.load_whole_token_file(path)
    assert tokens.dtype == torch.uint16 and len(tokens) == 5000
    assert torch.equal(tokens[100:300].long(), TokenFile(path).read(100, 200))
    assert int(tokens.long().max()) < 50257


def test_bad_options_fail_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    if not torch.cuda.is_available():
        assert bench.main([*TINY, "--precision", "fp16", "--device", "cpu"]) == 1
        assert "fp16 needs CUDA" in capsys.readouterr().err
    assert bench.main([*TINY, "--heads", "3"]) == 1
    assert "not divisible" in capsys.readouterr().err
    # As cli.py calls it: parsed options without `argv`, errors still one line and exit code 1.
    assert bench.run(bench.build_parser().parse_args([*TINY, "--data-only", "--skip-data"])) == 1
    assert "nothing to measure" in capsys.readouterr().err


def test_shape_flags_override_quick_and_scale() -> None:
    parser = bench.build_parser()
    cfg, microbatch = bench.resolve_shape(parser.parse_args(["--quick", "--layers", "3"]))
    assert (cfg.n_layers, cfg.emb_dim, cfg.context_length, microbatch) == (3, 64, 64, 2)
    cfg, microbatch = bench.resolve_shape(parser.parse_args([]))
    assert cfg == ModelConfig() and microbatch == 1  # GPT-2 small, micro-batch 1, dropout 0.1
    cfg, microbatch = bench.resolve_shape(parser.parse_args(["--scale", "tiny"]))
    assert (cfg.n_layers, cfg.emb_dim, cfg.vocab_size, microbatch) == (4, 256, 1024, 8)


# --------------------------------------------------------------------------------------------------
# The model's fast paths: equal to the plain computation within fp tolerance


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
    source = model_module.DropMaskSource(p)
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


SMALL = ModelConfig(vocab_size=300, context_length=48, emb_dim=32, n_heads=4, n_layers=2)


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


def test_merge_rounds_takes_medians_over_every_rounds_timed_steps() -> None:
    def run(times: list[float], cpu: list[float], rss: float) -> dict:
        return {"step_times_s": times, "step_cpu_times_s": cpu, "tokens_per_step": 10, "threads": 2,
                "peak_rss_mb": rss, "losses": [1.0], "loadavg": None}

    merged = bench.merge_rounds([run([9, 1, 3], [9, 2, 6], 5), run([9, 2, 4], [9, 4, 8], 7)], warmup=1)
    assert merged["rounds"] == 2 and merged["step_times_s"] == [[9, 1, 3], [9, 2, 4]]
    assert merged["median_s"] == 2.5 and merged["min_s"] == 1
    assert merged["tokens_per_s"] == 4.0
    assert merged["tokens_per_cpu_s"] == 10 * 2 / 5
    assert merged["peak_rss_mb"] == 7


def test_drop_mask_source_rate_and_reproducibility() -> None:
    torch.manual_seed(11)
    mask = model_module.DropMaskSource(0.1).draw((1000, 1000))
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    assert mask.float().mean().item() == pytest.approx(0.1, abs=0.002)
    torch.manual_seed(11)
    assert torch.equal(model_module.DropMaskSource(0.1).draw((1000, 1000)), mask)


def test_fast_dropout_equals_masking_with_its_own_draws_forward_and_backward() -> None:
    layer = model_module.Dropout(0.25).train()
    x = torch.randn(4, 8, 64, requires_grad=True)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = model_module.DropMaskSource(0.25).draw((4, 8, 64))  # the same one global-RNG draw
    expected = torch.where(dropped, 0.0, x.detach() * (1 / 0.75))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, torch.where(dropped, 0.0, grad * (1 / 0.75)), rtol=0, atol=0)
    assert dropped.float().mean().item() == pytest.approx(0.25, abs=0.03)
    # Evaluation and p = 0 are the identity; switched off, it is torch's own dropout stream.
    assert torch.equal(layer.eval()(x), x) and torch.equal(model_module.Dropout(0.0).train()(x), x)
    layer.train()
    torch.manual_seed(5)
    torch_dropout = torch.nn.functional.dropout(x, 0.25, training=True)
    try:
        model_module.CPU_FAST_DROPOUT = False
        torch.manual_seed(5)
        assert torch.equal(layer(x), torch_dropout)
    finally:
        model_module.CPU_FAST_DROPOUT = True


def test_tiny_bench_measures_previous_and_current_shapes(python_stdlib: tuple) -> None:
    from gptlib import bench_tiny

    result = bench_tiny.run(rounds=1, steps=1, warmup=0, verbose=False)
    sides = result["sides"]
    assert list(sides) == ["previous tiny", "tiny, torch dropout", "tiny"]
    assert sides["previous tiny"]["model"]["vocab_size"] == 50257
    assert sides["tiny"]["model"]["vocab_size"] == 1024 and sides["tiny"]["ablate"] == []
    assert sides["tiny, torch dropout"]["ablate"] == ["fast-dropout"]
    for row in sides.values():
        assert row["tokens_per_s"] > 0
    per_token = result["chars_per_token"]
    assert per_token["tiny"] > per_token["gpt2"] > 1.5  # the fitted BPE packs more text per token
    assert sides["tiny"]["chars_per_s"] == pytest.approx(sides["tiny"]["tokens_per_s"] * per_token["tiny"])
    table = bench_tiny.format_table(result)
    assert "previous tiny" in table and "fast CPU dropout alone" in table
