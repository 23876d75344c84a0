"""Z-score intensity normalisation inside the brain (Duong 2019, Wahlig 2023)."""

from __future__ import annotations

import numpy as np

from lesionwatch.dicom_io.image_volume import ImageVolume

__all__ = ["NormalisationError", "zscore_in_mask"]


class NormalisationError(ValueError):
    """The mask leaves nothing (or nothing varying) to normalise."""


def zscore_in_mask(
    image: ImageVolume, mask: ImageVolume, *, outside_value: float = 0.0
) -> ImageVolume:
    """(x - mean) / std over the voxels of `mask`; voxels outside the mask get `outside_value`
    (0, the background of the skull-stripped training data). Returns float32."""
    if not image.same_grid(mask):
        raise NormalisationError("image and brain mask must lie on the same grid")
    inside = mask.array > 0
    if not inside.any():
        raise NormalisationError("brain mask is empty")
    values = image.array[inside].astype(np.float64)
    mean, std = float(values.mean()), float(values.std())
    if not np.isfinite(std) or std <= 0:
        raise NormalisationError(f"image is constant inside the brain mask (std={std})")
    out = np.full(image.array.shape, outside_value, dtype=np.float32)
    out[inside] = ((values - mean) / std).astype(np.float32)
    return image.with_array(out)
