"""What the notebooks display: setup, in-place training progress, figures and the run report.

Figures survive in the saved notebook and offline: :func:`show` displays each figure as a bundle
of the Plotly JSON mimetype (JupyterLab and VS Code render it, trusted or not) and HTML without
plotly.js; plotly.js itself is embedded inline once per notebook, as its own HTML output, by
:func:`setup_notebook` (``jupyter nbconvert --to html`` keeps it, so the page works offline).
Nothing is loaded from a CDN. ``setup_notebook`` also makes this the default Plotly renderer, so a
bare ``fig`` or ``fig.show()`` in a cell behaves the same.

Errors a user can fix (bad config, missing data or checkpoint, failed training) show as one line
in a notebook instead of a long traceback; the cell still fails, so papermill exits non-zero.
"""

from __future__ import annotations

import html
import re
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer, PlotlyRenderer
from plotly.offline import get_plotlyjs

from gptlib.charts import grad_norm_chart, loss_chart, lr_chart, save_run_charts
from gptlib.checkpoint import CheckpointError
from gptlib.config import ConfigError, RunConfig
from gptlib.data import DataError
from gptlib.display import in_kernel
from gptlib.evals import reference_line
from gptlib.launch import LaunchError, launch
from gptlib.paths import short_path
from gptlib.rundir import end_of_run_lines, read_summary
from gptlib.verdicts import loss_text, sd_text

__all__ = [
    "NOTEBOOK_ERRORS",
    "setup_notebook",
    "show",
    "figure_bundle",
    "Progress",
    "train",
    "show_config",
    "show_evaluation",
    "show_end_of_run",
    "save_charts",
    "render_report",
]

NOTEBOOK_ERRORS = (ConfigError, DataError, CheckpointError, LaunchError)
PLOTLY_MIME = "application/vnd.plotly.v1+json"
RENDERER = "gptlib"
_STEP_LINE = re.compile(r"step ([\d,]+)/([\d,]+) \|")
_state = {"plotlyjs_shown": False}


# ------------------------------------------------------------------------------ display basics


def _display(bundle: dict[str, Any], display_id: str | bool | None = None) -> Any:
    """Display a raw mime bundle in a notebook, or print its text elsewhere."""
    if not in_kernel():
        print(bundle.get("text/plain", ""))
        return None
    from IPython.display import display

    return display(bundle, raw=True, display_id=display_id)


def _text(plain: str, html_text: str | None = None) -> None:
    bundle = {"text/plain": plain}
    if html_text is not None:
        bundle["text/html"] = html_text
    _display(bundle)


def _one_line_traceback(error: BaseException) -> list[str]:
    return [f"{type(error).__name__}: {error}"]


def _embed_plotlyjs(again: bool = False) -> None:
    """Display plotly.js inline as an HTML output (once per kernel unless ``again``)."""
    if (_state["plotlyjs_shown"] and not again) or not in_kernel():
        return
    script = ("<script type=\"text/javascript\">window.PlotlyConfig = {MathJaxConfig: 'local'};"
              f"</script>\n<script type=\"text/javascript\">{get_plotlyjs()}</script>")
    _display({"text/html": script, "text/plain": "(plotly.js embedded for offline figures)"})
    _state["plotlyjs_shown"] = True


class InlineRenderer(MimetypeRenderer):
    """Plotly renderer: the Plotly JSON mimetype plus HTML that uses the embedded plotly.js."""

    def activate(self) -> None:
        _embed_plotlyjs()

    def to_mimebundle(self, fig_dict: dict) -> dict[str, Any]:
        bundle = PlotlyRenderer().to_mimebundle(dict(fig_dict))
        bundle["text/html"] = pio.to_html(
            fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
            default_width="100%", default_height=480, validate=False,
        )
        title = (fig_dict.get("layout", {}).get("title") or {}).get("text", "")
        bundle["text/plain"] = f"<Plotly figure: {title}>"
        return bundle


def setup_notebook() -> None:
    """Call first in a notebook: embeds plotly.js (again, if the cell is re-run), makes
    :class:`InlineRenderer` Plotly's default renderer and shortens user errors to one line."""
    for cls in NOTEBOOK_ERRORS:  # IPython shows _render_traceback_() instead of a traceback
        cls._render_traceback_ = _one_line_traceback  # type: ignore[attr-defined]
    pio.renderers[RENDERER] = InlineRenderer()
    pio.renderers.default = RENDERER
    _embed_plotlyjs(again=True)


