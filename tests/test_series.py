"""`train.protocol: series`: each point where the series' code (gpjt/ddp-base-model-from-scratch at
b314784) differs from gptlib's own choice, pinned against an independent computation; and every
configuration of the series resolving from our parameters to the series' values."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gptlib import evals, presets
from gptlib.checkpoint import list_checkpoints, read_meta
from gptlib.config import TrainConfig
from gptlib.metrics import is_checkpoint_step, read_metrics
from gptlib.optim import lr_at
from gptlib.rundir import read_summary

SERIES = json.loads((Path(__file__).parent / "data" / "series_runs.json").read_text())
MAPPED = {name: run for name, run in SERIES["runs"].items() if run["gptlib"]}


# ------------------------------------------------------------------------------- the presets


@pytest.mark.parametrize("name", sorted(MAPPED))
def test_every_series_configuration_resolves_from_our_parameters(name: str) -> None:
    run, defaults = MAPPED[name], SERIES["series_defaults"]
    cfg = presets.resolve_config(run["gptlib"]["scale"], run["gptlib"]["intervention"],
                                 overrides=run["gptlib"]["overrides"])
    train = {**defaults, **run["train"]}
    t, m = cfg.train, cfg.model
    for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate",
                "qkv_bias"):
        assert getattr(m, key) == run["model"][key], key
    assert m.tie_weights == run["model"].get("tie_weights", defaults["tie_weights"])
    for key in ("microbatch_size", "gradient_accumulation_steps", "checkpoint_interval",
                "min_train_tokens", "start_train_token", "clipping_max_norm", "weight_decay",
                "learning_rate", "schedule_learning_rate", "random_seed"):
        assert getattr(t, key) == train[key], key
    if train["schedule_learning_rate"]:
        assert t.warmup_period_percent == train["warmup_period_percent"]
    assert t.dataset == "hf:" + train["dataset"]
    assert t.precision == ("fp16" if train["use_amp"] else "fp32")
    assert t.protocol == "series"
    world = int(name.split("x", 1)[0]) if name[0].isdigit() else 1
    assert cfg.nproc == world
    assert t.global_batch_size == t.microbatch_size * t.gradient_accumulation_steps * world


def test_the_runs_left_out_cannot_run_at_that_commit() -> None:
    left_out = {name: run for name, run in SERIES["runs"].items() if not run["gptlib"]}
    assert sorted(left_out) == ["8xa100m40", "8xa100m80", "8xb200m160", "8xh100m80", "original"]
    assert all("checkpoint_interval" not in run["train"] and "validation_interval" in run["train"]
               for run in left_out.values())


def test_a_series_run_folder_imports_with_the_series_defaults(tmp_path: Path) -> None:
    run = tmp_path / "8xa100m40-scheduled-without-warmup"
    run.mkdir()
    series = SERIES["runs"]["8xa100m40-weight-decay-cerebras-scheduling-learning-rate"]
    train = {k: v for k, v in series["train"].items() if k != "warmup_period_percent"}
    (run / "train.json").write_text(json.dumps(train))
    (run / "model.json").write_text(json.dumps(series["model"]))
    cfg = presets.resolve_config(str(run))
    assert cfg.train.protocol == "series" and cfg.train.warmup_period_percent == 0  # not gptlib's 5
    assert cfg.train.weight_decay == 0.33724 and cfg.nproc == 8
    assert lr_at(0, cfg.train, 100) == cfg.train.learning_rate  # no warm-up: the cosine from step 0


# ------------------------------------------------------------------------------- checkpoints


def series_checkpoint_steps(total: int, interval: int) -> list[int]:
    """ddp_train.py: `global_step % checkpoint_interval == 0 or global_step == total - 1`."""
    return sorted({s for s in range(total) if s % interval == 0} | {total - 1})


def test_checkpoint_steps_of_each_protocol() -> None:
    total, interval = 33_165, 617
    series = [s for s in range(total) if is_checkpoint_step(s, total, interval, "series")]
    assert series == series_checkpoint_steps(total, interval)
    assert (len(series), series[0], series[1], series[-1]) == (55, 0, 617, 33_164)
    ours = [s for s in range(total) if is_checkpoint_step(s, total, interval, "gptlib")]
    assert (len(ours), ours[0], ours[-1]) == (54, 616, 33_164)


@pytest.fixture(scope="module")
def series_run(micro_run: Callable[..., Path]) -> Path:
    """10 steps of GA 2 with dropout, checkpoint interval 4, under the series' protocol."""
    return micro_run("series/run", **{
        "train.protocol": "series", "train.min_train_tokens": 10 * 2 * 2 * 16,
        "train.gradient_accumulation_steps": 2, "model.drop_rate": 0.1, "train.keep_checkpoints": -1})


