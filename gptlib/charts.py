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
        periods=periods(records, cfg.train.checkpoint_interval),
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


def _zoom(lows: list[float], highs: list[float]) -> list[float] | None:
    """A y range that leaves out the first period's (initial, very high) losses."""
    lows = [v for v in lows if v is not None and math.isfinite(v)]
    highs = [v for v in highs if v is not None and math.isfinite(v)]
    if not lows or not highs:
        return None
    lo, hi = min(lows), max(highs)
    pad = 0.05 * (hi - lo) or 0.05
    return [lo - pad, hi + pad]


def loss_chart(run: str | Path | RunData) -> go.Figure:
    """Per-step training loss (faint), each checkpoint period's min–max band and average, the
    best checkpoint and the detected loss spikes."""
    data = _data(run)
    fig = go.Figure()
    subtitle = (
        f"band = min–max of each {data.cfg.train.checkpoint_interval}-step checkpoint period; "
        "x = optimizer steps"
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
    if len(data.periods) >= 3:  # the first period holds the initial ~10.8 loss: zoom past it
        rest = data.periods[1:]
        zoom = _zoom([p["loss_min"] for p in rest], [p["loss_max"] for p in rest])
        if zoom:
            fig.update_yaxes(range=zoom)
            fig.update_layout(title_subtitle_text=subtitle + "; first period off-scale "
                              "(double-click to see all)")
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
    _layout(fig, "Training loss by run", "checkpoint-period averages", "loss (cross-entropy)",
            "tokens seen" if x == "tokens" else "step")
    lows: list[float] = []
    highs: list[float] = []
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
        lows += avgs[1:]
        highs += avgs[1:]
    if not fig.data:
        return _empty(fig, "no runs with metrics yet")
    zoom = _zoom(lows, highs)
    if zoom:
        fig.update_yaxes(range=zoom)
    return fig


def results_chart(table: pd.DataFrame) -> go.Figure:
    """Test loss difference from the baseline per run (negative = better), with the published
    reference difference beside it when the table has ``reference_delta``."""
    done = table[table["test_loss"].notna()]
    fig = go.Figure()
    _layout(fig, "Test loss vs baseline", "test loss − baseline test loss; negative = better",
            "Δ test loss", "")
    if done.empty or done["delta_vs_baseline"].isna().all():
        return _empty(fig, "no evaluated run and baseline yet")
    fig.add_bar(x=done["run"], y=done["delta_vs_baseline"], name="this workbook",
                customdata=done["test_loss"],
                hovertemplate="%{x}<br>Δ %{y:+.6f}<br>test loss %{customdata:.6f}<extra></extra>")
    if "reference_delta" in done and done["reference_delta"].notna().any():
        fig.add_bar(x=done["run"], y=done["reference_delta"], name="published (Giles Thomas)",
                    hovertemplate="%{x}<br>published Δ %{y:+.6f}<extra></extra>")
    sd = done["baseline_sd"].dropna()
    if len(sd):
        fig.add_hrect(y0=-sd.iloc[0], y1=sd.iloc[0], fillcolor="grey", opacity=0.15, line_width=0,
                      annotation_text="±1 SD of baseline seeds", annotation_position="top left")
    fig.update_layout(barmode="group")
    return fig



def loss_charts(runs: Mapping[str, str | Path] | pd.DataFrame) -> list[go.Figure]:
    """:func:`loss_chart` of every run that has metrics (e.g. the rows of a runs table)."""
    return [loss_chart(d) for d in _run_dirs(runs).values()
            if (d / "config.yaml").is_file() and (d / "metrics.jsonl").is_file()]


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