def figure_bundle(fig: go.Figure) -> dict[str, Any]:
    """The mime bundle :func:`show` displays for ``fig``."""
    return InlineRenderer().to_mimebundle(fig.to_dict())


def show(fig: go.Figure) -> None:
    """Display a figure so that it survives saving, nbconvert and offline viewing."""
    if not in_kernel():
        print(f"<Plotly figure: {fig.layout.title.text}>")
        return
    _embed_plotlyjs()
    _display(figure_bundle(fig))


# ------------------------------------------------------------------------------ progress


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = round(width * done / total) if total else 0
    return f"[{'█' * filled}{'·' * (width - filled)}] {100 * done / max(total, 1):3.0f}%"


class Progress:
    """Training output as ONE display, updated in place: the lines before training, a progress
    bar with the latest step line, the latest checkpoint line, then the lines after (the
    end-of-run lines); `gptlib.launch` passes on no line of torchrun's own failure report. Every
    checkpoint line and the step line at each tenth
    of the run are also printed, so ``papermill --log-output`` shows progress in the terminal.
    Outside a notebook every line is printed as it comes.

    Use as ``on_line`` callback of :func:`gptlib.launch.launch`, in a ``with`` block.
    """

    def __init__(self, min_interval_s: float = 1.0, keep: int = 40) -> None:
        self.min_interval_s = min_interval_s
        self.head: list[str] = []
        self.step_line: str | None = None
        self.checkpoint_line: str | None = None
        self.tail: deque[str] = deque(maxlen=keep)
        self.keep = keep
        self._last_update = 0.0
        self._tenth = 0
        self._handle = _display({"text/plain": "starting ..."}, display_id=True) \
            if in_kernel() else None

    def text(self) -> str:
        """What the display shows now."""
        lines = list(self.head)
        if self.step_line is not None:
            match = _STEP_LINE.match(self.step_line)
            done, total = (int(g.replace(",", "")) for g in match.groups()) if match else (0, 0)
            lines.append(f"{_bar(done, total)}  {self.step_line}" if match else self.step_line)
        if self.checkpoint_line is not None:
            lines.append(self.checkpoint_line)
        return "\n".join([*lines, *self.tail])

    def update(self, line: str) -> None:
        """Take one output line of the training run."""
        if self._handle is None:
            print(line, flush=True)
            return
        step = _STEP_LINE.match(line)
        routine = bool(step)
        if step:
            self.step_line = line
            self._log_tenth(*(int(g.replace(",", "")) for g in step.groups()), line)
        elif line.startswith("checkpoint step-"):
            self.checkpoint_line = line
            print(line, flush=True)
        elif self.step_line is None and self.checkpoint_line is None and len(self.head) < self.keep:
            self.head.append(line)
        else:
            self.tail.append(line)
        if not routine or time.monotonic() - self._last_update >= self.min_interval_s:
            self.refresh()

    def _log_tenth(self, done: int, total: int, line: str) -> None:
        """Also print the step line at each tenth of the run, as a plain stream line: the display
        updates in place, which ``papermill --log-output`` cannot show in a terminal."""
        tenth = 10 * done // max(total, 1)
        if tenth > self._tenth:
            self._tenth = tenth
            print(line, flush=True)

    def refresh(self) -> None:
        """Redraw the display now."""
        if self._handle is not None:
            self._handle.update({"text/plain": self.text()}, raw=True)
            self._last_update = time.monotonic()

    def __call__(self, line: str) -> None:
        self.update(line)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.refresh()


# ------------------------------------------------------------------------------ the run


def train(run_dir: str | Path, nproc: int, resume: str | None = None,
          on_line: Callable[[str], None] | None = None) -> dict:
    """Launch a prepared run with an in-place :class:`Progress` display; returns summary.json."""
    if on_line is not None:
        return launch(run_dir, nproc, resume, on_line)
    with Progress() as progress:
        return launch(run_dir, nproc, resume, progress.update)


