"""Lesion tracking between two time points on one grid: new, enlarging, stable, shrinking.

Both label volumes lie on the current study's working grid (the prior's lesions were found on
the prior FLAIR registered onto it). A current lesion is matched to every prior lesion it
touches once the prior lesions are grown by `match_margin_mm` (what registration and
segmentation leave of misalignment at a lesion's edge). Then:

- no prior lesion touched: new;
- touched: its volume is compared with the volume of the prior lesions it touches. It is
  enlarging when it grew by at least `enlarging_relative` (0.5 = +50 %) AND by at least
  `enlarging_absolute_ml`, shrinking when it lost as much by the same two rules, else stable.
  Both rules must hold so that neither a tiny lesion's noise (a few voxels are +50 %) nor a
  large lesion's boundary jitter (0.05 mL of a 5 mL plaque) counts as change.

Two optional checks make "new" stricter, since a lesion the model finds now but scored just
below its threshold on the prior would otherwise be called new:
- `new_max_prior_probability`: the prior's lesion probability anywhere within the margin must
  stay below it (a lower threshold for "absent before" than for "present now": hysteresis);
- `new_min_difference_sd`: the lesion must have brightened, its mean current-minus-prior
  FLAIR (each z-scored in the current brain) at least this many SD.
A lesion that touches no prior lesion but fails a check is "stable" (it was there, faintly).

A prior lesion that touches no current lesion (same margin) disappeared. Two prior lesions
merging into one current lesion are compared by their summed volume; one prior lesion split
into two current ones is compared with each of them whole (the split halves are then usually
"shrinking" or "stable", never "new").
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.postprocess import Lesion

__all__ = [
    "ChangeStatus",
    "TrackedLesion",
    "TrackingResult",
    "TrackingSettings",
    "track_lesions",
]


class ChangeStatus(enum.StrEnum):
    NEW = "new"
    ENLARGING = "enlarging"
    STABLE = "stable"
    SHRINKING = "shrinking"


@dataclass(frozen=True)
class TrackingSettings:
    enlarging_relative: float = 0.5
    enlarging_absolute_ml: float = 0.01
    match_margin_mm: float = 1.0
    new_max_prior_probability: float = 1.0  # 1.0: no hysteresis
    new_min_difference_sd: float | None = None  # None: no brightening required

    def __post_init__(self) -> None:
        if self.enlarging_relative <= 0 or self.enlarging_absolute_ml < 0:
            raise ValueError("enlarging thresholds must be > 0 (relative) and >= 0 (absolute)")
        if self.match_margin_mm < 0:
            raise ValueError("match_margin_mm must be >= 0")
        if not 0.0 < self.new_max_prior_probability <= 1.0:
            raise ValueError("new_max_prior_probability must be in (0, 1]")


@dataclass(frozen=True)
class TrackedLesion:
    lesion_id: int  # the current lesion's id in the current label volume
    status: ChangeStatus
    volume_ml: float
    prior_volume_ml: float  # summed volume of the matched prior lesions (0 when new)
    prior_lesion_ids: tuple[int, ...]
    centroid_lps_mm: tuple[float, float, float]


@dataclass(frozen=True)
class TrackingResult:
    lesions: list[TrackedLesion]  # one per current lesion, in current id order
    disappeared: list[Lesion]  # prior lesions without a current counterpart
    prior_lesion_count: int
    prior_volume_ml: float
    settings: TrackingSettings

    def count(self, status: ChangeStatus) -> int:
        return sum(1 for lesion in self.lesions if lesion.status is status)

    @property
    def counts(self) -> dict[str, int]:
        counts = Counter(lesion.status.value for lesion in self.lesions)
        out = {status.value: counts.get(status.value, 0) for status in ChangeStatus}
        out["disappeared"] = len(self.disappeared)
        return out

    @property
    def active(self) -> bool:
        """Radiological activity: any new or enlarging lesion."""
        return any(
            lesion.status in (ChangeStatus.NEW, ChangeStatus.ENLARGING) for lesion in self.lesions
        )


def _grown(
    mask: npt.NDArray[np.bool_], spacing_mm: tuple[float, ...], margin_mm: float
) -> npt.NDArray[np.bool_]:
    if margin_mm <= 0:
        return mask
    # distance (mm) from every voxel to the nearest lesion voxel; voxels within the margin join
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing_mm)
    return np.asarray(distance <= margin_mm)


def _status(volume: float, prior: float, settings: TrackingSettings) -> ChangeStatus:
    if prior <= 0:
        return ChangeStatus.NEW
    growth = volume - prior
    if growth >= settings.enlarging_absolute_ml and growth >= settings.enlarging_relative * prior:
        return ChangeStatus.ENLARGING
    loss = -growth
    if loss >= settings.enlarging_absolute_ml and loss >= settings.enlarging_relative * prior:
        return ChangeStatus.SHRINKING
    return ChangeStatus.STABLE


def track_lesions(
    current_labels: ImageVolume,
    current_lesions: list[Lesion],
    prior_labels: ImageVolume,
    prior_lesions: list[Lesion],
    settings: TrackingSettings | None = None,
    *,
    prior_probability: ImageVolume | None = None,
    difference: ImageVolume | None = None,
) -> TrackingResult:
    """Each current lesion's change since the prior; every volume on the same grid.
    `prior_probability` and `difference` are needed by the checks that use them."""
    settings = settings or TrackingSettings()
    for name, other in (("prior", prior_labels), ("probability", prior_probability),
                        ("difference", difference)):  # fmt: skip
        if other is not None and not current_labels.same_grid(other):
            raise ValueError(f"current lesion labels and the {name} volume must share a grid")
    if settings.new_max_prior_probability < 1.0 and prior_probability is None:
        raise ValueError("new_max_prior_probability needs the prior's lesion probability")
    if settings.new_min_difference_sd is not None and difference is None:
        raise ValueError("new_min_difference_sd needs the difference image")
    spacing_kji = tuple(float(s) for s in current_labels.spacing_mm[::-1])
    current = np.asarray(current_labels.array, dtype=np.int64)
    prior = np.asarray(prior_labels.array, dtype=np.int64)
    prior_volume = {lesion.lesion_id: lesion.volume_ml for lesion in prior_lesions}

    # Prior ids each current lesion touches: grow each current lesion by the margin and read
    # the prior labels under it (done per lesion in its bounding box, plus the margin).
    pad = int(np.ceil(settings.match_margin_mm / min(spacing_kji))) + 1
    matched: dict[int, set[int]] = {}
    faint_before: set[int] = set()  # touch no prior lesion, yet fail a check for "new"
    for lesion in current_lesions:
        lo = [max(0, lesion.bbox_min_ijk[2 - a] - pad) for a in range(3)]
        hi = [min(current.shape[a], lesion.bbox_max_ijk[2 - a] + pad + 1) for a in range(3)]
        box = tuple(slice(lo[a], hi[a]) for a in range(3))
        grown = _grown(current[box] == lesion.lesion_id, spacing_kji, settings.match_margin_mm)
        touched = np.unique(prior[box][grown])
        matched[lesion.lesion_id] = {int(i) for i in touched if i > 0}
        if prior_probability is not None and (
            prior_probability.array[box][grown].max(initial=0.0)
            >= settings.new_max_prior_probability
        ):
            faint_before.add(lesion.lesion_id)
        if difference is not None and settings.new_min_difference_sd is not None:
            inside = current[box] == lesion.lesion_id
            if float(difference.array[box][inside].mean()) < settings.new_min_difference_sd:
                faint_before.add(lesion.lesion_id)

    tracked = []
    for lesion in current_lesions:
        ids = tuple(sorted(matched[lesion.lesion_id]))
        before = float(sum(prior_volume.get(i, 0.0) for i in ids))
        status = _status(lesion.volume_ml, before, settings)
        if status is ChangeStatus.NEW and lesion.lesion_id in faint_before:
            status = ChangeStatus.STABLE
        tracked.append(
            TrackedLesion(
                lesion_id=lesion.lesion_id,
                status=status,
                volume_ml=lesion.volume_ml,
                prior_volume_ml=before,
                prior_lesion_ids=ids,
                centroid_lps_mm=lesion.centroid_lps_mm,
            )
        )
    seen = set().union(*matched.values()) if matched else set()
    disappeared = [lesion for lesion in prior_lesions if lesion.lesion_id not in seen]
    return TrackingResult(
        lesions=tracked,
        disappeared=disappeared,
        prior_lesion_count=len(prior_lesions),
        prior_volume_ml=float(sum(prior_volume.values())),
        settings=settings,
    )
