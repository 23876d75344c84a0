"""One image type for the whole project: voxels plus exact patient-space geometry.

Conventions (those of SimpleITK/ITK, so conversions are lossless):
- `array` is indexed ``[k, j, i]`` (slice, row, column); `spacing_mm`, `origin_mm` and the
  columns of `direction` are given in ``(i, j, k)`` order.
- Patient coordinates are DICOM LPS millimetres. `direction[:, a]` is the unit vector of
  index axis `a` in LPS. The position of voxel (i, j, k) is
  ``origin + direction @ (spacing * (i, j, k))``.
NIfTI files store RAS; the conversion happens only at the file boundary (SimpleITK does it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

__all__ = ["ImageVolume"]


@dataclass(frozen=True)
class ImageVolume:
    array: npt.NDArray[Any]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: npt.NDArray[np.float64] = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"ImageVolume needs a 3-D array, got shape {self.array.shape}")
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        object.__setattr__(self, "origin_mm", tuple(float(o) for o in self.origin_mm))
        if min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing_mm}")

    # --- geometry -------------------------------------------------------------------------
    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def affine_lps(self) -> npt.NDArray[np.float64]:
        """4x4 matrix mapping (i, j, k, 1) to LPS millimetres."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * np.asarray(self.spacing_mm)[None, :]
        affine[:3, 3] = self.origin_mm
        return affine

    @property
    def affine_ras(self) -> npt.NDArray[np.float64]:
        """4x4 matrix mapping (i, j, k, 1) to RAS millimetres (the NIfTI/nibabel convention)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing_mm))

    def index_to_lps(self, ijk: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map (..., 3) continuous indices (i, j, k) to LPS millimetres."""
        points = np.asarray(ijk, dtype=np.float64)
        return points @ (self.direction * np.asarray(self.spacing_mm)[None, :]).T + np.asarray(
            self.origin_mm
        )

    def same_grid(self, other: ImageVolume, tolerance_mm: float = 1e-3) -> bool:
        """True when both volumes sample exactly the same points in patient space."""
        return self.array.shape == other.array.shape and bool(
            np.allclose(self.affine_lps, other.affine_lps, atol=tolerance_mm)
        )

    def with_array(self, array: npt.NDArray[Any]) -> ImageVolume:
        """The same grid carrying other voxels (a mask, a probability map)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match grid {self.array.shape}")
        return replace(self, array=array)

    # --- conversions ----------------------------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin_mm)
        image.SetDirection(tuple(self.direction.flatten()))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> ImageVolume:
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing_mm=image.GetSpacing(),
            origin_mm=image.GetOrigin(),
            direction=np.asarray(image.GetDirection()).reshape(3, 3),
        )

    def to_ants(self) -> Any:
        """An ANTsImage with the same geometry (ANTs also works in LPS, indexed i, j, k)."""
        import ants

        return ants.from_numpy(
            np.ascontiguousarray(self.array.transpose(2, 1, 0)).astype(np.float32),
            origin=list(self.origin_mm),
            spacing=list(self.spacing_mm),
            direction=self.direction.copy(),
        )

    @classmethod
    def from_ants(cls, image: Any) -> ImageVolume:
        return cls(
            array=np.ascontiguousarray(image.numpy().transpose(2, 1, 0)),
            spacing_mm=tuple(image.spacing),
            origin_mm=tuple(image.origin),
            direction=np.asarray(image.direction).reshape(3, 3),
        )

    @classmethod
    def load(cls, path: str | Path) -> ImageVolume:
        """Read NIfTI/NRRD/MHA (anything SimpleITK reads) into LPS geometry."""
        return cls.from_sitk(sitk.ReadImage(str(path)))

    def save(self, path: str | Path) -> None:
        sitk.WriteImage(self.to_sitk(), str(path), useCompression=str(path).endswith(".gz"))
