"""Lesion-wise and voxel-wise evaluation of MS lesion segmentations (the MSSEG-2 metrics).

Lesion detection follows Anima's segmentation performance analyzer (``animaSegPerfAnalyzer``,
Inria-Empenn/Anima-Public, ``animaSegPerfCAnalyzer.cxx``: ``getOverlapTab``,
``getTruePositiveLesions``, ``falsePositiveRatioTester``), the scorer of MSSEG-2016 and
MSSEG-2, described in Commowick et al., "Objective evaluation of multiple sclerosis lesion
segmentation using a data management and processing infrastructure", Sci Rep 8:13650 (2018),
section "Detection metrics". Its rule, with the analyzer's command-line defaults
(``-v 3 -x 0.10 -y 0.70 -z 0.65``):

1. Both masks are split into connected components; components of at most
   ``min_lesion_volume_mm3`` are dropped (Anima keeps a component of ``n`` voxels when
   ``n >= floor(min_volume / voxel_volume) + 1``), and their voxels count as background.
2. An overlap table ``T[i, j]`` counts voxels in reference component ``i`` and tested
   component ``j`` (index 0 is background on both sides).
3. A reference lesion ``i`` is detected when
   (alpha) the tested components cover more than ``alpha`` of it, and
   (beta/gamma) going through the tested components overlapping it in decreasing order of
   overlap until they account for at least ``gamma`` of the covered part, none has more than
   ``beta`` of its own voxels outside every reference lesion. Splits pass (each piece lies
   inside), merges pass (a component covering two reference lesions is not "outside").
4. Sensitivity = detected reference lesions / reference lesions. PPV applies the same rule
   with the roles swapped (a predicted lesion is correct when the reference "detects" it).
   F1 = 2 * PPV * sensitivity / (PPV + sensitivity).

Two details are copied from Anima's code on purpose so numbers match its output: the
beta/gamma loop looks at no more components than there are labels (lesions + background)
on the side being scored, and ties in overlap keep the lower component label first.

Deliberate differences, each a parameter or documented here:

- ``connectivity`` defaults to 26 (the project's lesion-counting convention, also used by
  the open_ms_data lesion counts). Anima's ITK ``ConnectedComponentImageFilter`` runs with
  ``FullyConnected`` off, i.e. 6-connectivity: pass ``connectivity=6`` to reproduce Anima
  exactly.
- Empty masks: sensitivity is NaN when the reference has no lesion and PPV is NaN when the
  prediction has none (Anima's 0/0). F1 is NaN only when both are empty (nothing to find and
  nothing found); when exactly one side is empty, or no lesion agrees at all, F1 is 0,
  where Anima's formula gives NaN from 0/0. A NaN is skipped (not counted) by
  :func:`summarize_cases`.
- Dice and volumes use the raw masks (no size filter), as Anima's voxel-wise measures do;
  Dice is NaN when both masks are empty.

The plain any-overlap rule (a lesion counts as found when any voxel overlaps a component on
the other side, after the same size filter) is reported next to it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from lesionwatch.dicom_io.image_volume import ImageVolume

__all__ = [
    "AnimaDetectionParams",
    "CaseMetrics",
    "DetectionRule",
    "LesionDetection",
    "MeanSE",
    "MetricsInputError",
    "count_detected_anima",
    "count_detected_any_overlap",
    "dice",
    "evaluate_case",
    "label_lesions",
    "min_component_voxels",
    "overlap_table",
    "summarize_cases",
]


class MetricsInputError(ValueError):
    """The masks given for evaluation do not fit together (grid, shape, spacing)."""


class DetectionRule(Enum):
    ANIMA = "anima"
    ANY_OVERLAP = "any_overlap"


@dataclass(frozen=True)
class AnimaDetectionParams:
    """animaSegPerfAnalyzer's defaults: ``-v`` minimum volume, ``-x/-y/-z`` alpha/beta/gamma."""

    min_lesion_volume_mm3: float = 3.0
    alpha: float = 0.10
    beta: float = 0.70
    gamma: float = 0.65

    def __post_init__(self) -> None:
        if self.min_lesion_volume_mm3 < 0:
            raise ValueError(
                f"min_lesion_volume_mm3 must be >= 0, got {self.min_lesion_volume_mm3}"
            )
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise counts and scores of one case under one detection rule."""

    rule: DetectionRule
    n_true_lesions: int
    n_predicted_lesions: int
    n_true_detected: int
    n_predicted_correct: int

    @property
    def sensitivity(self) -> float:
        return self.n_true_detected / self.n_true_lesions if self.n_true_lesions else math.nan

    @property
    def ppv(self) -> float:
        if not self.n_predicted_lesions:
            return math.nan
        return self.n_predicted_correct / self.n_predicted_lesions

    @property
    def f1(self) -> float:
        if not self.n_true_lesions and not self.n_predicted_lesions:
            return math.nan
        if not self.n_true_lesions or not self.n_predicted_lesions:
            return 0.0
        sens, ppv = self.sensitivity, self.ppv
        return 0.0 if sens + ppv == 0 else 2.0 * sens * ppv / (sens + ppv)

    @property
    def n_false_negative(self) -> int:
        return self.n_true_lesions - self.n_true_detected

    @property
    def n_false_positive(self) -> int:
        return self.n_predicted_lesions - self.n_predicted_correct


@dataclass(frozen=True)
class CaseMetrics:
    """Everything measured on one case; `as_dict` flattens it for tables and JSON."""

    case_id: str
    dice: float
    true_volume_ml: float
    predicted_volume_ml: float
    anima: LesionDetection
    any_overlap: LesionDetection
    connectivity: int = 26
    params: AnimaDetectionParams = field(default_factory=AnimaDetectionParams)

    @property
    def volume_difference_ml(self) -> float:
        return self.predicted_volume_ml - self.true_volume_ml

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "case_id": self.case_id,
            "dice": self.dice,
            "true_volume_ml": self.true_volume_ml,
            "predicted_volume_ml": self.predicted_volume_ml,
            "volume_difference_ml": self.volume_difference_ml,
            "connectivity": self.connectivity,
            **{f"param_{k}": v for k, v in asdict(self.params).items()},
        }
        for detection in (self.anima, self.any_overlap):
            prefix = detection.rule.value
            row[f"{prefix}_n_true_lesions"] = detection.n_true_lesions
            row[f"{prefix}_n_predicted_lesions"] = detection.n_predicted_lesions
            row[f"{prefix}_n_true_detected"] = detection.n_true_detected
            row[f"{prefix}_n_predicted_correct"] = detection.n_predicted_correct
            row[f"{prefix}_sensitivity"] = detection.sensitivity
            row[f"{prefix}_ppv"] = detection.ppv
            row[f"{prefix}_f1"] = detection.f1
        return row

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> CaseMetrics:
        """The inverse of `as_dict` (derived values are recomputed, not read)."""

        def detection(rule: DetectionRule) -> LesionDetection:
            def count(name: str) -> int:
                return int(row[f"{rule.value}_{name}"])

            return LesionDetection(
                rule,
                count("n_true_lesions"),
                count("n_predicted_lesions"),
                count("n_true_detected"),
                count("n_predicted_correct"),
            )

        params = {
            name: float(row[f"param_{name}"])
            for name in ("min_lesion_volume_mm3", "alpha", "beta", "gamma")
        }
        return cls(
            str(row["case_id"]),
            float(row["dice"]),
            float(row["true_volume_ml"]),
            float(row["predicted_volume_ml"]),
            detection(DetectionRule.ANIMA),
            detection(DetectionRule.ANY_OVERLAP),
            int(row["connectivity"]),
            AnimaDetectionParams(**params),
        )


@dataclass(frozen=True)
class MeanSE:
    """Mean and standard error (sample SD / sqrt(n)) over the cases where a value is defined."""

    mean: float
    se: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.se:.3f} (n={self.n})"


# --- building blocks --------------------------------------------------------------------------


def _structure(connectivity: int) -> npt.NDArray[np.bool_]:
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    return ndimage.generate_binary_structure(3, rank)


def min_component_voxels(min_volume_mm3: float, voxel_volume_mm3: float) -> int:
    """Smallest kept component in voxels, computed as Anima does: floor(v / voxel) + 1."""
    return int(math.floor(min_volume_mm3 / voxel_volume_mm3)) + 1


def label_lesions(
    mask: npt.NDArray[Any],
    spacing_mm: Sequence[float],
    min_volume_mm3: float = 3.0,
    connectivity: int = 26,
) -> tuple[npt.NDArray[np.int32], int]:
    """Connected components of ``mask != 0`` larger than ``min_volume_mm3``, labelled 1..n.

    Dropped components become background (0). Labels are dense and in scan order.
    """
    labels, n = ndimage.label(np.asarray(mask) != 0, structure=_structure(connectivity))
    if n == 0:
        return labels.astype(np.int32), 0
    voxel_volume_mm3 = float(np.prod(spacing_mm))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_component_voxels(min_volume_mm3, voxel_volume_mm3)
    keep[0] = False
    new_ids = np.zeros(n + 1, dtype=np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new_ids[labels], int(keep.sum())


def overlap_table(
    true_labels: npt.NDArray[np.integer[Any]],
    n_true: int,
    predicted_labels: npt.NDArray[np.integer[Any]],
    n_predicted: int,
) -> npt.NDArray[np.int64]:
    """``T[i, j]`` = voxels in true component i and predicted component j (0 = background)."""
    flat = true_labels.astype(np.int64).ravel() * (n_predicted + 1) + predicted_labels.ravel()
    counts = np.bincount(flat, minlength=(n_true + 1) * (n_predicted + 1))
    return counts.reshape(n_true + 1, n_predicted + 1)


def _anima_row_detected(
    table: npt.NDArray[np.int64],
    row: int,
    column_sums: npt.NDArray[np.int64],
    alpha: float,
    beta: float,
    gamma: float,
) -> bool:
    covered = int(table[row, 1:].sum())
    missed = int(table[row, 0])
    if covered / (covered + missed) <= alpha:
        return False
    # Anima's falsePositiveRatioTester: components by decreasing overlap (stable: lower label
    # first on ties); its loop bound is the number of labels on the scored side (incl. 0).
    overlaps = table[row, 1:]
    order = np.argsort(-overlaps, kind="stable") + 1
    max_checked = min(table.shape[0], order.size)
    weight = 0.0
    for column in order[:max_checked]:
        if weight >= gamma:
            break
        if table[0, column] / column_sums[column] > beta:
            return False
        weight += table[row, column] / covered
    return True


def count_detected_anima(
    table: npt.NDArray[np.int64], alpha: float = 0.10, beta: float = 0.70, gamma: float = 0.65
) -> int:
    """Rows (reference lesions, index >= 1) detected by the columns under Anima's rule.

    Pass ``table.T`` to score the predicted lesions (PPV side).
    """
    n_rows, n_columns = table.shape
    if n_rows <= 1 or n_columns <= 1:
        return 0
    column_sums = table.sum(axis=0)
    return sum(
        _anima_row_detected(table, row, column_sums, alpha, beta, gamma) for row in range(1, n_rows)
    )


def count_detected_any_overlap(table: npt.NDArray[np.int64]) -> int:
    """Rows (index >= 1) that share at least one voxel with any column component."""
    if table.shape[0] <= 1 or table.shape[1] <= 1:
        return 0
    return int(np.count_nonzero(table[1:, 1:].sum(axis=1)))


def dice(predicted: npt.NDArray[Any], truth: npt.NDArray[Any]) -> float:
    """Voxel-wise Dice of two masks (nonzero = lesion); NaN when both are empty."""
    a, b = np.asarray(predicted) != 0, np.asarray(truth) != 0
    total = int(a.sum()) + int(b.sum())
    return math.nan if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


# --- one case ---------------------------------------------------------------------------------


def _as_array_and_spacing(
    predicted: npt.NDArray[Any] | ImageVolume,
    truth: npt.NDArray[Any] | ImageVolume,
    spacing_mm: Sequence[float] | None,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], tuple[float, float, float]]:
    volumes = [v for v in (predicted, truth) if isinstance(v, ImageVolume)]
    if len(volumes) == 2:
        assert isinstance(predicted, ImageVolume) and isinstance(truth, ImageVolume)
        if not predicted.same_grid(truth):
            raise MetricsInputError(
                "prediction and ground truth are on different grids: shape "
                f"{predicted.array.shape} vs {truth.array.shape}, affine\n{predicted.affine_lps}"
                f"\nvs\n{truth.affine_lps}; resample the prediction onto the truth first"
            )
    if volumes:
        grid_spacing = volumes[0].spacing_mm
        if spacing_mm is not None and not np.allclose(spacing_mm, grid_spacing, atol=1e-6):
            raise MetricsInputError(
                f"spacing_mm={tuple(spacing_mm)} contradicts the image spacing {grid_spacing}"
            )
        spacing_mm = grid_spacing
    if spacing_mm is None:
        raise MetricsInputError("numpy masks need spacing_mm (voxel size in mm, i/j/k order)")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise MetricsInputError(f"spacing_mm must be three positive numbers, got {spacing_mm}")
    pred = predicted.array if isinstance(predicted, ImageVolume) else np.asarray(predicted)
    true = truth.array if isinstance(truth, ImageVolume) else np.asarray(truth)
    if pred.shape != true.shape or pred.ndim != 3:
        raise MetricsInputError(
            f"masks must be 3-D with equal shapes, got prediction {pred.shape}, truth {true.shape}"
        )
    return pred, true, (spacing[0], spacing[1], spacing[2])


def evaluate_case(
    predicted: npt.NDArray[Any] | ImageVolume,
    truth: npt.NDArray[Any] | ImageVolume,
    spacing_mm: Sequence[float] | None = None,
    *,
    case_id: str = "",
    params: AnimaDetectionParams | None = None,
    connectivity: int = 26,
) -> CaseMetrics:
    """Dice, volumes and lesion-wise detection (Anima rule and any-overlap) for one case.

    Masks are binarised as ``!= 0``. Numpy masks need ``spacing_mm``; the order of the
    spacing does not matter for the volume rule (only the voxel volume is used).
    """
    params = params or AnimaDetectionParams()
    pred, true, spacing = _as_array_and_spacing(predicted, truth, spacing_mm)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    true_labels, n_true = label_lesions(true, spacing, params.min_lesion_volume_mm3, connectivity)
    pred_labels, n_pred = label_lesions(pred, spacing, params.min_lesion_volume_mm3, connectivity)
    table = overlap_table(true_labels, n_true, pred_labels, n_pred)
    anima = LesionDetection(
        rule=DetectionRule.ANIMA,
        n_true_lesions=n_true,
        n_predicted_lesions=n_pred,
        n_true_detected=count_detected_anima(table, params.alpha, params.beta, params.gamma),
        n_predicted_correct=count_detected_anima(table.T, params.alpha, params.beta, params.gamma),
    )
    any_overlap = LesionDetection(
        rule=DetectionRule.ANY_OVERLAP,
        n_true_lesions=n_true,
        n_predicted_lesions=n_pred,
        n_true_detected=count_detected_any_overlap(table),
        n_predicted_correct=count_detected_any_overlap(table.T),
    )
    return CaseMetrics(
        case_id=case_id,
        dice=dice(pred, true),
        true_volume_ml=int(np.count_nonzero(true)) * voxel_ml,
        predicted_volume_ml=int(np.count_nonzero(pred)) * voxel_ml,
        anima=anima,
        any_overlap=any_overlap,
        connectivity=connectivity,
        params=params,
    )


# --- many cases -------------------------------------------------------------------------------


def _mean_se(values: Iterable[float]) -> MeanSE:
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = int(finite.size)
    if n == 0:
        return MeanSE(math.nan, math.nan, 0)
    se = float(finite.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return MeanSE(float(finite.mean()), se, n)


_SUMMARY_FIELDS = ("dice", "true_volume_ml", "predicted_volume_ml", "volume_difference_ml")
_DETECTION_FIELDS = ("sensitivity", "ppv", "f1")


def summarize_cases(cases: Sequence[CaseMetrics]) -> dict[str, MeanSE]:
    """Mean ± SE across cases of every score; undefined (NaN) values are left out of each n."""
    if not cases:
        raise ValueError("summarize_cases needs at least one case")
    summary = {name: _mean_se(getattr(case, name) for case in cases) for name in _SUMMARY_FIELDS}
    for rule_name in ("anima", "any_overlap"):
        for name in _DETECTION_FIELDS:
            summary[f"{rule_name}_{name}"] = _mean_se(
                getattr(getattr(case, rule_name), name) for case in cases
            )
    return summary
