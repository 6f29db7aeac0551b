"""The runs table: statuses, deltas vs baseline, seed noise, published reference results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gptlib import charts, summary


def make_run(outputs: Path, name: str, status: str | None, test_loss: float | None = None,
             interventions: tuple[str, ...] = (), seed: int = 42, **extra: object) -> Path:
    run_dir = outputs / "tiny" / name
    run_dir.mkdir(parents=True)
    config = {"scale": "tiny", "interventions": list(interventions),
              "train": {"random_seed": seed, "training_seed": None}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if status is not None:
        data = {"status": status, **extra}
        if test_loss is not None:
            data["test_loss"] = test_loss
        (run_dir / "summary.json").write_text(json.dumps(data))
    return run_dir


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    make_run(tmp_path, "baseline", "completed", 3.70, wall_time_s=3725.4, tokens_per_s=1234.5,
             final_train_loss=3.8, spike_count=2)
    make_run(tmp_path, "baseline-seed43", "completed", 3.66, seed=43)
    make_run(tmp_path, "no-dropout", "completed", 3.64, ("no-dropout",))
    make_run(tmp_path, "no-dropout-seed43", "completed", 3.63, ("no-dropout",), seed=43)
    make_run(tmp_path, "qkv-bias", "completed", None, ("qkv-bias",))
    running = make_run(tmp_path, "weight-tying", "running", None, ("weight-tying",), total_steps=10)
    (running / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(3)))
    make_run(tmp_path, "stacked-1", "failed", None, ("stacked-1",),
             error="training failed on rank 0 (exit code 1): boom\nlast log lines:\n...")
    make_run(tmp_path, "stacked-2", None)  # config written, no summary: not started
    broken = tmp_path / "tiny" / "learning-rate"  # the notebook stopped before training
    broken.mkdir()
    notebook = {"metadata": {"papermill": {"exception": True}}, "cells": [
        {"cell_type": "code", "outputs": [{"output_type": "error", "ename": "ConfigError",
                                           "evalue": "unknown key"}]}]}
    (broken / "train.ipynb").write_text(json.dumps(notebook))
    (tmp_path / "tiny" / "not-a-run").mkdir()
    return tmp_path


def test_every_run_is_listed_with_its_status(outputs: Path) -> None:
    df = summary.collect_runs(outputs, "tiny").set_index("run")
    assert list(df.index) == ["baseline", "baseline-seed43", "learning-rate", "no-dropout",
                              "no-dropout-seed43", "qkv-bias", "stacked-1", "stacked-2",
                              "weight-tying"]
    assert df.loc["baseline", "status"] == "completed"
    assert df.loc["qkv-bias", "status"] == "completed (not evaluated)"
    assert df.loc["weight-tying", "status"] == "running (step 3/10)"
    assert df.loc["stacked-1", "status"] == "failed"
    assert df.loc["stacked-1", "error"] == "training failed on rank 0 (exit code 1): boom"
    assert df.loc["stacked-2", "status"] == "not started"
    assert df.loc["learning-rate", "status"] == "failed before training"
    assert df.loc["learning-rate", "error"] == "ConfigError: unknown key"


def test_deltas_against_the_same_seed_baseline_and_seed_noise(outputs: Path) -> None:
    df = summary.collect_runs(outputs, "tiny").set_index("run")
    assert df.loc["no-dropout", "delta_vs_baseline"] == pytest.approx(3.64 - 3.70)
    assert df.loc["no-dropout-seed43", "delta_vs_baseline"] == pytest.approx(3.63 - 3.66)
    sd = (2 * 0.02**2) ** 0.5  # sample SD of 3.70 and 3.66
    assert df.loc["no-dropout", "baseline_sd"] == pytest.approx(sd)
    assert df.loc["no-dropout", "delta_sd"] == pytest.approx(-0.06 / sd)
    assert df.loc["baseline", "delta_vs_baseline"] == 0
    assert df.attrs["noise"].startswith("baseline SD 0.028284 from 2 baseline seeds")


def test_selected_runs_include_ones_never_run(outputs: Path) -> None:
    df = summary.collect_runs(outputs, "tiny", ["no-dropout", "gradient-clipping"])
    assert list(df["run"]) == ["no-dropout", "gradient-clipping"]
    assert list(df["status"]) == ["completed", "not run"]
    assert df["delta_vs_baseline"].isna().all()  # the baseline is not among the selected runs


def test_readable_table(outputs: Path) -> None:
    table = summary.table(summary.collect_runs(outputs, "tiny"))
    row = table.loc["baseline"]
    assert (row["test loss"], row["time"], row["tokens/s"], row["spikes"]) == \
        ("3.700000", "1:02:05", "1,234", "2")
    assert table.loc["no-dropout", "Δ vs baseline"] == "-0.060000"
    assert table.loc["stacked-1", "test loss"] == "—"
    assert "published test loss" not in table


def test_published_results_beside_the_full_scale_runs(tmp_path: Path) -> None:
    run_dir = tmp_path / "gpt2-small-8xa100" / "baseline"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"interventions": [],
                                                         "train": {"random_seed": 42}}))
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "test_loss": 3.69}))
    df = summary.collect_runs(tmp_path, "gpt2-small-8xa100", ["baseline", "stacked-1"])
    assert list(df["reference_test_loss"]) == [3.691526, 3.577761]
    assert list(df["reference_delta"]) == pytest.approx([0.0, -0.113765])
    assert df["baseline_sd"].iloc[0] == 0.0123  # the published seed SD, with one seed here
    assert "published test loss" in summary.table(df)


def test_reference_results_data() -> None:
    ref = summary.reference_results()
    assert ref["source"].str.contains("gilesthomas.com").all()
    assert ref["source"].str.contains("gpjt/ddp-base-model-from-scratch").all()
    full = ref[ref["scale"] == "gpt2-small-8xa100"].set_index("run")
    assert full.loc["baseline", "test_loss"] == 3.691526
    assert full.loc["baseline", "seed_sd"] == 0.0123
    both = full.dropna(subset=["test_loss", "improvement_vs_baseline"])
    assert (both["improvement_vs_baseline"] - (3.691526 - both["test_loss"])).abs().max() < 1e-3
    assert {"gradient-clipping", "no-dropout", "qkv-bias", "learning-rate-schedule",
            "weight-decay-gpt2", "weight-decay-cerebras", "weight-tying", "no-amp", "stacked-1",
            "stacked-2", "stacked-3"} <= set(full.index)
    assert summary.reference_results("gpt2-small-1gpu").set_index("run").loc[
        "baseline", "test_loss"] == 3.683835


def test_no_runs_yet(tmp_path: Path) -> None:
    df = summary.collect_runs(tmp_path, "tiny")
    assert df.empty and list(df.columns) == summary.COLUMNS
    assert summary.table(df).empty
    assert charts.test_loss_chart(df).layout.annotations[0].text == "no evaluated run and baseline yet"
    assert charts.compare_loss_chart(df).layout.annotations[0].text == "no runs with metrics yet"
    assert charts.loss_charts(df) == []
    one = summary.collect_runs(tmp_path, "tiny", "baseline")
    assert list(one["status"]) == ["not run"]