def test_series_checkpoints_periods_and_best(series_run: Path) -> None:
    # After 0-based steps 0, 4, 8 and the last, 9: named by steps done, as every gptlib checkpoint.
    assert list_checkpoints(series_run) == [f"step-{s + 1}" for s in series_checkpoint_steps(10, 4)]
    records = read_metrics(series_run / "metrics.jsonl")
    assert all(len(r["rank0_losses"]) == 2 for r in records)  # one per micro-batch of rank 0
    for name, first, last in [("step-1", 0, 0), ("step-5", 1, 4), ("step-9", 5, 8), ("step-10", 9, 9)]:
        period = read_meta(series_run / "checkpoints" / name)["period"]
        losses = [v for r in records[first:last + 1] for v in r["rank0_losses"]]
        assert (period["first_step"], period["last_step"]) == (first, last)
        assert period["loss_avg"] == pytest.approx(sum(losses) / len(losses), rel=1e-12)
        assert period["loss_min"] == min(losses) and period["loss_max"] == max(losses)
    summary = read_summary(series_run)
    chosen = min(((n, read_meta(series_run / "checkpoints" / n)["period"]["loss_avg"])
                  for n in list_checkpoints(series_run)), key=lambda item: item[1])[0]
    assert f"step-{summary['best_step']}" == chosen
    assert (series_run / "checkpoints" / "best").read_text().strip() == chosen


def test_series_runs_on_through_non_finite_steps(micro_run: Callable[..., Path]) -> None:
    run = micro_run("series-nan/run", **{
        "train.protocol": "series", "train.learning_rate": 1e30, "train.max_nonfinite_steps": 1,
        "train.min_train_tokens": 6 * 2 * 16, "train.checkpoint_interval": 3,
        "train.keep_checkpoints": -1})
    summary = read_summary(run)
    assert summary["status"] == "completed"
    records = read_metrics(run / "metrics.jsonl")
    assert summary["skipped_steps"] == sum(r["skipped"] for r in records) >= 4  # recorded, reported
    assert list_checkpoints(run) == ["step-1", "step-4", "step-6"]


# ------------------------------------------------------------------------------- the schedule


def series_lrs(total: int, percent: float, peak: float) -> list[float]:
    """The series' schedule (ddp_train.py), run with torch's own schedulers."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=peak)
    warmup = int((total * percent) // 100)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers=[
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.00001, end_factor=1.0,
                                          total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=peak / 10),
    ], milestones=[warmup])
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("total", [100, 617])
def test_the_series_cosine_and_gptlibs(total: int) -> None:
    series = TrainConfig(learning_rate=1.4e-3, schedule_learning_rate=True, protocol="series")
    expected = series_lrs(total, 5, 1.4e-3)
    ours = [lr_at(s, series, total) for s in range(total)]
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert ours[-1] > 1.4e-4  # it stops just short of the floor
    gptlib = TrainConfig(learning_rate=1.4e-3, schedule_learning_rate=True)
    assert lr_at(total - 1, gptlib, total) == pytest.approx(1.4e-4, rel=1e-12)  # gptlib reaches it


# ------------------------------------------------------------------------------- evaluation


def test_eval_precision_per_protocol() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for precision in ("fp32", "fp16", "bf16"):
        assert evals.eval_precision(precision, cpu, "series") == "fp16"
        assert evals.eval_precision(precision, cuda, "series") == "fp16"
    assert evals.eval_precision("fp32", cpu) == "fp32" and evals.eval_precision("fp16", cpu) == "fp32"


def test_series_scores_under_fp16_and_samples_in_fp32(series_run: Path) -> None:
    import torch.nn.functional as F

    cfg, model, _ = evals.load_run(series_run, "latest")
    loss, n, precision = evals.slice_loss(model, cfg, batches=2)
    reader, _ = evals.validation_reader(cfg, 2)
    expected = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):  # test_loss.py
        for i in range(n):
            inputs, targets = reader.get(i, 0, 0)
            logits = model(inputs)
            expected.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item())
    assert precision == "fp16"
    assert loss == pytest.approx(sum(expected) / len(expected), abs=1e-3)
    cfg.train.precision = "bf16"  # trained in bf16, say: the series still samples in fp32
    tokenizer = evals.open_tokenizer(cfg.train.dataset)
    ids = torch.tensor([tokenizer.encode(cfg.eval.smoke_prompt)])
    with torch.inference_mode():
        out = evals.generate(model, ids, cfg.eval.smoke_tokens, cfg.eval.smoke_top_k,
                             cfg.eval.smoke_temperature, torch.Generator().manual_seed(cfg.eval.smoke_seed),
                             tokenizer.n_vocab)
    assert evals.smoke_test(model, cfg) == tokenizer.decode(out[0])
    assert not math.isnan(loss)


def test_the_tiny_scale_keeps_gptlibs_own_protocol() -> None:
    assert presets.resolve_config("tiny").train.protocol == "gptlib"
    assert presets.resolve_config("gpt2-small-8xa100").train.protocol == "series"
    assert presets.resolve_config("gpt2-small-1gpu").train.protocol == "series"
