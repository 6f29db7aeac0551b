"""Plotly figures of one run (loss, gradient norm, learning rate) and comparisons across runs.

Every chart is computed from the run directory's files only (``config.yaml``, ``metrics.jsonl``,
``spikes.json``, ``summary.json``). The x axis is the number of optimizer steps completed, so a
checkpoint ``step-N`` sits at x = N; per-step records (0-based ``step``) are drawn at ``step + 1``.
Checkpoint-period aggregates come from :func:`gptlib.metrics.periods`, the function the training
loop uses for each checkpoint's ``meta.json``, so the bands equal the stored aggregates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from gptlib.config import RunConfig
from gptlib.metrics import periods, read_metrics
from gptlib.presets import load_config
from gptlib.rundir import read_spikes, read_summary
from gptlib.verdicts import UNKNOWN, sd_text

__all__ = [
    "RunData",
    "load_run_data",
    "loss_chart",
    "grad_norm_chart",
    "lr_chart",
    "compare_loss_chart",
    "loss_charts",
    "results_chart",
    "save_run_charts",
]

TEMPLATE = "plotly_white"
STEP_COLOR = "rgba(99, 110, 250, 0.35)"
BAND_COLOR = "rgba(99, 110, 250, 0.18)"
AVG_COLOR = "rgb(40, 50, 190)"
SPIKE_COLOR = "rgb(214, 39, 40)"
BEST_COLOR = "rgb(44, 160, 44)"
RUN_CHARTS = ("loss", "grad_norm", "lr")


@dataclass
class RunData:
    """A run's files, read once: config, per-step records, period aggregates, spikes, summary."""

    run_dir: Path
    cfg: RunConfig
    records: list[dict]
    periods: list[dict] = field(default_factory=list)
    spikes: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.cfg.scale}/{self.run_dir.name}"

    @property
    def best(self) -> dict | None:
        """The period with the lowest average loss (the first on a tie), as the loop picks it."""
        scored = [p for p in self.periods if p["loss_avg"] is not None]
        return min(scored, key=lambda p: p["loss_avg"]) if scored else None


