"""N4 bias-field correction (SimpleITK), fitted on a shrunken image and applied at full size."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from lesionwatch.dicom_io.image_volume import ImageVolume

__all__ = ["correct_bias_field"]

# The bias field is smooth, so fitting it on voxels of about this size loses nothing and is
# much faster: on a 0.72x0.72x4 mm clinical FLAIR the fit took ~12 s with 2.9 mm voxels and
# ~4.5 s with 4.3 mm voxels (2 cores); ~25 s at full resolution.
_FIT_SPACING_MM = 4.5


def correct_bias_field(
    volume: ImageVolume,
    *,
    mask: ImageVolume | None = None,
    shrink_factor: int = 8,
    iterations: Sequence[int] = (50, 50, 30),
) -> ImageVolume:
    """N4-correct `volume`; returns float32 on the same grid.

    The field is fitted on an image shrunk by up to `shrink_factor` per axis (never coarser
    than ~4.5 mm voxels, so thick-slice axes are not shrunk), inside `mask` when given or
    inside an Otsu foreground otherwise, then evaluated on the full-resolution grid.
    """
    if shrink_factor < 1:
        raise ValueError(f"shrink_factor must be >= 1, got {shrink_factor}")
    image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    array = volume.array.astype(np.float32)
    if not np.isfinite(array).all() or array.max() <= array.min():
        raise ValueError("N4 needs a finite, non-constant image")
    # N4 works on positive intensities (it models log(I)); shift if the input has negatives.
    offset = float(min(0.0, array.min()))
    if offset < 0:
        image = image - offset
    factors = [
        max(1, min(shrink_factor, int(_FIT_SPACING_MM // spacing))) for spacing in volume.spacing_mm
    ]
    small = sitk.Shrink(image, factors)
    if mask is None:
        small_mask = sitk.OtsuThreshold(small, 0, 1, 200)
    else:
        if not mask.same_grid(volume):
            raise ValueError("the N4 mask must lie on the grid of the image it corrects")
        small_mask = sitk.Shrink(sitk.Cast(mask.to_sitk() > 0, sitk.sitkUInt8), factors)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(n) for n in iterations])
    n4.Execute(small, small_mask)
    log_bias = n4.GetLogBiasFieldAsImage(image)
    corrected = image / sitk.Exp(log_bias)
    if offset < 0:
        corrected = corrected + offset
    return ImageVolume.from_sitk(sitk.Cast(corrected, sitk.sitkFloat32))
