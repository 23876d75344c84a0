"""The enhancing guard's three rules, each candidate counted once under the first it fails."""

from __future__ import annotations

import numpy as np
import pytest

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.enhancing_guard import GuardSettings, RemovalReason, guard_candidates
from lesionwatch.pipelines.postprocess import label_lesions

SHAPE = (40, 40, 40)  # (Z, Y, X) at 1 mm


def _volume(array: np.ndarray) -> ImageVolume:
    return ImageVolume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def _cube(array: np.ndarray, corner: tuple[int, int, int], edge: int) -> None:
    z, y, x = corner
    array[z : z + edge, y : y + edge, x : x + edge] = 1


@pytest.fixture
def case() -> tuple[ImageVolume, list, ImageVolume, ImageVolume]:  # type: ignore[type-arg]
    brain = np.zeros(SHAPE, dtype=np.uint8)
    brain[2:38, 2:38, 2:38] = 1
    candidates = np.zeros(SHAPE, dtype=np.float32)
    _cube(candidates, (18, 18, 18), 3)  # 27 mm3 in the parenchyma, inside a FLAIR lesion
    _cube(candidates, (18, 26, 18), 3)  # 27 mm3 in the parenchyma, 4 mm from the FLAIR lesion
    _cube(candidates, (2, 18, 18), 3)  # 27 mm3 at the brain's edge (dura, a surface vein)
    _cube(candidates, (10, 10, 10), 2)  # 8 mm3: below the floor
    flair = np.zeros(SHAPE, dtype=np.uint8)
    _cube(flair, (17, 17, 17), 6)  # one FLAIR lesion around the first candidate
    labels, lesions = label_lesions(_volume(candidates), 0.5)
    return labels, lesions, _volume(brain), _volume(flair)


def test_each_rule_removes_what_it_is_for_and_counts_it(case) -> None:  # type: ignore[no-untyped-def]
    labels, lesions, brain, flair = case
    kept_labels, kept, review = guard_candidates(labels, lesions, brain, flair, GuardSettings())
    assert [k.voxel_count for k in kept] == [27]
    assert kept[0].centroid_lps_mm == pytest.approx((19.0, 19.0, 19.0))
    assert set(np.unique(kept_labels.array)) == {0, 1}
    assert review.candidates == 4 and review.kept == 1 and review.checked_against_flair
    assert review.removed == {
        RemovalReason.TOO_SMALL.value: 1,
        RemovalReason.AT_SURFACE.value: 1,
        RemovalReason.NO_FLAIR_LESION.value: 1,
    }
    assert review.summary().startswith("3 of 4 candidate(s) removed as not plausible")


def test_most_of_a_candidate_must_lie_in_the_grown_flair_lesion(case) -> None:  # type: ignore[no-untyped-def]
    """The second candidate starts 4 mm from the FLAIR lesion: grown by 4 mm the lesion holds
    a third of it (a vessel passing by), grown by 5 mm two thirds (motion between series)."""
    labels, lesions, brain, flair = case
    _, kept, _ = guard_candidates(labels, lesions, brain, flair, GuardSettings(flair_margin_mm=4))
    assert len(kept) == 1
    wide = GuardSettings(flair_margin_mm=5.0)
    _, kept, review = guard_candidates(labels, lesions, brain, flair, wide)
    assert len(kept) == 2 and review.removed[RemovalReason.NO_FLAIR_LESION.value] == 0


def test_without_a_flair_only_size_and_surface_apply(case) -> None:  # type: ignore[no-untyped-def]
    labels, lesions, brain, _ = case
    _, kept, review = guard_candidates(labels, lesions, brain, None, GuardSettings())
    assert len(kept) == 2 and not review.checked_against_flair
    assert RemovalReason.NO_FLAIR_LESION.value not in review.removed