def load_run_data(run_dir: str | Path) -> RunData:
    """Read everything the charts need from a run directory."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    records = read_metrics(run_dir / "metrics.jsonl")
    return RunData(
        run_dir=run_dir,
        cfg=cfg,
        records=records,
        periods=periods(records, cfg.train.checkpoint_interval, cfg.train.protocol),
        spikes=read_spikes(run_dir),
        summary=read_summary(run_dir),
    )


def _data(run: str | Path | RunData) -> RunData:
    return run if isinstance(run, RunData) else load_run_data(run)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _layout(fig: go.Figure, title: str, subtitle: str, y_title: str, x_title: str) -> go.Figure:
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title, "subtitle": {"text": subtitle}},
        xaxis_title=x_title,
        yaxis_title=y_title,
        height=460,
        hovermode="closest",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1},
        margin={"t": 110},
    )
    return fig


def _empty(fig: go.Figure, message: str) -> go.Figure:
    fig.add_annotation(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def _steps(records: list[dict]) -> list[int]:
    return [r["step"] + 1 for r in records]


def reference_levels(data: RunData) -> dict[str, float]:
    """Loss levels to read a curve against: the uniform guess ln V, the unigram level of the test
    slice (once evaluated) and the published baseline test loss of the scale (full scale only)."""
    from gptlib.summary import reference_results

    levels = {"uniform guess ln V": data.summary.get("uniform_loss") or math.log(data.cfg.model.vocab_size)}
    if data.summary.get("unigram_loss") is not None:
        levels["unigram level (test slice)"] = data.summary["unigram_loss"]
    published = reference_results(data.cfg.scale).set_index("run")["test_loss"].dropna()
    if "baseline" in published:
        levels["published baseline test loss"] = float(published["baseline"])
    return levels


def _reference_lines(fig: go.Figure, data: RunData) -> None:
    """Each reference level as a dashed line across the run, named in the legend (traces, not
    shapes: Plotly places shape annotations in log10 units on a log axis)."""
    if not data.records:
        return
    ends = [1, data.records[-1]["step"] + 1]
    for (name, level), dash in zip(reference_levels(data).items(), ("dot", "dash", "dashdot"),
                                   strict=False):
        fig.add_scatter(x=ends, y=[level, level], mode="lines", name=f"{name} {level:.3f}",
                        line={"dash": dash, "color": "rgb(120, 120, 120)", "width": 1},
                        hovertemplate=f"{name}: {level:.4f}<extra></extra>")


def loss_chart(run: str | Path | RunData) -> go.Figure:
    """Per-step training loss (faint), each checkpoint period's min–max band and average, the
    best checkpoint and the detected loss spikes."""
    data = _data(run)
    fig = go.Figure()
    subtitle = (
        f"band = min–max of each {data.cfg.train.checkpoint_interval}-step checkpoint period; "
        "x = optimizer steps; log scale"
    )
    _layout(fig, f"{data.title}: training loss", subtitle, "loss (cross-entropy)", "step")
    if not data.records:
        return _empty(fig, "no metrics yet")
    fig.add_scatter(
        x=_steps(data.records), y=[r["loss"] for r in data.records], mode="lines",
        name="loss per step", line={"color": STEP_COLOR, "width": 1},
        customdata=[r["tokens"] for r in data.records],
        hovertemplate="step %{x}<br>loss %{y:.4f}<br>tokens %{customdata:,}<extra></extra>",
    )
    ends = [p["last_step"] + 1 for p in data.periods]
    lows = [_nan(p["loss_min"]) for p in data.periods]
    highs = [_nan(p["loss_max"]) for p in data.periods]
    fig.add_scatter(x=ends, y=lows, mode="lines", line={"width": 0}, name="period min",
                    showlegend=False, hovertemplate="step %{x}<br>period min %{y:.4f}<extra></extra>")
    fig.add_scatter(x=ends, y=highs, mode="lines", line={"width": 0}, fill="tonexty",
                    fillcolor=BAND_COLOR, name="period min–max",
                    hovertemplate="step %{x}<br>period max %{y:.4f}<extra></extra>")
    fig.add_scatter(
        x=ends, y=[_nan(p["loss_avg"]) for p in data.periods], mode="lines+markers",
        name="period average", line={"color": AVG_COLOR, "width": 2}, marker={"size": 5},
        hovertemplate="checkpoint step-%{x}<br>period average %{y:.4f}<extra></extra>",
    )
    best = data.best
    if best is not None:
        step = best["last_step"] + 1
        fig.add_scatter(
            x=[step], y=[best["loss_avg"]], mode="markers", name=f"best: step-{step}",
            marker={"symbol": "star", "size": 16, "color": BEST_COLOR,
                    "line": {"color": "white", "width": 1}},
            hovertemplate="best checkpoint step-%{x}<br>period average %{y:.4f}<extra></extra>",
        )
    if data.spikes:
        fig.add_scatter(
            x=[s["step"] + 1 for s in data.spikes], y=[s["loss"] for s in data.spikes],
            mode="markers", name=f"spikes ({len(data.spikes)})",
            marker={"symbol": "x", "size": 10, "color": SPIKE_COLOR},
            customdata=[[_nan(s.get("level")), _nan(s.get("grad_norm"))] for s in data.spikes],
            hovertemplate=("spike at step %{x}<br>loss %{y:.4f} (rolling median "
                           "%{customdata[0]:.4f})<br>grad norm %{customdata[1]:.3f}<extra></extra>"),
        )
    _reference_lines(fig, data)
    fig.update_yaxes(type="log")  # the whole curve: the drop from ln V and the slow tail both show
    return fig


def grad_norm_chart(run: str | Path | RunData) -> go.Figure:
    """Global gradient norm (before clipping) per step, each period's max and average, and the
    clipping threshold when ``train.clipping_max_norm`` is set."""
    data = _data(run)
    max_norm = data.cfg.train.clipping_max_norm
    fig = go.Figure()
    subtitle = "pre-clip global L2 norm; log scale" + (
        f"; dashed line = clipping at {max_norm:g}" if max_norm is not None else "; no clipping")
    _layout(fig, f"{data.title}: gradient norm", subtitle, "gradient norm", "step")
    fig.update_yaxes(type="log")
    if not data.records:
        return _empty(fig, "no metrics yet")
    fig.add_scatter(
        x=_steps(data.records), y=[r["grad_norm"] for r in data.records], mode="lines",
        name="per step", line={"color": STEP_COLOR, "width": 1},
        hovertemplate="step %{x}<br>grad norm %{y:.4f}<extra></extra>",
    )
    ends = [p["last_step"] + 1 for p in data.periods]
    fig.add_scatter(
        x=ends, y=[_nan(p["grad_norm_max"]) for p in data.periods], mode="lines+markers",
        name="period max", line={"color": SPIKE_COLOR, "width": 1.5}, marker={"size": 4},
        customdata=[100 * p["clipped_fraction"] for p in data.periods],
        hovertemplate="step %{x}<br>period max %{y:.4f}<br>clipped %{customdata:.1f}% of steps"
                      "<extra></extra>",
    )
    fig.add_scatter(
        x=ends, y=[_nan(p["grad_norm_avg"]) for p in data.periods], mode="lines+markers",
        name="period average", line={"color": AVG_COLOR, "width": 2}, marker={"size": 4},
        hovertemplate="step %{x}<br>period average %{y:.4f}<extra></extra>",
    )
    if max_norm is not None:
        fig.add_hline(y=max_norm, line={"dash": "dash", "color": "black", "width": 1},
                      annotation_text=f"clip {max_norm:g}", annotation_position="top left")
    return fig


def lr_chart(run: str | Path | RunData) -> go.Figure:
    """The learning rate applied at each step."""
    data = _data(run)
    t = data.cfg.train
    kind = (f"warmup {t.warmup_period_percent:g}% then cosine to peak/10"
            if t.schedule_learning_rate else "constant")
    fig = go.Figure()
    _layout(fig, f"{data.title}: learning rate", f"peak {t.learning_rate:g}, {kind}",
            "learning rate", "step")
    if not data.records:
        return _empty(fig, "no metrics yet")
    fig.add_scatter(x=_steps(data.records), y=[r["lr"] for r in data.records], mode="lines",
                    name="learning rate", line={"color": AVG_COLOR, "width": 2},
                    hovertemplate="step %{x}<br>lr %{y:.3e}<extra></extra>")
    fig.update_yaxes(exponentformat="e", rangemode="tozero")
    return fig


def _run_dirs(runs: Mapping[str, str | Path] | pd.DataFrame) -> dict[str, Path]:
    if isinstance(runs, pd.DataFrame):
        return {str(name): Path(d) for name, d in zip(runs["run"], runs["run_dir"], strict=True)}
    return {str(name): Path(d) for name, d in runs.items()}


def compare_loss_chart(runs: Mapping[str, str | Path] | pd.DataFrame, x: str = "tokens") -> go.Figure:
    """Each run's checkpoint-period average loss against tokens seen (or ``x="step"``).

    ``runs`` maps run names to run directories, or is a :func:`gptlib.summary.collect_runs` table
    (runs without metrics are left out).
    """
    if x not in ("tokens", "step"):
        raise ValueError(f"x={x!r}: allowed: tokens, step")
    fig = go.Figure()
    _layout(fig, "Training loss by run", "checkpoint-period averages; log scale", "loss (cross-entropy)",
            "tokens seen" if x == "tokens" else "step")
    for name, run_dir in _run_dirs(runs).items():
        if not (run_dir / "config.yaml").is_file():
            continue
        data = load_run_data(run_dir)
        if not data.periods:
            continue
        tokens = {r["step"]: r["tokens"] for r in data.records}
        ends = [p["last_step"] for p in data.periods]
        xs = [tokens[s] if x == "tokens" else s + 1 for s in ends]
        avgs = [_nan(p["loss_avg"]) for p in data.periods]
        fig.add_scatter(x=xs, y=avgs, mode="lines", name=name,
                        hovertemplate=f"{name}<br>%{{x:,}}<br>loss %{{y:.4f}}<extra></extra>")
    if not fig.data:
        return _empty(fig, "no runs with metrics yet")
    fig.update_yaxes(type="log")
    return fig


VERDICT_COLORS = {"better": "rgb(44, 160, 44)", "worse": "rgb(214, 39, 40)",
                  "within noise": "rgb(150, 150, 150)", UNKNOWN: "rgb(205, 205, 205)"}


def results_chart(table: pd.DataFrame) -> go.Figure:
    """Each intervention's mean test-loss difference from the baseline's seeds (negative =
    better), coloured by its verdict, with its 95% interval where there is one, the ±1 baseline-SD
    band, and the series' published difference as a marker. A bar far beyond the others is cut
    at the axis and labelled with its value, so the small ones stay readable."""
    from gptlib.summary import SERIES_SCALE, noise_table, reference_results

    noise = noise_table(table)
    rows = noise[(noise["intervention"] != "baseline") & noise["delta"].notna()]
    fig = go.Figure()
    _layout(fig, "Test loss vs baseline", "mean over seeds − baseline mean; negative = better; "
            "colour = verdict (gptlib.verdicts)", "Δ test loss", "")
    if rows.empty:
        return _empty(fig, "no evaluated run and baseline yet")
    rows = rows.sort_values("delta")
    names, deltas = rows["intervention"].tolist(), rows["delta"].astype(float).tolist()
    lows = [d - lo if lo is not None and not pd.isna(lo) else None
            for d, lo in zip(deltas, rows["ci_low"], strict=True)]
    highs = [hi - d if hi is not None and not pd.isna(hi) else None
             for d, hi in zip(deltas, rows["ci_high"], strict=True)]
    verdicts = rows["verdict"].tolist()
    for verdict, color in VERDICT_COLORS.items():
        pick = [i for i, v in enumerate(verdicts) if v == verdict]
        if not pick:
            continue
        fig.add_bar(
            x=[names[i] for i in pick], y=[deltas[i] for i in pick], name=verdict,
            marker={"color": color, "line": {"color": "rgb(90, 90, 90)", "width": 1}},
            error_y={"type": "data", "symmetric": False, "array": [highs[i] or 0 for i in pick],
                     "arrayminus": [lows[i] or 0 for i in pick], "color": "rgb(60, 60, 60)"},
            text=[f"{verdict} ({rows['n'].iloc[i]} seed{'s' if rows['n'].iloc[i] != 1 else ''})"
                  for i in pick], textposition="outside",
            customdata=[[rows["n"].iloc[i], verdict] for i in pick],
            hovertemplate="%{x}<br>Δ %{y:+.4f}<br>%{customdata[0]} seed(s): %{customdata[1]}"
                          "<extra></extra>")
    published = reference_results(SERIES_SCALE).set_index("run")["improvement_vs_baseline"].dropna()
    series = [(n, -published[n]) for n in names if n in published]
    if series:
        fig.add_scatter(x=[n for n, _ in series], y=[d for _, d in series], mode="markers",
                        name="series Δ (8x A100)", marker={"symbol": "diamond", "size": 11,
                                                           "color": "black"},
                        hovertemplate="%{x}<br>published Δ %{y:+.4f}<extra></extra>")
    sd = noise.attrs.get("baseline_sd")
    if sd:
        fig.add_hrect(y0=-sd, y1=sd, fillcolor="rgb(255, 190, 60)", opacity=0.35, line_width=1,
                      line_color="rgb(200, 130, 0)", layer="below",
                      annotation_text=f"±1 SD of the baseline's seeds ({sd_text(sd)})",
                      annotation_position="top left")
    _cut_outliers(fig, names, deltas, [*(abs(v) for v in (lows + highs) if v), sd or 0])
    fig.update_layout(barmode="overlay", xaxis={"categoryorder": "array", "categoryarray": names})
    return fig


def _cut_outliers(fig: go.Figure, names: list[str], deltas: list[float], spreads: list[float]) -> None:
    """Limit the y axis when one bar is over 4x the next largest, and label the bars it cuts."""
    sizes = sorted((abs(d) for d in deltas), reverse=True)
    if len(sizes) < 3 or sizes[0] <= 4 * sizes[1]:
        return
    limit = 1.6 * max(sizes[1], *spreads)
    fig.update_yaxes(range=[-limit, limit])
    for name, delta in zip(names, deltas, strict=True):
        if abs(delta) > limit:
            fig.add_annotation(x=name, y=math.copysign(0.92 * limit, delta), showarrow=False,
                               text=f"<b>{delta:+.3f}</b> (off the axis)", bgcolor="white")


def loss_charts(runs: Mapping[str, str | Path] | pd.DataFrame, spiked_only: bool = False) -> list[go.Figure]:
    """:func:`loss_chart` of every run that has metrics (e.g. the rows of a runs table); with
    ``spiked_only``, of those whose spikes.json records a spike."""
    return [loss_chart(d) for d in _run_dirs(runs).values()
            if (d / "config.yaml").is_file() and (d / "metrics.jsonl").is_file()
            and (not spiked_only or read_spikes(d))]


def save_run_charts(run_dir: str | Path) -> list[Path]:
    """Write ``charts/{loss,grad_norm,lr}.html`` into the run directory (offline: plotly.js is
    written once beside them as ``charts/plotly.min.js``); returns the paths."""
    data = load_run_data(run_dir)
    out = Path(run_dir) / "charts"
    out.mkdir(exist_ok=True)
    paths = []
    for name, chart in zip(RUN_CHARTS, (loss_chart, grad_norm_chart, lr_chart), strict=True):
        path = out / f"{name}.html"
        chart(data).write_html(path, include_plotlyjs="directory", include_mathjax=False)
        paths.append(path)
    return paths
