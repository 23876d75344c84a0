"""The plausibility guard of the enhancing pipeline: candidates that cannot be active MS lesions.

Every gadolinium-enhancing MS lesion is also a T2/FLAIR lesion. The post-contrast T1 also
lights up normal structures: vessels, venous sinuses, the dura, the choroid plexus. A network
that has only seen synthetic lesions cannot tell them apart (on real studies 43 of 45 of its
candidates touched no expert FLAIR lesion), so a candidate is kept only if

1. it is at least `min_volume_mm3` (specks are vessel cross-sections and noise);
2. it lies in the parenchyma: less than half of it within `surface_margin_mm` of the brain
   mask's edge (dura, cortical veins, sinuses);
3. at least `flair_overlap_fraction` of it lies in the lesions the FLAIR model found in the
   same study, grown by `flair_margin_mm` for the small motion between the series (only when
   the study has a FLAIR series; without one the result is reported as unconfirmed). An
   enhancing MS lesion lies inside its FLAIR lesion; a vessel running past one does not.

A candidate failing several rules is counted under the first. Nothing is dropped silently:
the counts per rule travel with the result into the SR and the JSON export.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.postprocess import Lesion, select_lesions
from lesionwatch.pipelines.steps.resampling import Grid, Interpolation, resample_to_grid

__all__ = ["CandidateReview", "GuardSettings", "RemovalReason", "guard_candidates"]


class RemovalReason(enum.StrEnum):
    TOO_SMALL = "below the size floor"  # 10 mm3: about the 3 mm that trials count
    AT_SURFACE = "at the brain surface (dura, surface vessels, sinuses)"
    NO_FLAIR_LESION = "outside every FLAIR lesion"


@dataclass(frozen=True)
class GuardSettings:
    min_volume_mm3: float = 10.0
    surface_margin_mm: float = 3.0
    flair_margin_mm: float = 2.0
    flair_overlap_fraction: float = 0.5
    require_flair_lesion: bool = True


@dataclass(frozen=True)
class CandidateReview:
    """What the guard saw and did: how many candidates, how many removed and why."""

    candidates: int
    removed: dict[str, int] = field(default_factory=dict)  # RemovalReason value -> count
    checked_against_flair: bool = False
    settings: GuardSettings = GuardSettings()

    @property
    def kept(self) -> int:
        return self.candidates - sum(self.removed.values())

    def summary(self) -> str:
        """One sentence for the report."""
        if not any(self.removed.values()):
            return f"all {self.candidates} candidate(s) passed the plausibility checks"
        parts = [f"{n} {reason}" for reason, n in self.removed.items() if n]
        return (
            f"{sum(self.removed.values())} of {self.candidates} candidate(s) removed as not "
            f"plausible: {', '.join(parts)}"
        )


def _surface_rim(
    brain: np.ndarray, spacing_kji: tuple[float, float, float], margin_mm: float
) -> np.ndarray:
    """Brain voxels closer than `margin_mm` to the outside of the brain mask."""
    if margin_mm <= 0:
        return np.zeros_like(brain, dtype=bool)
    depth = ndimage.distance_transform_edt(brain, sampling=spacing_kji)
    return brain & (depth <= margin_mm)


def _grown(
    mask: np.ndarray, spacing_kji: tuple[float, float, float], margin_mm: float
) -> np.ndarray:
    if margin_mm <= 0:
        return mask
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing_kji)
    return distance <= margin_mm


def guard_candidates(
    labels: ImageVolume,
    lesions: list[Lesion],
    brain_mask: ImageVolume,
    flair_lesions: ImageVolume | None,
    settings: GuardSettings,
) -> tuple[ImageVolume, list[Lesion], CandidateReview]:
    """Keep the plausible candidates of `labels` (ids as in `lesions`, on the working grid).

    `brain_mask` is on the same grid; `flair_lesions` is the study's FLAIR lesion mask on any
    grid of the same patient space (it is resampled here), or None when there is no FLAIR.
    """
    if brain_mask.array.shape != labels.array.shape:
        raise ValueError("the brain mask is not on the candidates' grid")
    spacing_kji = tuple(reversed(labels.spacing_mm))
    label_array = np.asarray(labels.array)
    rim = _surface_rim(brain_mask.array > 0, spacing_kji, settings.surface_margin_mm)  # type: ignore[arg-type]
    checked = flair_lesions is not None and settings.require_flair_lesion
    allowed = None
    if checked:
        assert flair_lesions is not None
        on_grid = resample_to_grid(
            flair_lesions.with_array((flair_lesions.array > 0).astype(np.uint8)),
            Grid.of(labels),
            interpolation=Interpolation.NEAREST,
        )
        allowed = _grown(on_grid.array > 0, spacing_kji, settings.flair_margin_mm)  # type: ignore[arg-type]

    count = len(lesions)
    ids = np.arange(1, count + 1)
    in_rim = ndimage.sum_labels(rim, label_array, ids) if count else np.zeros(0)
    in_flair = (
        ndimage.sum_labels(allowed, label_array, ids) if count and allowed is not None else None
    )
    removed = {
        reason.value: 0
        for reason in RemovalReason
        if checked or reason != RemovalReason.NO_FLAIR_LESION
    }
    keep = []
    for index, lesion in enumerate(lesions):
        if lesion.volume_ml * 1000.0 < settings.min_volume_mm3:
            removed[RemovalReason.TOO_SMALL.value] += 1
        elif in_rim[index] * 2 > lesion.voxel_count:
            removed[RemovalReason.AT_SURFACE.value] += 1
        elif (
            in_flair is not None
            and in_flair[index] < settings.flair_overlap_fraction * lesion.voxel_count
        ):
            removed[RemovalReason.NO_FLAIR_LESION.value] += 1
        else:
            keep.append(lesion.lesion_id)
    kept_labels, kept_lesions = select_lesions(labels, keep)
    return kept_labels, kept_lesions, CandidateReview(count, removed, checked, settings)
