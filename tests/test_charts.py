"""Charts read from run files: bands equal the checkpoint aggregates, markers, files; report bits."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from gptlib import charts, report, summary
from gptlib.checkpoint import list_checkpoints, read_meta
from gptlib.metrics import read_metrics
from gptlib.rundir import read_spikes


@pytest.fixture(scope="module")
def run(micro_run: Callable[..., Path]) -> Path:
    """12 steps, 3 checkpoint periods, clipping at 0.5, a spike detector sensitive enough to fire."""
    return micro_run("charts/tiny/gradient-clipping", **{
        "train.min_train_tokens": 12 * 2 * 16, "train.clipping_max_norm": 0.5,
        "train.spike_window": 3, "train.spike_threshold": 1.0})


def trace(fig, name: str):  # noqa: ANN001, ANN201
    matches = [t for t in fig.data if t.name == name] or \
        [t for t in fig.data if (t.name or "").startswith(name)]
    assert len(matches) == 1, [t.name for t in fig.data]
    return matches[0]


def test_loss_band_and_average_equal_the_checkpoint_aggregates(run: Path) -> None:
    fig = charts.loss_chart(run)
    metas = [read_meta(run / "checkpoints" / name) for name in list_checkpoints(run)]
    assert [m["step"] for m in metas] == [4, 8, 12]
    assert list(trace(fig, "period min").x) == [4, 8, 12]
    assert list(trace(fig, "period min").y) == [m["period"]["loss_min"] for m in metas]
    assert list(trace(fig, "period min–max").y) == [m["period"]["loss_max"] for m in metas]
    assert trace(fig, "period min–max").fill == "tonexty"
    assert list(trace(fig, "period average").y) == [m["period"]["loss_avg"] for m in metas]
    records = read_metrics(run / "metrics.jsonl")
    per_step = trace(fig, "loss per step")
    assert list(per_step.x) == list(range(1, 13)) and list(per_step.y) == [r["loss"] for r in records]


def test_best_step_and_spikes_are_marked(run: Path) -> None:
    fig = charts.loss_chart(run)
    done = json.loads((run / "summary.json").read_text())
    best = trace(fig, "best")
    assert list(best.x) == [done["best_step"]] and list(best.y) == [done["best_loss"]]
    assert best.name == f"best: step-{done['best_step']}"
    spikes = json.loads((run / "spikes.json").read_text())
    assert spikes, "the sensitive detector should flag at least one step"
    marked = trace(fig, "spikes")
    assert list(marked.x) == [s["step"] + 1 for s in spikes]
    assert list(marked.y) == [s["loss"] for s in spikes]


def test_loss_chart_shows_the_whole_curve_against_reference_levels(run: Path) -> None:
    fig = charts.loss_chart(run)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.range is None  # nothing cut off
    records = read_metrics(run / "metrics.jsonl")
    assert list(trace(fig, "loss per step").y) == [r["loss"] for r in records]  # the first steps too
    levels = {t.name.rsplit(" ", 1)[0]: t for t in fig.data if t.name.startswith(("uniform", "unigram"))}
    assert list(levels["uniform guess ln V"].y) == pytest.approx([math.log(50257)] * 2)
    assert list(levels["uniform guess ln V"].x) == [1, records[-1]["step"] + 1]  # across the run
    data = charts.load_run_data(run)
    data.summary = {**data.summary, "unigram_loss": 7.25, "uniform_loss": math.log(50257)}
    data.cfg.scale = "gpt2-small-8xa100"
    assert charts.reference_levels(data) == {"uniform guess ln V": math.log(50257),
                                             "unigram level (test slice)": 7.25,
                                             "published baseline test loss": 3.691526}


def test_grad_norm_chart_draws_the_clip_line_only_with_clipping(run: Path) -> None:
    fig = charts.grad_norm_chart(run)
    assert [shape.y0 for shape in fig.layout.shapes] == [0.5]
    records = read_metrics(run / "metrics.jsonl")
    assert list(trace(fig, "per step").y) == [r["grad_norm"] for r in records]
    data = charts.load_run_data(run)
    data.cfg.train.clipping_max_norm = None
    assert not charts.grad_norm_chart(data).layout.shapes


def test_lr_chart(run: Path) -> None:
    fig = charts.lr_chart(run)
    assert list(fig.data[0].y) == [r["lr"] for r in read_metrics(run / "metrics.jsonl")]


def test_comparison_charts(run: Path, tmp_path: Path) -> None:
    fig = charts.compare_loss_chart({"a": run, "b": run, "missing": tmp_path / "nothing"})
    assert [t.name for t in fig.data] == ["a", "b"]
    tokens = {r["step"]: r["tokens"] for r in read_metrics(run / "metrics.jsonl")}
    assert list(fig.data[0].x) == [tokens[3], tokens[7], tokens[11]]
    df = summary.collect_runs(run.parent.parent, "tiny")
    bars = charts.results_chart(df)
    assert bars.layout.annotations[0].text == "no evaluated run and baseline yet"
    assert len(charts.loss_charts(df)) == 1
    assert len(charts.loss_charts(df, spiked_only=True)) == (1 if read_spikes(run) else 0)


def test_chart_files_work_offline(run: Path) -> None:
    paths = report.save_charts(run)
    assert [p.name for p in paths] == ["loss.html", "grad_norm.html", "lr.html"]
    assert (run / "charts" / "plotly.min.js").stat().st_size > 1_000_000
    for path in paths:
        text = path.read_text()
        assert re.findall(r'<script[^>]* src="([^"]*)"', text) == ["plotly.min.js"]


def test_figure_bundle_has_json_and_html_without_a_cdn(run: Path) -> None:
    bundle = report.figure_bundle(charts.lr_chart(run))
    assert set(bundle) == {"application/vnd.plotly.v1+json", "text/html", "text/plain"}
    assert bundle["application/vnd.plotly.v1+json"]["data"][0]["type"] == "scatter"
    assert "Plotly.newPlot" in bundle["text/html"] and "<script src=" not in bundle["text/html"]


def test_progress_keeps_one_display_with_the_final_state() -> None:
    class Handle:
        def __init__(self) -> None:
            self.shown: list[str] = []

        def update(self, bundle: dict, raw: bool) -> None:
            self.shown.append(bundle["text/plain"])

    progress = report.Progress(min_interval_s=math.inf)
    progress._handle = Handle()
    lines = ["Run tiny/baseline: 1 parameters", "step 2/4 | loss 10.9 | ETA 0:00:02",
             "checkpoint step-4: period loss avg 10.9", "step 4/4 | loss 10.8 | ETA 0:00:00",
             "Training complete in 3.85 seconds", "Final train loss: 10.922"]
    with progress:
        for line in lines:
            progress.update(line)
    final = progress._handle.shown[-1].splitlines()
    assert final[0] == "Run tiny/baseline: 1 parameters"
    assert final[1].endswith("100%  step 4/4 | loss 10.8 | ETA 0:00:00")
    assert final[2:] == lines[2:3] + lines[4:]
    assert len(progress._handle.shown) == 5  # throttled: the second step line waits for the end


def test_papermill_handler_creates_the_output_folder(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import papermill.iorw  # noqa: F401  # as papermill runs: it loads our entry point itself

    from gptlib.papermill_io import outputs_handler

    monkeypatch.chdir(tmp_path)
    outputs_handler.write("{}", "outputs/tiny/baseline/train.ipynb")
    assert (tmp_path / "outputs/tiny/baseline/train.ipynb").read_text() == "{}"


def test_whole_report_outside_a_notebook(run: Path, capsys: pytest.CaptureFixture) -> None:
    done = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**done, "test_loss": 10.85,
                                                  "smoke_text": "Every effort moves you on",
                                                  "eval_checkpoint": "step-12"}))
    report.render_report(run)
    shown = capsys.readouterr().out
    for text in ("<Plotly figure: tiny/gradient-clipping: training loss>",
                 "<Plotly figure: tiny/gradient-clipping: gradient norm>",
                 "Smoke test: Every effort moves you on", "Test loss: 10.8500 (checkpoint step-12)",
                 # its config has no intervention (clipping came as an override): a baseline sample
                 "This is a baseline run of scale tiny: one sample of the baseline's seed noise",
                 "Training complete in", f"Best checkpoint: step-{done['best_step']}",
                 "Charts saved: "):
        assert text in shown, text
    (run / "summary.json").write_text(json.dumps(done))


def test_a_runs_report_uses_the_one_verdict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name, interventions, losses in [("baseline", [], [10.9, 10.7]), ("qkv-bias", ["qkv-bias"], [10.85])]:
        for seed, loss in zip((42, 43), losses, strict=False):
            run_dir = tmp_path / "tiny" / (name + ("" if seed == 42 else f"-seed{seed}"))
            run_dir.mkdir(parents=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(
                {"interventions": interventions, "train": {"random_seed": seed}}))
            (run_dir / "summary.json").write_text(json.dumps(
                {"status": "completed", "test_loss": loss, "eval_checkpoint": "step-4",
                 "evaluations": {"step-2 (1 batches)": {"test_loss": 11.5}}}))
    report.show_evaluation(tmp_path / "tiny" / "qkv-bias")
    shown = capsys.readouterr().out
    assert ("Baseline: mean 10.8000 over 2 seed(s), SD 0.14. qkv-bias: Δ +0.0500 (+0.4 baseline SDs), "
            "1 vs 2 seeds: unknown: needs seeds; needs >= 2 evaluated seeds on each side "
            "(qkv-bias has 1)") in shown
    assert "Also evaluated (not the run's result): step-2 (1 batches): 11.5000." in shown
    report.show_evaluation(tmp_path / "tiny" / "baseline-seed43")
    assert "This is a baseline run of scale tiny" in capsys.readouterr().out


def test_progress_prints_plain_lines_for_papermill_log_output(capsys: pytest.CaptureFixture) -> None:
    class Handle:
        def update(self, bundle: dict, raw: bool) -> None:
            pass

    progress = report.Progress(min_interval_s=math.inf)
    progress._handle = Handle()
    steps = [f"step {i}/20 | loss 9.0 | ETA 0:00:01" for i in range(1, 21)]
    for line in [*steps[:10], "checkpoint step-10: period loss avg 9.0", *steps[10:]]:
        progress.update(line)
    printed = capsys.readouterr().out.splitlines()
    assert printed == [steps[1], steps[3], steps[5], steps[7], steps[9],
                       "checkpoint step-10: period loss avg 9.0",
                       steps[11], steps[13], steps[15], steps[17], steps[19]]
