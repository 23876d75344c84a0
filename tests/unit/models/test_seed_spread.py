"""SeedSpread on hand-made masks whose scores are known, and the plan's spread-seed checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from lesionwatch.models.metrics import CaseMetrics, evaluate_case
from lesionwatch.models.reproduce import PLANS, ReproducePlan
from lesionwatch.models.seed_spread import SeedSpread

SPACING = (1.0, 1.0, 1.0)


def truth() -> np.ndarray:
    """Two 27-voxel cubes far apart."""
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:5, 2:5, 2:5] = 1
    mask[12:15, 12:15, 12:15] = 1
    return mask


def scores(case_id: str, found: int) -> CaseMetrics:
    """A prediction that finds ``found`` of the two lesions exactly."""
    predicted = truth()
    if found < 2:
        predicted[12:15, 12:15, 12:15] = 0
    if found < 1:
        predicted[2:5, 2:5, 2:5] = 0
    return evaluate_case(predicted, truth(), SPACING, case_id=case_id)


def test_spread_reports_each_seed_and_the_sd_across_seeds() -> None:
    spread = SeedSpread(
        {
            0: [scores("a", 2), scores("b", 2)],  # sensitivity 1.0 on both cases
            1: [scores("a", 1), scores("b", 1)],  # 0.5
            2: [scores("a", 2), scores("b", 1)],  # mean 0.75
        }
    )
    means = spread.run_means()
    assert [means[s]["anima_sensitivity"] for s in (0, 1, 2)] == [1.0, 0.5, 0.75]
    mean, sd, low, high = spread.across_seeds()["anima_sensitivity"]
    assert mean == pytest.approx(0.75) and sd == pytest.approx(0.25)
    assert (low, high) == (0.5, 1.0)
    # every found lesion is exact, so PPV is 1 for every run and does not spread
    assert spread.across_seeds()["anima_ppv"][:2] == (1.0, 0.0)
    table = spread.table(reference_seed=0)
    assert "0 (reference)" in table and "mean ± SD over 3 seeds" in table
    assert "0.750 ± 0.250" in table and "0.500-1.000" in table
    metrics = spread.metrics()
    assert metrics["seed_spread_anima_sensitivity_sd"] == pytest.approx(0.25)
    assert metrics["seed_spread_anima_sensitivity_n"] == 3.0
    assert all(math.isfinite(value) for value in metrics.values())


def test_spread_needs_two_runs_on_the_same_cases() -> None:
    with pytest.raises(ValueError, match="at least two"):
        SeedSpread({0: [scores("a", 2)]})
    with pytest.raises(ValueError, match="same cases"):
        SeedSpread({0: [scores("a", 2)], 1: [scores("b", 2)]})


def test_plan_spread_seeds_must_be_new_and_need_real_cases() -> None:
    flair = PLANS["flair"]
    assert flair.pretrain.seed not in flair.spread_seeds
    values = flair.model_dump()
    with pytest.raises(ValidationError, match="differ from the pre-training seed"):
        ReproducePlan(**{**values, "spread_seeds": (flair.pretrain.seed,)})
    with pytest.raises(ValidationError, match="distinct"):
        ReproducePlan(**{**values, "spread_seeds": (5, 5)})
    enhancing = PLANS["enhancing"].model_dump()
    with pytest.raises(ValidationError, match="real labelled cases"):
        ReproducePlan(**{**enhancing, "spread_seeds": (1,)})
