"""Real image pairs with a known answer for the two-image pipelines (new, enhancing lesions).

The open_ms_data patient07 brain (MNI space, its FLAIR, T1 and T1POST co-registered) on a
2 mm grid: the later image gets a bright sphere painted in, the earlier one is moved by a
known rigid transform (rotation and shift) onto a grid of its own. A pipeline that registers
the earlier image back and thresholds the difference channel must find the sphere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from lesionwatch.dicom_io.image_volume import ImageVolume

PATIENT07 = Path(__file__).resolve().parents[2] / "data/open_ms_data/cross_sectional/patient07"
SPACING_MM = 2.0
SPHERE_CENTRE_INDEX = (100, 100, 78)  # voxel of the 1 mm MNI image, in white matter
SPHERE_RADIUS_MM = 6.0
# rotation about the sphere (degrees about x, y, z) and shift (mm) of the earlier image
MOTION_DEG = (3.0, -2.0, 4.0)
MOTION_MM = (2.0, -1.5, 1.0)


@dataclass(frozen=True)
class MovedPair:
    earlier: ImageVolume  # moved, on its own grid, no sphere
    later: ImageVolume  # with the sphere, on the 2 mm grid
    sphere: npt.NDArray[np.bool_]  # (Z, Y, X) on the later grid
    sphere_centre_lps: tuple[float, float, float]

    @property
    def sphere_ml(self) -> float:
        return float(self.sphere.sum()) * self.later.voxel_volume_mm3 / 1000.0


def _grid(like: sitk.Image, shift_mm: tuple[float, float, float]) -> sitk.Image:
    size = [
        round(n * s / SPACING_MM) for n, s in zip(like.GetSize(), like.GetSpacing(), strict=True)
    ]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((SPACING_MM,) * 3)
    grid.SetDirection(like.GetDirection())
    grid.SetOrigin(tuple(np.add(like.GetOrigin(), shift_mm) + 0.5))
    return grid


def _sphere(
    grid: sitk.Image, centre: npt.NDArray[np.float64], radius_mm: float
) -> npt.NDArray[np.bool_]:
    size = grid.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n) for n in reversed(size)), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(np.float64)
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    points = np.asarray(grid.GetOrigin()) + (ijk * grid.GetSpacing()) @ direction.T
    return np.linalg.norm(points - centre, axis=-1) <= radius_mm


def moved_pair(
    earlier_file: str,
    later_file: str,
    *,
    centre_index: tuple[int, int, int] = SPHERE_CENTRE_INDEX,
    radius_mm: float = SPHERE_RADIUS_MM,
) -> MovedPair:
    """`earlier_file` moved rigidly; `later_file` with a sphere at twice its 99th percentile
    (`centre_index` is a voxel of the 1 mm MNI image)."""
    earlier_1mm = sitk.ReadImage(str(PATIENT07 / earlier_file), sitk.sitkFloat32)
    later_1mm = sitk.ReadImage(str(PATIENT07 / later_file), sitk.sitkFloat32)
    centre = np.asarray(later_1mm.TransformContinuousIndexToPhysicalPoint(centre_index))

    later_grid = _grid(later_1mm, (0.0, 0.0, 0.0))
    later = sitk.Resample(later_1mm, later_grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    array = sitk.GetArrayFromImage(later)
    sphere = _sphere(later_grid, centre, radius_mm)
    array[sphere] = 2.0 * np.percentile(array[array > 0], 99)
    painted = sitk.GetImageFromArray(array)
    painted.CopyInformation(later)

    motion = sitk.Euler3DTransform()
    motion.SetCenter(tuple(centre))
    motion.SetRotation(*np.deg2rad(MOTION_DEG))
    motion.SetTranslation(MOTION_MM)
    earlier_grid = _grid(earlier_1mm, (-3.0, 4.0, 2.0))  # another field of view as well
    earlier = sitk.Resample(earlier_1mm, earlier_grid, motion, sitk.sitkLinear, 0.0)
    return MovedPair(
        ImageVolume.from_sitk(earlier),
        ImageVolume.from_sitk(painted),
        sphere,
        (float(centre[0]), float(centre[1]), float(centre[2])),
    )
