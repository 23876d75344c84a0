"""Sampling grids and resampling between them (SimpleITK, identity transform in LPS space).

A `Grid` is the geometry of an `ImageVolume` without its voxels. Steps record the grids they
read and wrote, so a result computed on the working grid can be put back onto the exact grid
of the source DICOM series.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from lesionwatch.dicom_io.image_volume import ImageVolume

__all__ = [
    "CANONICAL_DIRECTION",
    "Grid",
    "Interpolation",
    "isotropic_grid",
    "resample_to_grid",
]

# Direction of the MNI-space training data (open_ms_data cross-sectional, MSLesSeg) as read by
# SimpleITK: i -> left, j -> anterior, k -> superior. Working grids use it so a network sees
# arrays in the orientation it was trained on, whatever the orientation of the acquisition.
CANONICAL_DIRECTION: npt.NDArray[np.float64] = np.diag([1.0, -1.0, 1.0])


class Interpolation(enum.Enum):
    LINEAR = "linear"
    NEAREST = "nearest"
    BSPLINE = "bspline"

    @property
    def sitk_interpolator(self) -> int:
        return {
            Interpolation.LINEAR: sitk.sitkLinear,
            Interpolation.NEAREST: sitk.sitkNearestNeighbor,
            Interpolation.BSPLINE: sitk.sitkBSpline,
        }[self]


@dataclass(frozen=True)
class Grid:
    """Voxel grid in LPS millimetres: size, spacing and origin in (i, j, k) order."""

    size_ijk: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: tuple[float, ...]  # row-major 3x3, columns are the i, j, k axes

    @classmethod
    def of(cls, volume: ImageVolume) -> Grid:
        i, j, k = volume.shape_ijk
        return cls(
            size_ijk=(int(i), int(j), int(k)),
            spacing_mm=volume.spacing_mm,
            origin_mm=volume.origin_mm,
            direction=tuple(float(d) for d in volume.direction.flatten()),
        )

    @property
    def direction_matrix(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        i, j, k = self.size_ijk
        return (k, j, i)

    @property
    def affine_lps(self) -> npt.NDArray[np.float64]:
        affine = np.eye(4)
        affine[:3, :3] = self.direction_matrix * np.asarray(self.spacing_mm)[None, :]
        affine[:3, 3] = self.origin_mm
        return affine

    def corners_lps(self) -> npt.NDArray[np.float64]:
        """The 8 outer corners of the field of view (voxel edges, not centres), (8, 3)."""
        size = np.asarray(self.size_ijk, dtype=np.float64)
        corners = np.array(
            [[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64
        )
        ijk = corners * size - 0.5
        return ijk @ self.affine_lps[:3, :3].T + np.asarray(self.origin_mm)

    def volume(self, array: npt.NDArray[Any]) -> ImageVolume:
        """An ImageVolume on this grid carrying `array` (indexed [k, j, i])."""
        if tuple(array.shape) != self.shape_kji:
            raise ValueError(f"array shape {array.shape} does not match grid {self.shape_kji}")
        return ImageVolume(
            array=array,
            spacing_mm=self.spacing_mm,
            origin_mm=self.origin_mm,
            direction=self.direction_matrix,
        )

    def reference_sitk(self) -> sitk.Image:
        """An empty SimpleITK image with this geometry, for use as a resampling reference."""
        image = sitk.Image([int(s) for s in self.size_ijk], sitk.sitkUInt8)
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin_mm)
        image.SetDirection(self.direction)
        return image


def isotropic_grid(
    source: Grid,
    spacing_mm: float = 1.0,
    direction: npt.NDArray[np.float64] | None = CANONICAL_DIRECTION,
) -> Grid:
    """A grid of `spacing_mm` voxels along `direction` covering the source's field of view
    (at most one voxel of slack per axis). `direction=None` keeps the source's own (possibly
    oblique) axes."""
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    axes = source.direction_matrix if direction is None else np.asarray(direction, float)
    if not np.allclose(axes.T @ axes, np.eye(3), atol=1e-6):
        raise ValueError(f"grid direction must be orthonormal, got {axes.tolist()}")
    # Field of view of the source in the new axes' coordinates (relative to LPS origin).
    extent = source.corners_lps() @ axes  # (8, 3): coordinates along each new axis
    low, high = extent.min(axis=0), extent.max(axis=0)
    # The new voxel centres are placed on a lattice through the source's first voxel centre.
    # With axes parallel to the source's and a slice thickness that is a whole multiple of the
    # spacing (3, 4, 5 mm), source voxel centres then fall exactly on new voxel centres: no
    # nearest-neighbour ties, whose consistent rounding would shift labels by half a voxel.
    anchor = np.asarray(source.origin_mm) @ axes
    tolerance = 1e-6  # so exact multiples of the spacing do not gain a voxel from rounding
    before = np.ceil((anchor - (low + spacing_mm / 2.0)) / spacing_mm - tolerance)
    first_centre = anchor - before * spacing_mm
    last_needed = high - spacing_mm / 2.0
    size = [
        max(1, 1 + math.ceil((float(end) - float(start)) / spacing_mm - tolerance))
        for start, end in zip(first_centre, last_needed, strict=True)
    ]
    origin = axes @ first_centre
    return Grid(
        size_ijk=(size[0], size[1], size[2]),
        spacing_mm=(spacing_mm, spacing_mm, spacing_mm),
        origin_mm=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=tuple(float(d) for d in axes.flatten()),
    )


def resample_to_grid(
    volume: ImageVolume,
    grid: Grid,
    *,
    interpolation: Interpolation,
    default_value: float = 0.0,
) -> ImageVolume:
    """Sample `volume` at the voxel centres of `grid` (identity transform, LPS space).

    Linear and B-spline results are float32; nearest neighbour keeps the input dtype.
    """
    image = volume.to_sitk()
    if interpolation is not Interpolation.NEAREST:
        image = sitk.Cast(image, sitk.sitkFloat32)
    resampled = sitk.Resample(
        image,
        grid.reference_sitk(),
        sitk.Transform(),
        interpolation.sitk_interpolator,
        default_value,
        image.GetPixelID(),
    )
    return ImageVolume.from_sitk(resampled)
