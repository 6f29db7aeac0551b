"""Comparing runs: one table row per run directory of a scale, plus the published reference results.

:func:`collect_runs` reads only the files in ``outputs/<scale>/<run>/`` (``summary.json``,
``config.yaml``, ``metrics.jsonl`` and, for a run that never started training, the rendered
``train.ipynb``), so runs that failed or are still running appear with their status rather than
being dropped. Deltas are against the baseline run of the same seed (else the seed-42 baseline);
"negative = better". The published numbers of Giles Thomas's series live in
``gptlib/reference_results.csv``.
"""

from __future__ import annotations

import datetime
import importlib.resources
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

from gptlib.metrics import read_metrics
from gptlib.paths import OUTPUTS_DIR

__all__ = ["COLUMNS", "read_summary", "run_status", "find_runs", "collect_runs",
           "reference_results", "reference_table", "table"]

COLUMNS = [
    "run", "status", "test_loss", "delta_vs_baseline", "delta_sd", "baseline_sd", "wall_time_s",
    "tokens_per_s", "final_train_loss", "spike_count", "best_step", "tokens_seen", "seed",
    "interventions", "eval_checkpoint", "error", "run_dir",
]
RUN_MARKERS = ("summary.json", "config.yaml", "train.ipynb")


def read_summary(run_dir: str | Path) -> dict:
    """A run's summary.json ({} when it has none or it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _notebook_error(path: Path) -> str | None:
    """The error a papermill-rendered notebook stopped on ("" if it failed without one), or None."""
    try:
        nb = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not nb.get("metadata", {}).get("papermill", {}).get("exception"):
        return None
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"{out.get('ename')}: {out.get('evalue')}"
    return ""


def _read_config(run_dir: Path) -> dict:
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def run_status(run_dir: str | Path, summary: dict | None = None) -> tuple[str, str]:
    """(status, error) of a run directory: completed, completed (not evaluated),
    running (step n/N), failed, failed before training, starting, not started or not run."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir) if summary is None else summary
    status = summary.get("status")
    error = str(summary.get("error") or "").split("\n")[0]
    if status == "completed":
        return ("completed" if "test_loss" in summary else "completed (not evaluated)"), error
    if status == "running":
        records = read_metrics(run_dir / "metrics.jsonl")
        return f"running (step {len(records):,}/{summary.get('total_steps', 0):,})", error
    if status:
        return str(status), error
    notebook_error = _notebook_error(run_dir / "train.ipynb")
    if notebook_error is not None:
        return "failed before training", notebook_error.split("\n")[0]
    if (run_dir / "train.ipynb").exists():
        return "starting", ""
    if (run_dir / "config.yaml").exists():
        return "not started", ""
    return "not run", ""


def find_runs(outputs_dir: str | Path | None, scale: str) -> list[Path]:
    """Run directories of a scale (any folder with a summary, config or rendered notebook),
    the baseline first, then by name."""
    base = Path(outputs_dir or OUTPUTS_DIR) / scale
    if not base.is_dir():
        return []
    dirs = [d for d in base.iterdir()
            if d.is_dir() and any((d / name).exists() for name in RUN_MARKERS)]
    return sorted(dirs, key=lambda d: (d.name != "baseline", d.name))


