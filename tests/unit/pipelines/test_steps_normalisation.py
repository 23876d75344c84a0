"""Z-score inside the brain mask."""

from __future__ import annotations

import numpy as np
import pytest

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.steps.normalisation import NormalisationError, zscore_in_mask


def make_volume(array: np.ndarray) -> ImageVolume:
    return ImageVolume(array=array, spacing_mm=(1.0, 1.0, 2.0), origin_mm=(0.0, 0.0, 0.0))


def test_zscore_has_mean_0_std_1_inside_and_0_outside() -> None:
    rng = np.random.default_rng(0)
    image = make_volume((rng.normal(300.0, 40.0, (10, 20, 20)) + 1000.0).astype(np.float32))
    mask_array = np.zeros((10, 20, 20), dtype=np.uint8)
    mask_array[2:8, 5:15, 4:16] = 1
    result = zscore_in_mask(image, image.with_array(mask_array))
    inside = mask_array > 0
    assert result.array.dtype == np.float32
    assert abs(float(result.array[inside].mean())) < 1e-5
    assert abs(float(result.array[inside].std()) - 1.0) < 1e-5
    assert (result.array[~inside] == 0).all()
    assert result.same_grid(image)


def test_zscore_refuses_bad_masks() -> None:
    image = make_volume(np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8))
    with pytest.raises(NormalisationError, match="empty"):
        zscore_in_mask(image, image.with_array(np.zeros((8, 8, 8), np.uint8)))
    with pytest.raises(NormalisationError, match="same grid"):
        zscore_in_mask(image, make_volume(np.ones((8, 8, 9), np.uint8)))
    constant = image.with_array(np.full((8, 8, 8), 5.0, np.float32))
    with pytest.raises(NormalisationError, match="constant"):
        zscore_in_mask(constant, image.with_array(np.ones((8, 8, 8), np.uint8)))
