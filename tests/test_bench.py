"""`gptlib bench` machinery on a tiny shape (the fast paths it measures: test_kernels.py).

No speed assertions here: the targets live in the benchmark itself (`gptlib bench`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from gptlib import bench, bench_workers
from gptlib.config import ModelConfig
from gptlib.model import (
    flops_per_token,
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
    assert "targets:" in text and "data reader" in text


def test_load_whole_token_file_matches_the_reader(tmp_path: Path) -> None:
    from gptlib.data import TokenFile

    path = bench_workers.write_synthetic_token_file(tmp_path / "t.safetensors", 5000, chunk=777)
    tokens = bench_workers.load_whole_token_file(path)
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