def _row(run_dir: Path) -> dict:
    summary = read_summary(run_dir)
    config = _read_config(run_dir)
    train = config.get("train") or {}
    status, error = run_status(run_dir, summary)
    return {
        "run": run_dir.name,
        "status": status,
        "test_loss": summary.get("test_loss"),
        "wall_time_s": summary.get("wall_time_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "final_train_loss": summary.get("final_train_loss"),
        "spike_count": summary.get("spike_count"),
        "best_step": summary.get("best_step"),
        "tokens_seen": summary.get("tokens_seen"),
        "seed": (train.get("random_seed"), train.get("training_seed")) if train else None,
        "interventions": config.get("interventions") if config else None,
        "eval_checkpoint": summary.get("eval_checkpoint"),
        "error": error,
        "run_dir": str(run_dir),
    }


def _add_deltas(df: pd.DataFrame, reference_sd: float | None) -> pd.DataFrame:
    """delta_vs_baseline (vs the same-seed baseline, else the seed-42 one), baseline_sd, delta_sd."""
    is_base = df["interventions"].apply(lambda v: v == [])
    bases = df[is_base & df["test_loss"].notna()].sort_values("run", key=lambda r: r != "baseline")
    bases = bases.drop_duplicates("seed")  # one result per seed; "baseline" wins a tie
    by_seed = dict(zip(bases["seed"], bases["test_loss"], strict=True))
    default = bases.loc[bases["run"] == "baseline", "test_loss"]
    fallback = default.iloc[0] if len(default) else None
    sd = statistics.stdev(bases["test_loss"]) if len(bases) >= 2 else reference_sd
    df["delta_vs_baseline"] = [
        (loss - by_seed.get(seed, fallback)) if loss is not None and not math.isnan(loss)
        and by_seed.get(seed, fallback) is not None else None
        for loss, seed in zip(df["test_loss"], df["seed"], strict=True)
    ]
    df["delta_vs_baseline"] = df["delta_vs_baseline"].astype(float)
    df["baseline_sd"] = sd
    df["delta_sd"] = df["delta_vs_baseline"] / sd if sd else math.nan
    df.attrs["noise"] = (
        f"baseline SD {sd:.6f} from {len(bases)} baseline seeds" if len(bases) >= 2
        else f"baseline SD {sd:.4f}: the published one (fewer than 2 baseline seeds here)"
        if sd else "baseline SD unknown: train the baseline with more seeds (--seeds 42,43,44)"
    )
    return df


def collect_runs(
    outputs_dir: str | Path | None = None, scale: str = "tiny", runs: str | Sequence[str] = "all"
) -> pd.DataFrame:
    """One row per run of ``outputs/<scale>/`` (``runs``: "all", a list of run names or "a,b"; a
    listed run without a directory shows as "not run"), with the published results of the scale
    (``reference_test_loss``, ``reference_delta``) when there are any."""
    base = Path(outputs_dir or OUTPUTS_DIR) / scale
    if isinstance(runs, str) and runs != "all":
        runs = [name.strip() for name in runs.split(",") if name.strip()]
    dirs = find_runs(outputs_dir, scale) if runs == "all" else [base / name for name in runs]
    df = pd.DataFrame([_row(d) for d in dirs], columns=COLUMNS)
    df["test_loss"] = df["test_loss"].astype(float)
    reference = reference_results(scale)
    seed_sd = reference["seed_sd"].dropna()
    df = _add_deltas(df, float(seed_sd.iloc[0]) if len(seed_sd) else None)
    if not reference.empty:
        ref = reference.set_index("run")
        df["reference_test_loss"] = df["run"].map(ref["test_loss"])
        df["reference_delta"] = 0.0 - df["run"].map(ref["improvement_vs_baseline"])
    return df[[c for c in [*COLUMNS, "reference_test_loss", "reference_delta"] if c in df]]


def reference_results(scale: str | None = None) -> pd.DataFrame:
    """The published results of Giles Thomas's series (with a ``source`` column), for one scale
    or all of them."""
    path = importlib.resources.files("gptlib") / "reference_results.csv"
    with path.open() as f:
        df = pd.read_csv(f)
    return df if scale is None else df[df["scale"] == scale].reset_index(drop=True)


def reference_table(scale: str) -> pd.DataFrame:
    """The published results to show beside a scale's runs: that scale's, or (for a scale the
    series did not run, e.g. tiny) all of them, with a note printed."""
    df = reference_results(scale)
    if df.empty:
        print(f"The series has no results for scale {scale!r}; these are its full-scale results "
              "(GPT-2 small on FineWeb), so only the direction of each change compares.")
        df = reference_results()
    columns = ["scale", "run", "change", "test_loss", "improvement_vs_baseline", "note", "source"]
    return df[columns].set_index(["scale", "run"])


def _fmt(value: object, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def _duration(seconds: object) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    return str(datetime.timedelta(seconds=round(float(seconds))))  # type: ignore[arg-type]


def table(df: pd.DataFrame) -> pd.DataFrame:
    """The runs table formatted for reading (strings; losses to 6 decimals)."""
    out = pd.DataFrame({
        "run": df["run"],
        "status": df["status"],
        "test loss": [_fmt(v, ".6f") for v in df["test_loss"]],
        "Δ vs baseline": [_fmt(v, "+.6f") for v in df["delta_vs_baseline"]],
        "Δ / baseline SD": [_fmt(v, "+.2f") for v in df["delta_sd"]],
        "time": [_duration(v) for v in df["wall_time_s"]],
        "tokens/s": [_fmt(v, ",.0f") for v in df["tokens_per_s"]],
        "final train loss": [_fmt(v, ".3f") for v in df["final_train_loss"]],
        "spikes": [_fmt(v if v is None else float(v), ".0f") for v in df["spike_count"]],
    })
    if "reference_test_loss" in df:
        out["published test loss"] = [_fmt(v, ".6f") for v in df["reference_test_loss"]]
        out["published Δ"] = [_fmt(v, "+.6f") for v in df["reference_delta"]]
    out["error"] = df["error"]
    return out.set_index("run")