def show_config(cfg: RunConfig, run_dir: str | Path, nproc: int) -> None:
    """Where the run goes and what it changes from its scale's baseline (the whole resolved
    configuration is the run's config.yaml)."""
    from gptlib.device import pick_device
    from gptlib.presets import baseline_changes

    head = f"Run {cfg.scale}/{cfg.run_name} -> {short_path(Path(run_dir))} ({nproc} process(es))"
    changes = baseline_changes(cfg, pick_device(cfg.train.device).type)
    full = f"The whole configuration: {short_path(Path(run_dir) / 'config.yaml')}."
    if changes is None:
        plain = rich = f"Scale {cfg.scale} is not a preset here, so there is no baseline to compare. {full}"
    elif not changes:
        plain = rich = f"No changes: this is the {cfg.scale} baseline configuration. {full}"
    else:
        plain = "\n".join([f"Changes from the {cfg.scale} baseline:",
                           *(f"  {key}: {before!r} -> {after!r}" for key, before, after in changes), full])
        rows = "".join(f"| `{key}` | `{before!r}` | `{after!r}` |\n" for key, before, after in changes)
        rich = (f"Changes from the `{cfg.scale}` baseline:\n\n"
                f"| setting | baseline | this run |\n|---|---|---|\n{rows}\n{full}")
    _display({"text/plain": f"{head}\n{plain}", "text/markdown": f"**{head}**\n\n{rich}\n"})


def _baseline_line(run_dir: Path) -> str:
    """This run against the baseline's seeds, in the words every page uses (gptlib.verdicts)."""
    from gptlib.summary import run_comparison

    group, comparison = run_comparison(run_dir)
    if group == "baseline":
        return (f"This is a baseline run of scale {run_dir.parent.name}: one sample of the "
                "baseline's seed noise, compared with nothing.")
    if comparison is None or comparison.delta is None:
        return (f"No evaluated baseline beside it in {short_path(run_dir.parent)}: train the baseline "
                "of this scale to compare.")
    base = (f"Baseline: mean {loss_text(comparison.baseline_mean)} over {comparison.n_baseline} "
            f"seed(s)" + (f", SD {sd_text(comparison.baseline_sd)}" if comparison.baseline_sd else ""))
    return f"{base}. {comparison.line(group)}"


def show_evaluation(run_dir: str | Path) -> None:
    """Smoke-test text, test loss and its difference from the scale's baseline run
    (all read from summary.json files)."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    if "test_loss" not in summary:
        _text(f"{short_path(run_dir)} is not evaluated yet: gptlib eval {short_path(run_dir)}")
        return
    checkpoint = summary.get("eval_checkpoint", "?")
    loss = f"Test loss: {summary['test_loss']:.4f} (checkpoint {checkpoint})"
    references = (reference_line(summary["test_loss"], summary["unigram_loss"],
                                 summary["uniform_loss"])
                  if summary.get("unigram_loss") is not None else "")
    compare = _baseline_line(run_dir)
    others = [f"{key}: {value['test_loss']:.4f}" for key, value in summary.get("evaluations", {}).items()
              if value.get("test_loss") != summary["test_loss"]]
    if others:
        compare += " Also evaluated (not the run's result): " + "; ".join(others) + "."
    smoke = summary.get("smoke_text", "")
    plain = f"Smoke test: {smoke}\n\n{loss}\n{references}\n{compare}"
    rich = (f"<p><b>Smoke test</b> (checkpoint {html.escape(checkpoint)}):</p>"
            f"<pre style=\"white-space: pre-wrap\">{html.escape(smoke)}</pre>"
            f"<p><b>{html.escape(loss)}</b><br>{html.escape(references)}<br>"
            f"{html.escape(compare)}</p>")
    _text(plain, rich)


def show_end_of_run(run_dir: str | Path) -> None:
    """The series' end-of-run lines (from summary.json), or the run's status if it did not end."""
    summary = read_summary(run_dir)
    if summary.get("status") != "completed":
        _text(f"Run status: {summary.get('status', 'unknown')} {summary.get('error', '')}".strip())
        return
    lines = end_of_run_lines(summary)
    if summary.get("best_step") is not None:
        lines.append(f"Best checkpoint: step-{summary['best_step']}")
    lines.append(f"Loss spikes: {summary.get('spike_count', 0)}, skipped steps: "
                 f"{summary.get('skipped_steps', 0)}")
    if summary.get("mfu") is not None:
        lines.append(f"MFU: {100 * summary['mfu']:.1f}%")
    _text("\n".join(lines))


def save_charts(run_dir: str | Path) -> list[Path]:
    """Write the run's chart files (charts/*.html, offline) and say where they are."""
    paths = save_run_charts(run_dir)
    _text("Charts saved: " + ", ".join(short_path(p) for p in paths))
    return paths


def render_report(run_dir: str | Path) -> None:
    """The whole report of a run directory: loss, gradient-norm and LR charts, smoke test and
    test loss vs baseline, end-of-run lines; also saves the chart files."""
    for chart in (loss_chart, grad_norm_chart, lr_chart):
        show(chart(run_dir))
    show_evaluation(run_dir)
    show_end_of_run(run_dir)
    save_charts(run_dir)

