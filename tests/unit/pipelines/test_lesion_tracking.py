"""Lesion tracking on hand-made label volumes with a known answer for every rule."""

from __future__ import annotations

import numpy as np
import pytest

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.lesion_tracking import ChangeStatus, TrackingSettings, track_lesions
from lesionwatch.pipelines.postprocess import lesion_table

SHAPE = (40, 40, 40)


def _volume(cubes: list[tuple[tuple[int, int, int], int]]) -> ImageVolume:
    """A 1 mm grid with cubes (corner kji, edge voxels) labelled in the given order."""
    array = np.zeros(SHAPE, dtype=np.uint8)
    for (k, j, i), edge in cubes:
        array[k : k + edge, j : j + edge, i : i + edge] = 1
    return ImageVolume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def _track(prior_cubes, current_cubes, settings=None):
    from lesionwatch.pipelines.postprocess import label_components

    volumes = {}
    for name, cubes in (("prior", prior_cubes), ("current", current_cubes)):
        mask = _volume(cubes)
        labels, _ = label_components(mask.array > 0, 1.0, 0.0)
        volumes[name] = (mask.with_array(labels), lesion_table(mask))
    (prior_labels, prior_lesions), (current_labels, current_lesions) = (
        volumes["prior"],
        volumes["current"],
    )
    return (
        track_lesions(current_labels, current_lesions, prior_labels, prior_lesions, settings),
        current_lesions,
    )


def _status_at(result, lesions, corner) -> ChangeStatus:
    """The status of the current lesion whose bounding box starts at `corner` (kji)."""
    for tracked, lesion in zip(result.lesions, lesions, strict=True):
        if lesion.bbox_min_ijk[::-1] == corner:
            return tracked.status
    raise AssertionError(f"no lesion at {corner}")


def test_each_status_by_its_rule() -> None:
    prior = [
        ((2, 2, 2), 4),  # 64 mm3 -> same size: stable
        ((2, 20, 2), 3),  # 27 mm3 -> 64 mm3 (+137 %, +0.037 mL): enlarging
        ((20, 2, 2), 5),  # 125 mm3 -> 27 mm3: shrinking
        ((30, 30, 30), 3),  # gone: disappeared
    ]
    current = [
        ((2, 2, 2), 4),
        ((2, 20, 2), 4),
        ((20, 2, 2), 3),
        ((20, 20, 20), 3),  # nothing there before: new
    ]
    result, lesions = _track(prior, current)
    assert _status_at(result, lesions, (2, 2, 2)) is ChangeStatus.STABLE
    assert _status_at(result, lesions, (2, 20, 2)) is ChangeStatus.ENLARGING
    assert _status_at(result, lesions, (20, 2, 2)) is ChangeStatus.SHRINKING
    assert _status_at(result, lesions, (20, 20, 20)) is ChangeStatus.NEW
    assert result.counts == {
        "new": 1,
        "enlarging": 1,
        "stable": 1,
        "shrinking": 1,
        "disappeared": 1,
    }
    assert result.active
    assert result.prior_lesion_count == 4
    assert result.disappeared[0].volume_ml == pytest.approx(0.027)


def test_growth_must_pass_both_the_relative_and_the_absolute_rule() -> None:
    # 8 -> 27 mm3: +237 % but only +0.019 mL
    prior, current = [((5, 5, 5), 2)], [((5, 5, 5), 3)]
    lenient, lesions = _track(prior, current, TrackingSettings(enlarging_absolute_ml=0.01))
    assert _status_at(lenient, lesions, (5, 5, 5)) is ChangeStatus.ENLARGING
    strict, lesions = _track(prior, current, TrackingSettings(enlarging_absolute_ml=0.05))
    assert _status_at(strict, lesions, (5, 5, 5)) is ChangeStatus.STABLE
    # 1000 -> 1331 mm3: +0.33 mL but only +33 %
    prior, current = [((5, 5, 5), 10)], [((5, 5, 5), 11)]
    result, lesions = _track(prior, current)
    assert _status_at(result, lesions, (5, 5, 5)) is ChangeStatus.STABLE
    relaxed, lesions = _track(prior, current, TrackingSettings(enlarging_relative=0.3))
    assert _status_at(relaxed, lesions, (5, 5, 5)) is ChangeStatus.ENLARGING
    assert not result.active


