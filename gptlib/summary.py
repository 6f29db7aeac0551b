"""Comparing runs: one table row per run directory of a scale, plus the published reference results.

:func:`collect_runs` reads only the files in ``outputs/<scale>/<run>/`` (``summary.json``,
``config.yaml``, ``metrics.jsonl`` and, for a run that never started training, the rendered
``train.ipynb``), so runs that failed or are still running appear with their status rather than
being dropped. Deltas are against the baseline run of the same seed (else the seed-42 baseline);
"negative = better". The published numbers of Giles Thomas's series live in
``gptlib/reference_results.csv``.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

from gptlib.display import format_duration
from gptlib.metrics import read_metrics
from gptlib.paths import OUTPUTS_DIR
from gptlib.rundir import read_summary

__all__ = ["COLUMNS", "read_summary", "run_status", "find_runs", "collect_runs",
           "reference_results", "reference_table", "table", "noise_table", "verdict",
           "series_comparison"]

COLUMNS = [
    "run", "status", "test_loss", "delta_vs_baseline", "delta_sd", "baseline_sd", "wall_time_s",
    "tokens_per_s", "final_train_loss", "spike_count", "best_step", "tokens_seen", "seed",
    "interventions", "eval_checkpoint", "error", "run_dir",
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


def table(df: pd.DataFrame) -> pd.DataFrame:
    """The runs table formatted for reading (strings; losses to 6 decimals)."""
    out = pd.DataFrame({
        "run": df["run"],
        "status": df["status"],
        "test loss": [_fmt(v, ".6f") for v in df["test_loss"]],
        "Δ vs baseline": [_fmt(v, "+.6f") for v in df["delta_vs_baseline"]],
        "Δ / baseline SD": [_fmt(v, "+.2f") for v in df["delta_sd"]],
        "time": [format_duration(v) for v in df["wall_time_s"]],
        "tokens/s": [_fmt(v, ",.0f") for v in df["tokens_per_s"]],
        "final train loss": [_fmt(v, ".3f") for v in df["final_train_loss"]],
        "spikes": [_fmt(v if v is None else float(v), ".0f") for v in df["spike_count"]],
    })
    if "reference_test_loss" in df:
        out["published test loss"] = [_fmt(v, ".6f") for v in df["reference_test_loss"]]
        out["published Δ"] = [_fmt(v, "+.6f") for v in df["reference_delta"]]
    out["error"] = df["error"]
    return out.set_index("run")


# --------------------------------------------------------------------------------------------------
# Noise-aware comparison over seeds, and stacked interventions vs the sum of their parts

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def t_quantile_975(dof: float) -> float:
    """t_{0.975} for `dof` degrees of freedom, rounded down to a whole number (conservative)."""
    whole = max(1, math.floor(dof))
    return T_975[whole - 1] if whole <= len(T_975) else 1.96


def _group(interventions: object) -> str | None:
    if not isinstance(interventions, list):
        return None
    return "+".join(interventions) or "baseline"


def _finished(df: pd.DataFrame) -> pd.DataFrame:
    done = df[df["test_loss"].notna()].copy()
    done["group"] = done["interventions"].apply(_group)
    return done[done["group"].notna()]


def published_seed_sd(scale: str) -> float | None:
    """The series' baseline seed SD for a full-scale preset (None for other scales)."""
    sd = reference_results(scale)["seed_sd"].dropna()
    return float(sd.iloc[0]) if len(sd) else None


def noise_table(df: pd.DataFrame, reference_sd: float | None = None) -> pd.DataFrame:
    """Per intervention (runs grouped over seeds): n, mean test loss, sample SD (n - 1), the
    difference of its mean from the baseline's mean, that difference in baseline-seed SDs, a 95%
    confidence interval of the difference and whether it is within noise (the interval holds 0).

    The interval is Welch's: SE = sqrt(s_i^2 / n_i + s_b^2 / n_b) with Welch-Satterthwaite degrees of
    freedom; an intervention run with one seed borrows the baseline's SD as its own run-to-run
    noise. With fewer than two baseline seeds the baseline SD is `reference_sd` (the published one
    for the full-scale presets) or unknown, and so are the intervals."""
    done = _finished(df)
    rows = []
    base = done.loc[done["group"] == "baseline", "test_loss"].tolist()
    base_sd = statistics.stdev(base) if len(base) >= 2 else reference_sd
    base_mean = statistics.fmean(base) if base else None
    for group, losses in done.groupby("group", sort=False)["test_loss"]:
        losses = losses.tolist()
        n = len(losses)
        sd = statistics.stdev(losses) if n >= 2 else None
        row = {"intervention": group, "n": n, "mean": statistics.fmean(losses), "sd": sd,
               "delta": None, "delta_sd": None, "ci_low": None, "ci_high": None,
               "within_noise": None}
        if base_mean is not None and group != "baseline":
            delta = row["mean"] - base_mean
            row["delta"] = delta
            if base_sd:
                row["delta_sd"] = delta / base_sd
                own_sd = sd if sd is not None else base_sd
                n_base = max(len(base), 1)
                se = math.sqrt(own_sd**2 / n + base_sd**2 / n_base)
                dof = _welch_dof(own_sd, n, base_sd, n_base)
                half = t_quantile_975(dof) * se
                row.update(ci_low=delta - half, ci_high=delta + half,
                           within_noise=bool(delta - half <= 0 <= delta + half))
        row["verdict"] = verdict(row["ci_low"], row["ci_high"])
        rows.append(row)
    table = pd.DataFrame(rows, columns=["intervention", "n", "mean", "sd", "delta", "delta_sd",
                                        "ci_low", "ci_high", "within_noise", "verdict"])
    table.attrs["baseline_sd"] = base_sd
    table.attrs["baseline_n"] = len(base)
    return table


def verdict(ci_low: float | None, ci_high: float | None) -> str | None:
    """`better` / `worse` when the 95% interval of (run - baseline) excludes 0, else `within
    noise`; None without an interval."""
    if ci_low is None or ci_high is None or math.isnan(ci_low) or math.isnan(ci_high):
        return None
    return "better" if ci_high < 0 else "worse" if ci_low > 0 else "within noise"


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
        if found is None:
            same = None
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


def _welch_dof(s1: float, n1: int, s2: float, n2: int) -> float:
    """Welch-Satterthwaite degrees of freedom. With one run on a side, its variance is borrowed
    from the other side, so only that side's n - 1 degrees of freedom are real."""
    if min(n1, n2) == 1:
        return max(max(n1, n2) - 1, 1)
    a, b = s1**2 / n1, s2**2 / n2
    return (a + b) ** 2 / (a**2 / (n1 - 1) + b**2 / (n2 - 1)) if a + b else n1 + n2 - 2


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
