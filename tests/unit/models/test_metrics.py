"""Lesion-wise metrics on hand-made masks whose answers are worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.metrics import (
    AnimaDetectionParams,
    CaseMetrics,
    MetricsInputError,
    evaluate_case,
    label_lesions,
    min_component_voxels,
    summarize_cases,
)

SPACING = (1.0, 1.0, 1.0)


def empty(shape: tuple[int, int, int] = (24, 24, 24)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


def evaluate(pred: np.ndarray, true: np.ndarray, **kwargs: object) -> CaseMetrics:
    return evaluate_case(pred, true, SPACING, **kwargs)  # type: ignore[arg-type]


def test_identical_masks_score_one() -> None:
    true = empty()
    true[2:6, 2:6, 2:6] = 1
    true[10:13, 10:13, 10:13] = 1
    m = evaluate(true.copy(), true)
    assert (m.anima.n_true_lesions, m.anima.n_predicted_lesions) == (2, 2)
    assert m.anima.sensitivity == m.anima.ppv == m.anima.f1 == 1.0
    assert m.dice == 1.0
    assert m.true_volume_ml == m.predicted_volume_ml == pytest.approx((64 + 27) / 1000)


def test_lesion_split_in_two_by_prediction_is_one_detection() -> None:
    true = empty()
    true[2:6, 2:6, 2:6] = 1  # 64 voxels
    pred = true.copy()
    pred[4, :, :] = 0  # two pieces (32 and 16 voxels), both inside the lesion
    m = evaluate(pred, true)
    assert m.anima.n_predicted_lesions == 2
    assert m.anima.n_true_detected == 1 and m.anima.sensitivity == 1.0
    assert m.anima.n_predicted_correct == 2 and m.anima.ppv == 1.0
    assert m.dice == pytest.approx(2 * 48 / (64 + 48))


def test_two_lesions_merged_into_one_prediction() -> None:
    true = empty()
    true[2:5, 2:5, 2:5] = 1
    true[2:5, 2:5, 7:10] = 1
    pred = empty()
    pred[2:5, 2:5, 2:10] = 1  # bridges the 2-voxel gap: 18 of 72 voxels outside
    m = evaluate(pred, true)
    assert (m.anima.n_true_lesions, m.anima.n_predicted_lesions) == (2, 1)
    assert m.anima.n_true_detected == 2
    assert m.anima.n_predicted_correct == 1
    assert m.anima.f1 == 1.0


def test_lesions_at_or_under_three_mm3_are_ignored_on_both_sides() -> None:
    assert min_component_voxels(3.0, 1.0) == 4  # Anima keeps strictly larger than 3 mm3
    assert min_component_voxels(3.0, 0.5 * 0.5 * 2.0) == 7
    true = empty()
    true[2:6, 2:6, 2:6] = 1
    true[15, 15, 15:18] = 1  # 3 mm3: not a lesion
    true[20, 2, 2:6] = 1  # 4 mm3: a lesion, missed
    pred = empty()
    pred[2:6, 2:6, 2:6] = 1
    pred[10, 20, 10:13] = 1  # 3 mm3 false positive: ignored
    m = evaluate(pred, true)
    assert (m.anima.n_true_lesions, m.anima.n_predicted_lesions) == (2, 1)
    assert m.anima.n_true_detected == 1 and m.anima.ppv == 1.0
    # the volume rule uses mm3, so a finer grid needs more voxels for the same lesion
    labels, n = label_lesions(true, (0.5, 0.5, 2.0))
    assert n == 1 and int((labels > 0).sum()) == 64


def test_prediction_mostly_outside_fails_beta_but_overlap_counts() -> None:
    true = empty()
    true[2:5, 2:5, 2:5] = 1  # 27 voxels
    pred = empty()
    pred[2:8, 2:8, 2:8] = 1  # 216 voxels, 189 outside: 0.875 > beta
    m = evaluate(pred, true)
    assert m.anima.n_true_detected == 0 and m.anima.sensitivity == 0.0
    assert m.any_overlap.n_true_detected == 1 and m.any_overlap.sensitivity == 1.0
    # the other way round the prediction is "detected" by the lesion it contains:
    # 27/216 = 0.125 > alpha and the lesion lies wholly inside it
    assert m.anima.ppv == 1.0
    assert m.anima.f1 == 0.0 and m.any_overlap.f1 == 1.0


@pytest.mark.parametrize(("overlap_voxels", "detected"), [(10, False), (11, True)])
def test_alpha_needs_strictly_more_than_ten_percent(overlap_voxels: int, detected: bool) -> None:
    true = empty()
    true[2:7, 2:7, 2:6] = 1  # 100 voxels
    pred = empty()
    pred[2:7, 2:4, 2] = 1  # 10 voxels inside the lesion
    if overlap_voxels == 11:
        pred[2, 4, 2] = 1
    m = evaluate(pred, true)
    assert m.anima.n_true_detected == int(detected)
    assert m.any_overlap.n_true_detected == 1
    # the prediction lies inside, but the lesion it touches is 89-90 % outside the prediction
    assert m.anima.n_predicted_correct == 0
    assert m.any_overlap.n_predicted_correct == 1


@pytest.mark.parametrize(("inside_length", "detected"), [(7, True), (5, False)])
def test_gamma_limits_which_components_must_pass_beta(inside_length: int, detected: bool) -> None:
    true = empty((24, 24, 4))
    true[0:10, 0:2, 0:2] = 1  # 40-voxel lesion
    pred = empty((24, 24, 4))
    pred[0:inside_length, 0:2, 0:2] = 1  # piece A: wholly inside
    start = inside_length + 1  # one-voxel gap keeps A and B apart
    outside_rows = 8 if inside_length == 7 else 12
    pred[start:10, 0:outside_rows, 0:2] = 1  # piece B: small overlap, mostly outside (> beta)
    m = evaluate(pred, true)
    assert m.anima.n_predicted_lesions == 2
    # A covers 28/36 = 0.78 >= gamma: B is never looked at. A covers 20/36 = 0.56 < gamma:
    # B must be looked at and fails beta.
    assert m.anima.n_true_detected == int(detected)
    assert m.any_overlap.n_true_detected == 1


def test_empty_masks_follow_anima_nan_convention() -> None:
    lesion = empty()
    lesion[2:6, 2:6, 2:6] = 1
    both_empty = evaluate(empty(), empty())
    assert math.isnan(both_empty.anima.sensitivity) and math.isnan(both_empty.anima.ppv)
    assert math.isnan(both_empty.anima.f1) and math.isnan(both_empty.dice)
    no_truth = evaluate(lesion, empty())
    assert math.isnan(no_truth.anima.sensitivity)
    assert no_truth.anima.ppv == 0.0 and no_truth.anima.f1 == 0.0 and no_truth.dice == 0.0
    no_prediction = evaluate(empty(), lesion)
    assert no_prediction.anima.sensitivity == 0.0
    assert math.isnan(no_prediction.anima.ppv) and no_prediction.anima.f1 == 0.0
    assert no_prediction.any_overlap.n_false_negative == 1


def test_connectivity_decides_whether_corner_touching_blobs_are_one_lesion() -> None:
    true = empty()
    true[2:4, 2:4, 2:4] = 1
    true[4:6, 4:6, 4:6] = 1  # touches the first blob only at a corner
    assert evaluate(true, true).anima.n_true_lesions == 1
    assert evaluate(true, true, connectivity=6).anima.n_true_lesions == 2
    with pytest.raises(ValueError, match="connectivity"):
        evaluate(true, true, connectivity=8)


def test_parameters_change_the_rule() -> None:
    true = empty()
    true[2:5, 2:5, 2:5] = 1
    pred = empty()
    pred[2:8, 2:8, 2:8] = 1  # 0.875 outside
    lenient = AnimaDetectionParams(beta=0.9)
    assert evaluate(pred, true, params=lenient).anima.n_true_detected == 1
    with pytest.raises(ValueError, match="alpha"):
        AnimaDetectionParams(alpha=0.0)


def test_image_volumes_must_share_the_grid() -> None:
    lesion = empty()
    lesion[2:6, 2:6, 2:6] = 1
    truth = ImageVolume(lesion, spacing_mm=(0.5, 0.5, 2.0), origin_mm=(0.0, 0.0, 0.0))
    m = evaluate_case(truth.with_array(lesion.copy()), truth)
    assert m.true_volume_ml == pytest.approx(64 * 0.5 / 1000)
    shifted = ImageVolume(lesion, spacing_mm=(0.5, 0.5, 2.0), origin_mm=(1.0, 0.0, 0.0))
    with pytest.raises(MetricsInputError, match="different grids"):
        evaluate_case(shifted, truth)
    with pytest.raises(MetricsInputError, match="spacing_mm"):
        evaluate_case(lesion, lesion)
    with pytest.raises(MetricsInputError, match="equal shapes"):
        evaluate_case(lesion, lesion[:-1], SPACING)


def test_summary_is_mean_and_standard_error_skipping_undefined() -> None:
    lesion = empty()
    lesion[2:6, 2:6, 2:6] = 1
    half = lesion.copy()
    half[2:4] = 0
    cases = [evaluate(lesion, lesion), evaluate(half, lesion), evaluate(empty(), empty())]
    summary = summarize_cases(cases)
    dices = [1.0, 2 * 32 / 96]
    assert summary["dice"].n == 2
    assert summary["dice"].mean == pytest.approx(np.mean(dices))
    assert summary["dice"].se == pytest.approx(np.std(dices, ddof=1) / np.sqrt(2))
    assert summary["anima_sensitivity"].n == 2 and summary["anima_sensitivity"].mean == 1.0
    assert summary["true_volume_ml"].n == 3
    assert "±" in str(summary["dice"])
    row = cases[1].as_dict()
    assert row["anima_sensitivity"] == 1.0 and row["param_beta"] == 0.7


def test_real_consensus_mask_against_itself_and_with_lesions_removed(test_data: Path) -> None:
    truth = ImageVolume.load(
        test_data / "open_ms_data" / "cross_sectional" / "patient07" / "lesion_mask.nii.gz"
    )
    truth = truth.with_array((truth.array > 0).astype(np.uint8))
    _, n_all = label_lesions(truth.array, truth.spacing_mm, min_volume_mm3=0.0)
    assert n_all == 37  # the dataset's published count (26-connectivity)
    same = evaluate_case(truth, truth, case_id="patient07")
    assert same.anima.sensitivity == same.anima.ppv == same.dice == 1.0
    assert same.true_volume_ml == pytest.approx(1.3, abs=0.05)
    labels, n = label_lesions(truth.array, truth.spacing_mm)
    kept = (labels > 0) & (labels % 2 == 0)  # every other lesion found, perfectly outlined
    m = evaluate_case(truth.with_array(kept.astype(np.uint8)), truth)
    assert m.anima.n_true_lesions == n
    assert m.anima.sensitivity == pytest.approx((n // 2) / n)
    assert m.anima.ppv == 1.0
    assert m.dice == pytest.approx(2 * kept.sum() / (truth.array.sum() + kept.sum()))


@pytest.mark.parametrize(("extra_lesion", "detected"), [(False, 1), (True, 0)])
def test_anima_checks_at_most_as_many_components_as_labels(
    extra_lesion: bool, detected: int
) -> None:
    # Anima's falsePositiveRatioTester stops after (lesions + 1) components on the scored side.
    true = empty((24, 24, 4))
    true[0:16, 0:2, 0:2] = 1  # 64 voxels
    pred = empty((24, 24, 4))
    pred[0:4, 0:2, 0:2] = 1  # 16 inside
    pred[5:9, 0:2, 0:2] = 1  # 16 inside
    pred[10:13, 0:12, 0:2] = 1  # 12 inside, 60 of 72 voxels outside: fails beta
    pred[14:16, 0:2, 0:2] = 1  # 8 inside
    if extra_lesion:
        true[20:23, 20:23, 0:2] = 1  # a missed lesion elsewhere: now 3 labels, 3 checks
    m = evaluate(pred, true)
    # after the two largest pieces 32/52 = 0.62 < gamma; the third piece is the bad one
    assert m.anima.n_true_detected == detected
