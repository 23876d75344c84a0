"""Threshold, 26-connected components, minimum size in mm3, and the lesion table."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.postprocess import (
    label_lesions,
    lesion_table,
    longest_diameter_mm,
    write_lesion_table_csv,
)

OPEN_MS = Path(__file__).resolve().parents[2] / "data" / "open_ms_data" / "cross_sectional"


def _volume(
    array: np.ndarray, spacing_mm=(1.0, 1.0, 1.0), origin_mm=(0.0, 0.0, 0.0), direction=None
):
    return ImageVolume(array, spacing_mm, origin_mm, np.eye(3) if direction is None else direction)


def test_corner_touching_voxels_are_one_lesion() -> None:
    array = np.zeros((6, 6, 6), dtype=np.uint8)
    array[1, 1, 1] = array[2, 2, 2] = 1  # share only a corner: 26- but not 6-connected
    array[4, 4, 4] = 1
    lesions = lesion_table(_volume(array))
    assert [lesion.voxel_count for lesion in lesions] == [2, 1]


def test_minimum_size_is_in_cubic_millimetres() -> None:
    array = np.zeros((8, 8, 8), dtype=np.uint8)
    array[1, 1, 1:3] = 1  # 2 voxels of 1 x 1 x 3 mm = 6 mm3
    array[5, 5, 5] = 1  # 3 mm3
    grid = _volume(array, spacing_mm=(1.0, 1.0, 3.0))
    assert [lesion.volume_ml * 1000 for lesion in lesion_table(grid, min_volume_mm3=6.0)] == [
        pytest.approx(6.0)
    ]
    assert lesion_table(grid, min_volume_mm3=6.01) == []
    assert len(lesion_table(grid, min_volume_mm3=0)) == 2


def test_table_geometry_on_an_oblique_anisotropic_grid() -> None:
    array = np.zeros((10, 12, 14), dtype=np.uint8)  # [k, j, i]
    array[2:5, 3:7, 4:9] = 1  # a box: i 4..8, j 3..6, k 2..4
    spacing = (0.5, 0.8, 2.0)
    theta = np.deg2rad(20)
    direction = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    )
    grid = _volume(array, spacing, (-10.0, 5.0, 30.0), direction)
    (lesion,) = lesion_table(grid)
    assert lesion.lesion_id == 1 and lesion.voxel_count == 60
    assert lesion.volume_ml == pytest.approx(60 * 0.5 * 0.8 * 2.0 / 1000)
    assert lesion.bbox_min_ijk == (4, 3, 2) and lesion.bbox_max_ijk == (8, 6, 4)
    expected_centroid = grid.index_to_lps([6.0, 4.5, 3.0])
    np.testing.assert_allclose(lesion.centroid_lps_mm, expected_centroid, atol=1e-9)
    # farthest voxel centres are opposite corners of the box
    diagonal = math.sqrt((4 * 0.5) ** 2 + (3 * 0.8) ** 2 + (2 * 2.0) ** 2)
    assert lesion.longest_diameter_mm == pytest.approx(diagonal)


@pytest.mark.parametrize("shape", ["ball", "plate", "rod", "dot"])
def test_longest_diameter_equals_brute_force(shape: str) -> None:
    k, j, i = np.mgrid[0:24, 0:24, 0:24]
    if shape == "ball":  # many voxels: the convex-hull path
        mask = (k - 11.3) ** 2 + (j - 12) ** 2 + (i - 10.7) ** 2 <= 8.5**2
    elif shape == "plate":  # flat: no 3-D hull exists
        mask = (k == 5) & (j < 15) & (i < 12)
    elif shape == "rod":
        mask = (k == 3) & (j == 4) & (i < 20)
    else:
        mask = (k == 3) & (j == 4) & (i == 5)
    spacing = (0.7, 1.1, 1.9)
    grid = _volume(mask.astype(np.uint8), spacing)
    (lesion,) = lesion_table(grid)
    points = np.argwhere(mask)[:, ::-1] * np.asarray(spacing)
    expected = pdist(points).max() if len(points) > 1 else 0.0
    assert lesion.longest_diameter_mm == pytest.approx(expected)
    assert longest_diameter_mm(points) == pytest.approx(expected)


def test_label_lesions_thresholds_strictly_and_labels_match_the_table() -> None:
    probability = np.zeros((8, 8, 8), dtype=np.float32)
    probability[1, 1, 1:4] = [0.9, 0.6, 0.5]  # 0.5 is not above the threshold
    probability[6, 6, 6] = 0.51
    grid = _volume(probability, origin_mm=(3.0, 2.0, 1.0))
    labels, lesions = label_lesions(grid, threshold=0.5, min_volume_mm3=0.0)
    assert labels.same_grid(grid) and labels.array.dtype == np.int32
    assert sorted(np.unique(labels.array).tolist()) == [0, 1, 2]
    for lesion in lesions:
        assert (labels.array == lesion.lesion_id).sum() == lesion.voxel_count
    assert [lesion.voxel_count for lesion in lesions] == [2, 1]
    with pytest.raises(ValueError, match="threshold"):
        label_lesions(grid, threshold=1.0)


def test_empty_mask_has_no_lesions() -> None:
    labels, lesions = label_lesions(_volume(np.zeros((4, 4, 4), dtype=np.float32)))
    assert lesions == [] and not labels.array.any()


def test_real_consensus_mask_counts_as_published() -> None:
    """open_ms_data patient07: 37 lesions, 1.3 mL with 26-connectivity (see DATA.md)."""
    mask = ImageVolume.load(OPEN_MS / "patient07" / "lesion_mask.nii.gz")
    lesions = lesion_table(mask)
    assert len(lesions) == 37
    assert sum(lesion.volume_ml for lesion in lesions) == pytest.approx(1.3, abs=1e-6)
    for lesion in lesions:
        ijk = np.array(lesion.bbox_min_ijk), np.array(lesion.bbox_max_ijk)
        low, high = mask.index_to_lps(ijk[0]), mask.index_to_lps(ijk[1])
        centroid = np.array(lesion.centroid_lps_mm)
        assert np.all(centroid >= np.minimum(low, high) - 1e-6)
        assert np.all(centroid <= np.maximum(low, high) + 1e-6)
        assert lesion.longest_diameter_mm <= np.linalg.norm(high - low) + 1e-6


def test_csv_has_one_row_per_lesion(tmp_path: Path) -> None:
    array = np.zeros((6, 6, 6), dtype=np.uint8)
    array[1, 1, 1:3] = 1
    array[4, 4, 4] = 1
    lesions = lesion_table(_volume(array, origin_mm=(-1.0, -2.0, -3.0)))
    path = tmp_path / "lesions.csv"
    write_lesion_table_csv(lesions, path)
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["lesion_id"]) for row in rows] == [1, 2]
    assert float(rows[0]["volume_ml"]) == pytest.approx(0.002)
    assert float(rows[0]["centroid_l_mm"]) == pytest.approx(0.5)
    assert (rows[0]["bbox_min_i"], rows[0]["bbox_max_i"], rows[0]["bbox_max_k"]) == ("1", "2", "1")
    assert float(rows[0]["longest_diameter_mm"]) == pytest.approx(1.0)
