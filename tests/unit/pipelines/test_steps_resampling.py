"""Grids and resampling: exact geometry on oblique, anisotropic and flipped inputs."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.steps.resampling import (
    CANONICAL_DIRECTION,
    Grid,
    Interpolation,
    isotropic_grid,
    resample_to_grid,
)

# Clinical-like source grids: 2D FLAIR with thick slices, tilted, and axis-flipped.
SOURCE_GRIDS = {
    "oblique_0.72x0.72x4": Grid(
        (64, 60, 14),
        (0.72, 0.72, 4.0),
        (-20.0, -15.0, -25.0),
        tuple(Rotation.from_euler("xyz", (14, -5, 9), degrees=True).as_matrix().flatten()),
    ),
    "flipped_0.9x1.1x3": Grid(
        (50, 44, 16),
        (0.9, 1.1, 3.0),
        (25.0, 30.0, 20.0),
        tuple(np.diag([-1.0, -1.0, -1.0]).flatten()),
    ),
    "permuted_sagittal": Grid(
        (18, 40, 46),
        (3.3, 1.0, 1.0),
        (0.0, -20.0, 25.0),
        tuple(np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]).T.flatten()),
    ),
}


def voxel_centres_lps(grid: Grid) -> npt.NDArray[np.float64]:
    """(k, j, i, 3) LPS positions of all voxel centres of `grid`."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape_kji], indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(np.float64)
    return ijk @ grid.affine_lps[:3, :3].T + np.asarray(grid.origin_mm)


def inside_sample_points(grid: Grid, points: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Points within the hull of `grid`'s voxel centres (where no extrapolation happens)."""
    inverse = np.linalg.inv(grid.affine_lps[:3, :3])
    ijk = (points - np.asarray(grid.origin_mm)) @ inverse.T
    return np.asarray(((ijk >= 0) & (ijk <= np.asarray(grid.size_ijk) - 1)).all(axis=-1))


def ramp(points: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    return (points @ np.array([0.3, -0.7, 1.1]) + 50.0).astype(np.float32)


@pytest.mark.parametrize("name", SOURCE_GRIDS)
def test_isotropic_grid_covers_the_source_field_of_view(name: str) -> None:
    source = SOURCE_GRIDS[name]
    grid = isotropic_grid(source, 1.0)
    assert grid.spacing_mm == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(grid.direction_matrix, CANONICAL_DIRECTION)
    # Every outer corner of the source lies inside the new grid's outer box.
    ijk = (source.corners_lps() - np.asarray(grid.origin_mm)) @ grid.direction_matrix
    assert (ijk >= -0.5 - 1e-6).all()
    assert (ijk <= np.asarray(grid.size_ijk) - 0.5 + 1e-6).all()
    # ... with at most one voxel of slack per axis.
    extent = np.ptp(source.corners_lps() @ grid.direction_matrix, axis=0)
    assert (np.asarray(grid.size_ijk) < extent + 2.0 + 1e-6).all()


def test_thick_slices_fall_on_working_voxel_centres() -> None:
    # Flipped axes, 2 x 3 x 4 mm voxels: every source centre must be a working-grid centre,
    # or nearest-neighbour label mapping has ties (and a systematic half-voxel shift).
    source = Grid(
        (30, 20, 12),
        (2.0, 3.0, 4.0),
        (10.0, 20.0, 30.0),
        tuple(np.diag([-1.0, -1.0, -1.0]).flatten()),
    )
    grid = isotropic_grid(source, 1.0)
    corners = np.array([[0, 0, 0], [29, 19, 11]], dtype=np.float64)
    points = corners @ source.affine_lps[:3, :3].T + np.asarray(source.origin_mm)
    ijk = (points - np.asarray(grid.origin_mm)) @ np.linalg.inv(grid.affine_lps[:3, :3]).T
    np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-9)


def test_isotropic_grid_can_keep_source_axes() -> None:
    source = SOURCE_GRIDS["oblique_0.72x0.72x4"]
    grid = isotropic_grid(source, 1.0, direction=None)
    np.testing.assert_allclose(grid.direction_matrix, source.direction_matrix)


@pytest.mark.parametrize("name", SOURCE_GRIDS)
def test_linear_resampling_puts_values_at_the_right_points(name: str) -> None:
    # Trilinear interpolation reproduces a linear function exactly, so any error in the
    # interior is a geometry error (a shift, a flip, a wrong axis order).
    source = SOURCE_GRIDS[name]
    volume = source.volume(ramp(voxel_centres_lps(source)))
    grid = isotropic_grid(source, 1.0)
    resampled = resample_to_grid(volume, grid, interpolation=Interpolation.LINEAR)
    assert Grid.of(resampled) == grid
    points = voxel_centres_lps(grid)
    inside = inside_sample_points(source, points)
    assert inside.sum() > 1000
    expected = ramp(points)
    np.testing.assert_allclose(resampled.array[inside], expected[inside], atol=1e-3)


@pytest.mark.parametrize("name", SOURCE_GRIDS)
def test_round_trip_returns_the_exact_source_grid(name: str) -> None:
    source = SOURCE_GRIDS[name]
    volume = source.volume(ramp(voxel_centres_lps(source)))
    there = resample_to_grid(
        volume, isotropic_grid(source, 1.0), interpolation=Interpolation.LINEAR
    )
    back = resample_to_grid(there, source, interpolation=Interpolation.LINEAR)
    assert Grid.of(back) == source
    assert back.same_grid(volume, tolerance_mm=1e-9)
    inside = ndimage.binary_erosion(back.array != 0, iterations=3)
    np.testing.assert_allclose(back.array[inside], volume.array[inside], atol=1e-3)


def test_nearest_keeps_label_dtype_and_values() -> None:
    source = SOURCE_GRIDS["flipped_0.9x1.1x3"]
    labels = np.zeros(source.shape_kji, dtype=np.uint16)
    labels[4:10, 10:30, 10:30] = 7
    resampled = resample_to_grid(
        source.volume(labels), isotropic_grid(source, 1.0), interpolation=Interpolation.NEAREST
    )
    assert resampled.array.dtype == np.uint16
    assert set(np.unique(resampled.array)) == {0, 7}


def test_grid_of_volume_matches_image_volume_geometry() -> None:
    volume = ImageVolume(
        array=np.zeros((3, 4, 5), dtype=np.float32),
        spacing_mm=(0.5, 0.6, 2.0),
        origin_mm=(1.0, 2.0, 3.0),
        direction=np.diag([1.0, -1.0, 1.0]),
    )
    grid = Grid.of(volume)
    assert grid.size_ijk == (5, 4, 3)
    np.testing.assert_allclose(grid.affine_lps, volume.affine_lps)
    assert grid.volume(volume.array).same_grid(volume)


def test_bad_inputs_are_refused() -> None:
    source = SOURCE_GRIDS["flipped_0.9x1.1x3"]
    with pytest.raises(ValueError, match="spacing_mm must be positive"):
        isotropic_grid(source, 0.0)
    with pytest.raises(ValueError, match="orthonormal"):
        isotropic_grid(source, 1.0, direction=np.diag([2.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="does not match grid"):
        source.volume(np.zeros((2, 2, 2)))
