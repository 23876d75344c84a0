"""How far a recipe's held-out scores move when only the training seed changes.

On a few thousand CPU steps and a handful of real cases, two runs of one recipe that differ
only in their seed can differ in lesion-wise sensitivity by more than any recipe change moves
it. `SeedSpread` holds the per-case scores of such runs (same cases, same settings) and
reports each run's mean over cases and the standard deviation across runs, so a comparison
between recipes can be set against it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lesionwatch.models.evaluate import format_score, markdown_table
from lesionwatch.models.metrics import CaseMetrics, summarize_cases

__all__ = ["SPREAD_COLUMNS", "SeedSpread"]

# (column title, summarize_cases key)
SPREAD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Dice", "dice"),
    ("Sens (Anima)", "anima_sensitivity"),
    ("PPV (Anima)", "anima_ppv"),
    ("F1 (Anima)", "anima_f1"),
    ("Vol pred mL", "predicted_volume_ml"),
)


@dataclass(frozen=True)
class SeedSpread:
    """Per-case scores of runs of one recipe, keyed by training seed."""

    runs: Mapping[int, Sequence[CaseMetrics]]

    def __post_init__(self) -> None:
        if len(self.runs) < 2:
            raise ValueError("a seed spread needs at least two runs")
        case_sets = {tuple(sorted(c.case_id for c in cases)) for cases in self.runs.values()}
        if len(case_sets) != 1:
            raise ValueError("every run of a seed spread must be scored on the same cases")

    def run_means(self) -> dict[int, dict[str, float]]:
        """Seed -> mean over cases of each spread column."""
        means = {}
        for seed, cases in self.runs.items():
            summary = summarize_cases(cases)
            means[seed] = {key: summary[key].mean for _, key in SPREAD_COLUMNS}
        return means

    def across_seeds(self) -> dict[str, tuple[float, float, float, float]]:
        """Column -> (mean, sample SD, min, max) of the runs' means (NaN runs left out)."""
        means = self.run_means()
        result = {}
        for _, key in SPREAD_COLUMNS:
            values = [m[key] for m in means.values() if math.isfinite(m[key])]
            if not values:
                result[key] = (math.nan, math.nan, math.nan, math.nan)
                continue
            sd = statistics.stdev(values) if len(values) > 1 else math.nan
            result[key] = (statistics.fmean(values), sd, min(values), max(values))
        return result

    def metrics(self, prefix: str = "seed_spread_") -> dict[str, float]:
        """Flat card metrics: ``<prefix><key>_mean``, ``_sd``, ``_min``, ``_max``, ``_n``."""
        flat: dict[str, float] = {}
        for key, (mean, sd, low, high) in self.across_seeds().items():
            if not math.isfinite(mean):
                continue
            flat.update(
                {
                    f"{prefix}{key}_mean": mean,
                    f"{prefix}{key}_min": low,
                    f"{prefix}{key}_max": high,
                    f"{prefix}{key}_n": float(len(self.runs)),
                }
            )
            if math.isfinite(sd):
                flat[f"{prefix}{key}_sd"] = sd
        return flat

    def table(self, reference_seed: int | None = None) -> str:
        """Markdown: one row per seed (mean over cases), then mean ± SD and range over seeds."""

        headers = ["training seed", *(title for title, _ in SPREAD_COLUMNS)]
        rows = []
        for seed, means in sorted(self.run_means().items()):
            label = f"{seed} (reference)" if seed == reference_seed else str(seed)
            rows.append([label, *(format_score(means[key]) for _, key in SPREAD_COLUMNS)])
        spread = self.across_seeds()
        rows.append(
            [
                f"**mean ± SD over {len(self.runs)} seeds**",
                *(
                    f"{format_score(spread[k][0])} ± {format_score(spread[k][1])}"
                    for _, k in SPREAD_COLUMNS
                ),
            ]
        )
        rows.append(
            [
                "**range**",
                *(
                    f"{format_score(spread[k][2])}-{format_score(spread[k][3])}"
                    for _, k in SPREAD_COLUMNS
                ),
            ]
        )
        return markdown_table(headers, rows)
