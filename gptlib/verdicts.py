"""Is a difference in test loss more than seed noise? One function, :func:`compare`, answers it
for every page that shows one: the runs table, the noise table, the bar chart, a run's report.

An intervention's test losses over its seeds are compared with the baseline's over its seeds:
the difference of the means, that difference in baseline-seed SDs, and Welch's 95% interval
(SE = sqrt(s_i^2 / n_i + s_b^2 / n_b), Welch-Satterthwaite degrees of freedom). The verdict is
``better`` / ``worse`` when the interval excludes 0, ``within noise`` when it holds 0, and
``unknown: needs seeds`` when either side has fewer than :data:`MIN_SEEDS` seeds: one seed has no
spread of its own, and borrowing the other side's leaves an interval on one or two degrees of
freedom that says little. The baseline's own seeds are its samples, never compared with it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MIN_SEEDS", "UNKNOWN", "Comparison", "compare", "interval_verdict", "loss_text",
           "sd_text", "delta_text", "t_quantile_975"]

MIN_SEEDS = 2
UNKNOWN = "unknown: needs seeds"
VERDICTS = ("better", "worse", "within noise", UNKNOWN)

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def t_quantile_975(dof: float) -> float:
    """t_{0.975} for `dof` degrees of freedom, rounded down to a whole number (conservative)."""
    whole = max(1, math.floor(dof))
    return T_975[whole - 1] if whole <= len(T_975) else 1.96


def _welch_dof(s1: float, n1: int, s2: float, n2: int) -> float:
    a, b = s1**2 / n1, s2**2 / n2
    return (a + b) ** 2 / (a**2 / (n1 - 1) + b**2 / (n2 - 1)) if a + b else n1 + n2 - 2


def interval_verdict(ci_low: float | None, ci_high: float | None) -> str:
    """``better`` / ``worse`` when the 95% interval of (run - baseline) excludes 0, else ``within
    noise``; :data:`UNKNOWN` without an interval."""
    if ci_low is None or ci_high is None or math.isnan(ci_low) or math.isnan(ci_high):
        return UNKNOWN
    return "better" if ci_high < 0 else "worse" if ci_low > 0 else "within noise"


@dataclass(frozen=True)
class Comparison:
    """An intervention's test losses over seeds against the baseline's."""

    n: int
    mean: float
    sd: float | None
    n_baseline: int
    baseline_mean: float | None
    baseline_sd: float | None
    delta: float | None
    delta_sd: float | None  # delta in baseline-seed SDs
    ci_low: float | None
    ci_high: float | None
    verdict: str

    @property
    def within_noise(self) -> bool | None:
        return None if self.verdict == UNKNOWN else self.verdict == "within noise"

    def seeds_needed(self, name: str) -> str:
        """What to train for a verdict ("" when there is one)."""
        if self.verdict != UNKNOWN:
            return ""
        missing = [f"{name} has {self.n}" if self.n < MIN_SEEDS else "",
                   f"the baseline has {self.n_baseline}" if self.n_baseline < MIN_SEEDS else ""]
        have = " and ".join(m for m in missing if m)
        return (f"needs >= {MIN_SEEDS} evaluated seeds on each side ({have}): "
                f"gptlib sweep --interventions baseline,{name} --seeds 42,43,44")

    def line(self, name: str) -> str:
        """One sentence for a report: the difference, its size in SDs, the interval, the verdict."""
        if self.delta is None:
            return f"{name}: no evaluated baseline to compare with"
        size = f" ({self.delta_sd:+.1f} baseline SDs)" if self.delta_sd is not None else ""
        seeds = f"{self.n} vs {self.n_baseline} seeds"
        if self.verdict == UNKNOWN:
            return f"{name}: Δ {delta_text(self.delta)}{size}, {seeds}: {UNKNOWN}; {self.seeds_needed(name)}"
        return (f"{name}: Δ {delta_text(self.delta)}{size}, 95% interval [{delta_text(self.ci_low)}, "
                f"{delta_text(self.ci_high)}], {seeds}: {self.verdict}")


def compare(losses: Sequence[float], baseline: Sequence[float]) -> Comparison:
    """The comparison of an intervention's seeds' test losses with the baseline's."""
    n, n_base = len(losses), len(baseline)
    if n == 0:
        raise ValueError("compare: no test losses for the intervention")
    mean = statistics.fmean(losses)
    sd = statistics.stdev(losses) if n >= MIN_SEEDS else None
    base_mean = statistics.fmean(baseline) if n_base else None
    base_sd = statistics.stdev(baseline) if n_base >= MIN_SEEDS else None
    delta = None if base_mean is None else mean - base_mean
    delta_sd = delta / base_sd if delta is not None and base_sd else None
    ci_low = ci_high = None
    if delta is not None and sd is not None and base_sd is not None:
        se = math.sqrt(sd**2 / n + base_sd**2 / n_base)
        half = t_quantile_975(_welch_dof(sd, n, base_sd, n_base)) * se
        ci_low, ci_high = delta - half, delta + half
    return Comparison(n, mean, sd, n_base, base_mean, base_sd, delta, delta_sd, ci_low, ci_high,
                      interval_verdict(ci_low, ci_high))


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def loss_text(value: float | None) -> str:
    """A loss for reading: 4 decimals."""
    return "—" if _missing(value) else f"{value:.4f}"


def delta_text(value: float | None) -> str:
    """A signed loss difference: 4 decimals."""
    return "—" if _missing(value) else f"{value:+.4f}"


def sd_text(value: float | None) -> str:
    """A standard deviation: 2 significant figures (0.0070, 0.00015, 0.12)."""
    if _missing(value):
        return "—"
    if value == 0:
        return "0"
    return f"{value:#.2g}".rstrip(".")
