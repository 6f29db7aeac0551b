"""The runs table: statuses, deltas vs baseline, seed noise, published reference results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from gptlib import charts, summary, verdicts
from gptlib.config import ConfigError
from gptlib.lifeline import RUN_LOCK, try_lock


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
    assert df.loc["qkv-bias", "error"] == f"not evaluated: gptlib eval {outputs / 'tiny' / 'qkv-bias'}"
    # "running" on disk with no process holding the run: killed, or its last write met a full disk
    assert df.loc["weight-tying", "status"] == "stopped"
    assert df.loc["weight-tying", "error"].startswith("summary.json still reads running, but no "
                                                      "process holds the run")
    fd = try_lock(outputs / "tiny" / "weight-tying" / RUN_LOCK)  # as the run's launcher does
    try:
        running = summary.collect_runs(outputs, "tiny").set_index("run").loc["weight-tying"]
        assert (running["status"], running["error"]) == ("running (step 3/10)", "")
    finally:
        os.close(fd)
    assert df.loc["stacked-1", "status"] == "failed"
    assert df.loc["stacked-1", "error"] == "training failed on rank 0 (exit code 1): boom"
    assert df.loc["stacked-2", "status"] == "not started"
    assert df.loc["learning-rate", "status"] == "failed before training"
    assert df.loc["learning-rate", "error"] == "ConfigError: unknown key"


def test_deltas_against_the_baseline_mean_with_one_verdict_per_intervention(outputs: Path) -> None:
    df = summary.collect_runs(outputs, "tiny").set_index("run")
    assert df.loc["no-dropout", "delta_vs_baseline"] == pytest.approx(3.64 - 3.68)
    assert df.loc["no-dropout-seed43", "delta_vs_baseline"] == pytest.approx(3.63 - 3.68)
    sd = (2 * 0.02**2) ** 0.5  # sample SD of 3.70 and 3.66
    assert df.loc["no-dropout", "baseline_sd"] == pytest.approx(sd)
    assert df.loc["no-dropout", "delta_sd"] == pytest.approx(-0.04 / sd)
    # The baseline's seeds are its samples: never compared with themselves.
    assert pd.isna(df.loc["baseline", "delta_vs_baseline"])
    assert pd.isna(df.loc["baseline-seed43", "delta_vs_baseline"])
    assert df.loc["baseline-seed43", "verdict"] == "baseline seed"
    # Welch by hand: SDs 0.00707 and 0.0283 over 2 seeds each, dof 1.12 -> t 12.706: within noise.
    a, b = sample_sd([3.64, 3.63]) ** 2 / 2, sd**2 / 2
    dof = (a + b) ** 2 / (a**2 + b**2)
    half = 12.706 * (a + b) ** 0.5
    assert 1 <= dof < 2 and -0.045 - half < 0 < -0.045 + half
    assert df.loc["no-dropout", "verdict"] == df.loc["no-dropout-seed43", "verdict"] == "within noise"
    assert df.loc["qkv-bias", "verdict"] == "not evaluated"
    assert df.attrs["noise"] == "baseline: 2 evaluated seeds, mean 3.6800, SD 0.028"


def test_selected_runs_include_ones_never_run(outputs: Path) -> None:
    df = summary.collect_runs(outputs, "tiny", ["no-dropout", "gradient-clipping"])
    assert list(df["run"]) == ["no-dropout", "gradient-clipping"]
    assert list(df["status"]) == ["completed", "not run"]
    assert df["delta_vs_baseline"].isna().all()  # the baseline is not among the selected runs


def test_readable_table(outputs: Path) -> None:
    table = summary.table(summary.collect_runs(outputs, "tiny"))
    row = table.loc["baseline"]
    assert (row["test loss"], row["time*"], row["tokens/s*"], row["spikes"]) == \
        ("3.7000", "1:02:05", "1,234", "2")
    assert table.loc["no-dropout", "Δ vs baseline mean"] == "-0.0400"
    assert table.loc["baseline", "Δ vs baseline mean"] == "—"
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
    assert pd.isna(df["baseline_sd"].iloc[0])  # one seed here: no SD (the published one is context only)
    assert "baseline SD unknown: 1 evaluated baseline seed(s)" in df.attrs["noise"]
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
    assert charts.results_chart(df).layout.annotations[0].text == "no evaluated run and baseline yet"
    assert charts.compare_loss_chart(df).layout.annotations[0].text == "no runs with metrics yet"
    assert charts.loss_charts(df) == []
    one = summary.collect_runs(tmp_path, "tiny", "baseline")
    assert list(one["status"]) == ["not run"]


# ------------------------------------------------------------------------------- noise and stacking


@pytest.fixture
def seeded(tmp_path: Path) -> Path:
    losses = {"baseline": [3.70, 3.66, 3.68], "no-dropout": [3.60, 3.62, 3.64],
              "gradient-clipping": [3.69, 3.67, 3.66]}
    for group, values in losses.items():
        for seed, loss in zip((42, 43, 44), values, strict=True):
            name = group + ("" if seed == 42 else f"-seed{seed}")
            make_run(tmp_path, name, "completed", loss,
                     () if group == "baseline" else (group,), seed=seed)
    make_run(tmp_path, "gradient-clipping+no-dropout", "completed", 3.57,
             ("gradient-clipping", "no-dropout"))
    make_run(tmp_path, "qkv-bias", "failed", None, ("qkv-bias",))
    return tmp_path


def sample_sd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def test_noise_table_means_sds_and_intervals(seeded: Path) -> None:
    table = summary.noise_table(summary.collect_runs(seeded, "tiny")).set_index("intervention")
    base = [3.70, 3.66, 3.68]
    nodrop = [3.60, 3.62, 3.64]
    assert table.loc["baseline", "n"] == 3 and "qkv-bias" not in table.index  # failed: no loss
    assert table.loc["baseline", "sd"] == pytest.approx(sample_sd(base))
    assert table.loc["no-dropout", "mean"] == pytest.approx(3.62)
    delta = 3.62 - 3.68
    assert table.loc["no-dropout", "delta"] == pytest.approx(delta)
    assert table.loc["no-dropout", "delta_sd"] == pytest.approx(delta / 0.02)
    # Equal SDs (0.02) and n = 3 on both sides: Welch's dof = 4, t = 2.776.
    se = (0.02**2 / 3 + 0.02**2 / 3) ** 0.5
    assert table.loc["no-dropout", "ci_low"] == pytest.approx(delta - 2.776 * se)
    assert table.loc["no-dropout", "ci_high"] == pytest.approx(delta + 2.776 * se)
    assert not table.loc["no-dropout", "within_noise"]
    assert table.loc["gradient-clipping", "within_noise"]  # -0.006 against a 0.02 SD
    assert table.loc["no-dropout", "verdict"] == "better"
    assert table.loc["gradient-clipping", "verdict"] == "within noise"
    assert table.loc["baseline", "verdict"] == "baseline"
    assert table.loc["no-dropout", "sd"] == pytest.approx(sample_sd(nodrop))
    # One seed: no spread of its own, so no interval and no verdict; the table says what to train.
    single = table.loc["gradient-clipping+no-dropout"]
    assert single["n"] == 1 and single["delta"] == pytest.approx(3.57 - 3.68)
    assert pd.isna(single["ci_low"]) and single["verdict"] == "unknown: needs seeds"
    assert single["seeds_needed"].startswith(
        "needs >= 2 evaluated seeds on each side (gradient-clipping+no-dropout has 1)")
    view = summary.noise_view(summary.noise_table(summary.collect_runs(seeded, "tiny")))
    assert view.loc["no-dropout", "SD"] == "0.020" and view.loc["no-dropout", "mean test loss"] == "3.6200"
    assert view.loc["gradient-clipping+no-dropout", "95% interval"] == "—"


def test_series_comparison_reads_the_published_direction(seeded: Path) -> None:
    noise = summary.noise_table(summary.collect_runs(seeded, "tiny"))
    table = summary.series_comparison(noise).set_index("intervention")
    assert "baseline" not in table.index
    published = summary.reference_results("gpt2-small-8xa100").set_index("run")
    assert table.loc["no-dropout", "series_delta"] == pytest.approx(
        published.loc["no-dropout", "test_loss"] - published.loc["baseline", "test_loss"])
    assert table.loc["no-dropout", "same_direction"] == "yes"  # better here, better there
    assert table.loc["gradient-clipping", "same_direction"] == "within noise here"
    assert pd.isna(table.loc["gradient-clipping+no-dropout", "series_delta"])
    assert table.loc["gradient-clipping+no-dropout", "same_direction"] == "unknown here"
    assert table.loc["no-dropout", "seeds"] == 3
    worse = noise.copy()
    worse.loc[worse["intervention"] == "no-dropout", "verdict"] = "worse"
    assert summary.series_comparison(worse).set_index("intervention").loc[
        "no-dropout", "same_direction"] == "no"
    assert verdicts.interval_verdict(-0.03, -0.01) == "better"
    assert verdicts.interval_verdict(0.01, 0.02) == "worse"
    assert verdicts.interval_verdict(-0.01, 0.01) == "within noise"
    assert verdicts.interval_verdict(None, 0.1) == "unknown: needs seeds"


def test_stacking_compares_with_the_sum_of_parts(seeded: Path) -> None:
    stack = summary.stacking_table(summary.collect_runs(seeded, "tiny"), "tiny")
    assert stack["run"].tolist() == ["gradient-clipping+no-dropout"]
    row = stack.iloc[0]
    assert row["parts"] == "gradient-clipping + no-dropout"
    assert row["measured_gain"] == pytest.approx(3.68 - 3.57)
    assert row["sum_of_parts"] == pytest.approx((3.68 - 3.62) + (3.68 - 3.673333333))
    assert row["interaction"] == pytest.approx(row["measured_gain"] - row["sum_of_parts"])


def test_seed_noise_splits_initialisation_from_data_order(tmp_path: Path) -> None:
    for name, seed, training_seed, loss in [("baseline", 42, None, 3.70),
                                            ("baseline-seed43", 43, None, 3.66),
                                            ("baseline-tseed1", 42, 1, 3.69),
                                            ("baseline-seed43-tseed1", 43, 1, 3.64),
                                            ("baseline-tseed2", 42, 2, 3.71)]:
        run_dir = make_run(tmp_path, name, "completed", loss, seed=seed)
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config["train"]["training_seed"] = training_seed
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    noise = summary.seed_noise(summary.collect_runs(tmp_path, "tiny")).set_index("source")
    assert noise.loc["random_seed (initialisation + data order + dropout)", "sd"] == pytest.approx(
        sample_sd([3.70, 3.66]))
    assert noise.loc["initialisation only (training_seed 1, random_seed varies)", "sd"] == \
        pytest.approx(sample_sd([3.69, 3.64]))
    assert noise.loc["data order + dropout only (random_seed 42, training_seed varies)", "sd"] == \
        pytest.approx(sample_sd([3.69, 3.71]))


def test_t_quantiles() -> None:
    assert verdicts.t_quantile_975(1) == 12.706
    assert verdicts.t_quantile_975(4.7) == 2.776  # rounded down: conservative
    assert verdicts.t_quantile_975(500) == 1.96


def test_reading_precision() -> None:
    assert verdicts.sd_text(0.0070) == "0.0070" and verdicts.sd_text(0.00015226160833633522) == "0.00015"
    assert verdicts.sd_text(0.123) == "0.12" and verdicts.sd_text(None) == "—"
    assert verdicts.loss_text(4.311241) == "4.3112" and verdicts.delta_text(-0.0386999) == "-0.0387"


def test_unknown_scale_and_runs_are_named(outputs: Path) -> None:
    with pytest.raises(ConfigError, match=r"^scale 'tinny': no such scale .*allowed: tiny"):
        summary.collect_runs(outputs, "tinny")
    df = summary.collect_runs(outputs, "tiny", ["no-dropuot"]).set_index("run")
    assert df.loc["no-dropuot", "status"] == "not run"
    assert df.loc["no-dropuot", "error"].endswith("closest: no-dropout")
    assert summary.collect_runs(outputs, "gpt2-small-1gpu").empty  # a preset, no runs yet
    with pytest.raises(ConfigError, match=r"^outputs folder .*elsewhere does not exist"):
        summary.collect_runs(outputs / "elsewhere", "tiny")