def test_the_margin_absorbs_misalignment_and_no_more() -> None:
    prior = [((10, 10, 10), 4)]
    shifted = [((10, 10, 15), 4)]  # one empty voxel between them
    result, lesions = _track(prior, shifted, TrackingSettings(match_margin_mm=0.0))
    assert _status_at(result, lesions, (10, 10, 15)) is ChangeStatus.NEW
    assert result.counts["disappeared"] == 1
    result, lesions = _track(prior, shifted, TrackingSettings(match_margin_mm=2.0))
    assert _status_at(result, lesions, (10, 10, 15)) is ChangeStatus.STABLE
    assert result.counts["disappeared"] == 0


def test_merged_prior_lesions_are_compared_by_their_summed_volume() -> None:
    prior = [((10, 10, 10), 3), ((10, 10, 16), 3)]  # 2 x 27 mm3
    current = [((10, 10, 10), 3), ((10, 10, 13), 3), ((10, 10, 16), 3)]  # one 81 mm3 bar
    result, _ = _track(prior, current)
    (tracked,) = result.lesions
    assert tracked.prior_volume_ml == pytest.approx(0.054)
    assert tracked.prior_lesion_ids == (1, 2)
    assert tracked.status is ChangeStatus.ENLARGING  # 54 -> 81 mm3: +50 % exactly counts
    assert result.counts["disappeared"] == 0


def test_grids_must_match_and_settings_are_checked() -> None:
    a = _volume([])
    b = ImageVolume(np.zeros(SHAPE, np.int32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="share a grid"):
        track_lesions(a, [], b, [])
    with pytest.raises(ValueError):
        TrackingSettings(enlarging_relative=0)
    with pytest.raises(ValueError):
        TrackingSettings(match_margin_mm=-1)
    empty = track_lesions(a, [], a, [])
    assert empty.counts["new"] == 0 and not empty.active


def test_stricter_checks_for_new_use_the_prior_probability_and_the_brightening() -> None:
    from lesionwatch.pipelines.postprocess import label_components

    current_mask = _volume([((10, 10, 10), 4)])
    labels, _ = label_components(current_mask.array > 0, 1.0, 0.0)
    current_labels = current_mask.with_array(labels)
    current_lesions = lesion_table(current_mask)
    no_prior = current_mask.with_array(np.zeros(SHAPE, np.int32))
    # the prior model saw it faintly (0.3 < 0.5, so no prior lesion), and it brightened 0.8 SD
    faint = current_mask.with_array((current_mask.array * 0.3).astype(np.float32))
    brighter = current_mask.with_array((current_mask.array * 0.8).astype(np.float32))

    def status(settings: TrackingSettings) -> ChangeStatus:
        result = track_lesions(
            current_labels, current_lesions, no_prior, [], settings,
            prior_probability=faint, difference=brighter,
        )  # fmt: skip
        return result.lesions[0].status

    assert status(TrackingSettings()) is ChangeStatus.NEW
    assert status(TrackingSettings(new_max_prior_probability=0.5)) is ChangeStatus.NEW
    assert status(TrackingSettings(new_max_prior_probability=0.25)) is ChangeStatus.STABLE
    assert status(TrackingSettings(new_min_difference_sd=0.5)) is ChangeStatus.NEW
    assert status(TrackingSettings(new_min_difference_sd=1.0)) is ChangeStatus.STABLE
    with pytest.raises(ValueError, match="needs the prior's lesion probability"):
        track_lesions(
            current_labels, current_lesions, no_prior, [],
            TrackingSettings(new_max_prior_probability=0.25),
        )  # fmt: skip
    with pytest.raises(ValueError, match="needs the difference image"):
        track_lesions(
            current_labels, current_lesions, no_prior, [],
            TrackingSettings(new_min_difference_sd=1.0),
        )  # fmt: skip
