"""Comparing runs: one table row per run directory of a scale, plus the published reference results.

:func:`collect_runs` reads only the files in ``outputs/<scale>/<run>/`` (``summary.json``,
``config.yaml``, ``metrics.jsonl`` and, for a run that never started training, the rendered
``train.ipynb``), so runs that failed or are still running appear with their status rather than
being dropped. Every difference from the baseline, and its verdict, comes from
:func:`gptlib.verdicts.compare`: a run's delta is its test loss minus the mean of the baseline's
evaluated seeds, and its verdict is its intervention's over all their seeds ("negative = better").
The published numbers of Giles Thomas's series live in ``gptlib/reference_results.csv``.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

from gptlib.config import ConfigError, closest_first
from gptlib.display import format_duration
from gptlib.lifeline import RUN_LOCK, WRITER_LOCK, is_locked
from gptlib.metrics import read_metrics
from gptlib.paths import OUTPUTS_DIR, short_path
from gptlib.rundir import read_summary
from gptlib.verdicts import MIN_SEEDS, UNKNOWN, Comparison, compare, delta_text, loss_text, sd_text

__all__ = ["COLUMNS", "read_summary", "run_status", "find_runs", "collect_runs",
           "reference_results", "reference_table", "table", "noise_table", "noise_view",
           "series_comparison"]

COLUMNS = [
    "run", "status", "test_loss", "delta_vs_baseline", "delta_sd", "baseline_sd", "verdict",
    "wall_time_s", "tokens_per_s", "final_train_loss", "spike_count", "best_step", "tokens_seen",
    "seed", "interventions", "eval_checkpoint", "error", "run_dir",
]
RUN_MARKERS = ("summary.json", "config.yaml", "train.ipynb")


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
    if status == "running" and not any(is_locked(run_dir / name) for name in (RUN_LOCK, WRITER_LOCK)):
        return "stopped", ("summary.json still reads running, but no process holds the run (killed, "
                           "or the disk was full): gptlib train ... --resume latest continues it")
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
    if status == "completed (not evaluated)" and not error:
        error = f"not evaluated: gptlib eval {short_path(run_dir)}"
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


def _group(interventions: object) -> str | None:
    if not isinstance(interventions, list):
        return None
    return "+".join(interventions) or "baseline"


def _add_deltas(df: pd.DataFrame) -> pd.DataFrame:
    """delta_vs_baseline (test loss - the baseline seeds' mean), baseline_sd, delta_sd and the
    verdict of the run's intervention over all its seeds (:func:`gptlib.verdicts.compare`)."""
    groups = df["interventions"].apply(_group)
    evaluated = df["test_loss"].notna() & groups.notna()
    baseline = df.loc[evaluated & (groups == "baseline"), "test_loss"].tolist()
    base_mean = statistics.fmean(baseline) if baseline else None
    sd = statistics.stdev(baseline) if len(baseline) >= MIN_SEEDS else None
    verdicts = {group: compare(losses.tolist(), baseline).verdict
                for group, losses in df.loc[evaluated].groupby(groups[evaluated])["test_loss"]
                if group != "baseline"}
    is_base = groups == "baseline"
    df["delta_vs_baseline"] = [
        loss - base_mean if base_mean is not None and not base and not math.isnan(loss) else math.nan
        for loss, base in zip(df["test_loss"], is_base, strict=True)]
    df["baseline_sd"] = math.nan if sd is None else sd
    df["delta_sd"] = df["delta_vs_baseline"] / sd if sd else math.nan
    df["verdict"] = ["baseline seed" if base else verdicts.get(group, "not evaluated" if group else "—")
                     for group, base in zip(groups, is_base, strict=True)]
    df.attrs["noise"] = _noise_note(df, baseline, sd)
    return df


def _noise_note(df: pd.DataFrame, baseline: list[float], sd: float | None) -> str:
    """How much the baseline's seeds say, and what would say more."""
    is_base = df["interventions"].apply(lambda v: v == [])
    waiting = df.loc[is_base & (df["status"] == "completed (not evaluated)"), "run_dir"].tolist()
    hint = "".join(f"; {Path(d).name} is not evaluated: gptlib eval {short_path(d)}" for d in waiting)
    if sd is not None:
        return (f"baseline: {len(baseline)} evaluated seeds, mean {loss_text(statistics.fmean(baseline))}, "
                f"SD {sd_text(sd)}{hint}")
    return (f"baseline SD unknown: {len(baseline)} evaluated baseline seed(s), a verdict needs "
            f">= {MIN_SEEDS} (gptlib sweep --interventions baseline --seeds 42,43,44){hint}")


def collect_runs(
    outputs_dir: str | Path | None = None, scale: str = "tiny", runs: str | Sequence[str] = "all"
) -> pd.DataFrame:
    """One row per run of ``outputs/<scale>/`` (``runs``: "all", a list of run names or "a,b"; a
    listed run without a directory shows as "not run"), with the published results of the scale
    (``reference_test_loss``, ``reference_delta``) when there are any."""
    if not isinstance(scale, str) or not scale.strip():
        raise ConfigError(f"scale={scale!r}: expected a scale name, e.g. tiny")
    if outputs_dir is not None and not isinstance(outputs_dir, str | os.PathLike):
        raise ConfigError(f"outputs_dir={outputs_dir!r}: expected a folder path as text, or None")
    if isinstance(runs, str) and runs != "all":
        runs = [name.strip() for name in runs.split(",") if name.strip()]
    if runs != "all" and (not isinstance(runs, list | tuple)
                          or not all(isinstance(name, str) for name in runs)):
        raise ConfigError(f"runs={runs!r}: expected \"all\" or a list of run names, "
                          "e.g. [\"baseline\", \"no-dropout\"]")
    base = Path(outputs_dir or OUTPUTS_DIR) / scale
    if outputs_dir is not None and not Path(outputs_dir).is_dir():
        raise ConfigError(f"outputs folder {outputs_dir} does not exist (outputs_dir: None is the "
                          f"repository's {short_path(OUTPUTS_DIR)})")
    _check_scale(base, scale)
    dirs = find_runs(outputs_dir, scale) if runs == "all" else [base / name for name in runs]
    df = pd.DataFrame([_row(d) for d in dirs], columns=COLUMNS)
    present = [d.name for d in find_runs(outputs_dir, scale)]
    for i, run_dir in enumerate(dirs):
        if df.at[i, "status"] == "not run" and present:
            df.at[i, "error"] = f"no run {run_dir.name!r} in {short_path(base)}; closest: " + \
                closest_first(run_dir.name, present).split(", ")[0]
    df["test_loss"] = df["test_loss"].astype(float)
    reference = reference_results(scale)
    df = _add_deltas(df)
    if not reference.empty:
        ref = reference.set_index("run")
        df["reference_test_loss"] = df["run"].map(ref["test_loss"])
        df["reference_delta"] = 0.0 - df["run"].map(ref["improvement_vs_baseline"])
    return df[[c for c in [*COLUMNS, "reference_test_loss", "reference_delta"] if c in df]]


def _check_scale(base: Path, scale: str) -> None:
    """A scale with no folder must at least be a preset (no runs yet); else name the closest."""
    from gptlib.presets import list_scales

    if base.is_dir() or scale in list_scales():
        return
    present = sorted(d.name for d in base.parent.iterdir() if d.is_dir()) if base.parent.is_dir() else []
    known = sorted({*present, *list_scales()})
    raise ConfigError(f"scale {scale!r}: no such scale and no folder {short_path(base)}; "
                      f"allowed: {closest_first(scale, known)}")


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
        print(f"The series has no results for scale {scale!r}; these are its 8x A100 results "
              "(GPT-2 small on FineWeb), so only the direction of each change compares.")
        df = reference_results(SERIES_SCALE)
    columns = ["scale", "run", "change", "test_loss", "improvement_vs_baseline", "note"]
    shown = readable(df[columns].rename(columns={"improvement_vs_baseline": "gain vs baseline"}))
    print(f"Source: {df['source'].iloc[0]}")
    return shown.set_index(["scale", "run"])


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    """Any table for reading: floats to 4 decimals (columns named sd / SD to 2 significant
    figures), missing values as "—"."""
    out = frame.copy()
    for column in out.columns:
        values = out[column]
        if values.dtype.kind == "f" or values.apply(lambda v: isinstance(v, float)).any():
            style = sd_text if str(column).lower() in ("sd", "baseline_sd") else loss_text
            out[column] = [style(v) if isinstance(v, (float, int)) and not isinstance(v, bool)
                           else ("—" if v is None else v) for v in values]
        else:
            out[column] = ["—" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                           for v in values]
    return out


def _fmt(value: object, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def table(df: pd.DataFrame) -> pd.DataFrame:
    """The runs table formatted for reading (strings; losses to 4 decimals, "—" where missing).
    Time and tokens/s depend on what else the machine ran at the time."""
    out = pd.DataFrame({
        "run": df["run"],
        "status": df["status"],
        "test loss": [loss_text(v) for v in df["test_loss"]],
        "Δ vs baseline mean": [delta_text(v) for v in df["delta_vs_baseline"]],
        "Δ / baseline SD": [_fmt(v, "+.1f") for v in df["delta_sd"]],
        "verdict (all seeds)": df["verdict"],
        "time*": [format_duration(v) for v in df["wall_time_s"]],
        "tokens/s*": [_fmt(v, ",.0f") for v in df["tokens_per_s"]],
        "final train loss": [_fmt(v, ".3f") for v in df["final_train_loss"]],
        "spikes": [_fmt(v if v is None else float(v), ".0f") for v in df["spike_count"]],
    })
    if "reference_test_loss" in df:
        out["published test loss"] = [loss_text(v) for v in df["reference_test_loss"]]
        out["published Δ"] = [delta_text(v) for v in df["reference_delta"]]
    out["error"] = df["error"].fillna("")
    return out.set_index("run")


# --------------------------------------------------------------------------------------------------
# Noise-aware comparison over seeds, and stacked interventions vs the sum of their parts

def _finished(df: pd.DataFrame) -> pd.DataFrame:
    done = df[df["test_loss"].notna()].copy()
    done["group"] = done["interventions"].apply(_group)
    return done[done["group"].notna()]


def published_seed_sd(scale: str) -> float | None:
    """The series' baseline seed SD for a full-scale preset (None for other scales): context for a
    reader, never a stand-in for this workbook's own seeds."""
    sd = reference_results(scale)["seed_sd"].dropna()
    return float(sd.iloc[0]) if len(sd) else None


NOISE_COLUMNS = ["intervention", "n", "mean", "sd", "delta", "delta_sd", "ci_low", "ci_high",
                 "within_noise", "verdict", "seeds_needed"]


def noise_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per intervention (runs grouped over seeds): :func:`gptlib.verdicts.compare` against the
    baseline's seeds -- n, mean test loss, sample SD, the difference of the means, that difference
    in baseline-seed SDs, Welch's 95% interval, the verdict and, where it is unknown, what to train.
    The baseline's row describes its seeds (no comparison with itself)."""
    done = _finished(df)
    base = done.loc[done["group"] == "baseline", "test_loss"].tolist()
    rows = []
    for group, losses in done.groupby("group", sort=False)["test_loss"]:
        c = compare(losses.tolist(), base if group != "baseline" else [])
        row = {"intervention": group, "n": c.n, "mean": c.mean, "sd": c.sd}
        if group == "baseline":
            row.update(delta=None, delta_sd=None, ci_low=None, ci_high=None, within_noise=None,
                       verdict="baseline", seeds_needed="")
        else:
            row.update(delta=c.delta, delta_sd=c.delta_sd, ci_low=c.ci_low, ci_high=c.ci_high,
                       within_noise=c.within_noise, verdict=c.verdict,
                       seeds_needed=c.seeds_needed(group))
        rows.append(row)
    table = pd.DataFrame(rows, columns=NOISE_COLUMNS)
    table.attrs["baseline_sd"] = statistics.stdev(base) if len(base) >= MIN_SEEDS else None
    table.attrs["baseline_n"] = len(base)
    return table


def run_comparison(run_dir: str | Path) -> tuple[str, Comparison | None]:
    """(intervention, its :func:`compare` against the baseline) for a run, over the evaluated
    seeds of the runs beside it (its scale's folder); None for a baseline run or no baseline."""
    run_dir = Path(run_dir)
    done = _finished(pd.DataFrame([_row(d) for d in find_runs(run_dir.parent.parent, run_dir.parent.name)],
                                  columns=COLUMNS))
    group = _group(_read_config(run_dir).get("interventions")) or run_dir.name
    losses = done.loc[done["group"] == group, "test_loss"].tolist()
    base = done.loc[done["group"] == "baseline", "test_loss"].tolist()
    if group == "baseline" or not losses:
        return group, None
    return group, compare(losses, base)


def noise_view(noise: pd.DataFrame) -> pd.DataFrame:
    """A :func:`noise_table` for reading: losses to 4 decimals, SDs to 2 significant figures."""
    return pd.DataFrame({
        "intervention": noise["intervention"],
        "seeds": noise["n"],
        "mean test loss": [loss_text(v) for v in noise["mean"]],
        "SD": [sd_text(v) for v in noise["sd"]],
        "Δ vs baseline": [delta_text(v) for v in noise["delta"]],
        "Δ / baseline SD": [_fmt(v, "+.1f") for v in noise["delta_sd"]],
        "95% interval": [f"[{delta_text(lo)}, {delta_text(hi)}]" if lo is not None and not pd.isna(lo)
                         else "—" for lo, hi in zip(noise["ci_low"], noise["ci_high"], strict=True)],
        "verdict": noise["verdict"],
        "to know more": noise["seeds_needed"],
    }).set_index("intervention")


SERIES_SCALE = "gpt2-small-8xa100"


def series_comparison(noise: pd.DataFrame) -> pd.DataFrame:
    """Each intervention of a :func:`noise_table` beside the series' published difference from its
    baseline (the 8x A100 runs; negative = better) and whether the two point the same way:
    `yes` / `no` where this scale's verdict is beyond noise, `within noise here`, or `no published
    figure`."""
    published = reference_results(SERIES_SCALE).set_index("run")["improvement_vs_baseline"].dropna()
    rows = []
    for row in noise.to_dict("records"):
        if row["intervention"] == "baseline":
            continue
        series = -published[row["intervention"]] if row["intervention"] in published else None
        found = row["verdict"]
        if found == UNKNOWN:
            same = "unknown here"
        elif series is None:
            same = "no published figure"
        elif found == "within noise":
            same = "within noise here"
        else:
            same = "yes" if (found == "better") == (series < 0) else "no"
        rows.append({"intervention": row["intervention"], "seeds": row["n"], "delta": row["delta"],
                     "ci_low": row["ci_low"], "ci_high": row["ci_high"], "verdict": found,
                     "series_delta": series, "same_direction": same})
    return pd.DataFrame(rows, columns=["intervention", "seeds", "delta", "ci_low", "ci_high", "verdict",
                                       "series_delta", "same_direction"])


def seed_noise(df: pd.DataFrame) -> pd.DataFrame:
    """The baseline's run-to-run spread, split where runs allow it: over `random_seed` (everything
    changes), over the initialisation alone (random_seed varies, training_seed fixed) and over
    data order/dropout alone (training_seed varies, random_seed fixed)."""
    done = _finished(df)
    base = done[done["group"] == "baseline"]
    seeds = [s if isinstance(s, (tuple, list)) else (s, None) for s in base["seed"]]
    losses = base["test_loss"].tolist()
    rows = []

    def add(source: str, values: list[float]) -> None:
        if len(values) >= 2:
            rows.append({"source": source, "n": len(values), "sd": statistics.stdev(values),
                         "range": max(values) - min(values)})

    add("random_seed (initialisation + data order + dropout)",
        [loss for (_, training), loss in zip(seeds, losses, strict=True) if training is None])
    for fixed in sorted({t for _, t in seeds if t is not None}):
        add(f"initialisation only (training_seed {fixed}, random_seed varies)",
            [loss for (_, t), loss in zip(seeds, losses, strict=True) if t == fixed])
    for fixed in sorted({r for r, t in seeds if t is not None}):
        add(f"data order + dropout only (random_seed {fixed}, training_seed varies)",
            [loss for (r, t), loss in zip(seeds, losses, strict=True) if r == fixed and t is not None])
    return pd.DataFrame(rows, columns=["source", "n", "sd", "range"])


def _delta_items(scale: str, group: str) -> frozenset:
    """The config changes an intervention (or `+` combination) makes to the scale's baseline."""
    from gptlib.config import config_changes
    from gptlib.presets import resolve_config

    changes = config_changes(resolve_config(scale), resolve_config(scale, group))
    return frozenset((key, repr(new)) for key, _, new in changes if key != "interventions")


def stacking_table(df: pd.DataFrame, scale: str) -> pd.DataFrame:
    """For each run whose changes are exactly the union of other runs' changes (stacked-1 =
    gradient-clipping + no-dropout + weight-decay-gpt2 + learning-rate-schedule, or any a+b),
    its measured gain over the baseline beside the sum of its parts' gains (gain = baseline mean
    - mean, positive = better). Parts are the largest such runs present."""
    noise = noise_table(df).set_index("intervention")
    groups = [g for g in noise.index if g != "baseline" and noise.loc[g, "delta"] is not None
              and not math.isnan(noise.loc[g, "delta"])]
    deltas = {}
    for group in groups:
        try:
            deltas[group] = _delta_items(scale, group)
        except ValueError:  # an intervention file that no longer exists
            continue
    rows = []
    for group, changes in deltas.items():
        inside = [g for g, c in deltas.items() if g != group and c and c < changes]
        parts = [g for g in inside if not any(deltas[g] < deltas[o] for o in inside)]
        disjoint = sum(len(deltas[p]) for p in parts) == len(changes)
        if len(parts) < 2 or not disjoint or frozenset().union(*(deltas[p] for p in parts)) != changes:
            continue
        gain = -noise.loc[group, "delta"]
        parts_gain = sum(-noise.loc[p, "delta"] for p in parts)
        rows.append({"run": group, "parts": " + ".join(sorted(parts)), "measured_gain": gain,
                     "sum_of_parts": parts_gain, "interaction": gain - parts_gain})
    return pd.DataFrame(rows, columns=["run", "parts", "measured_gain", "sum_of_parts",
                                       "interaction"])
