"""N4 on a phantom with a known smooth multiplicative bias."""

from __future__ import annotations

import numpy as np
import pytest

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.steps.bias_correction import correct_bias_field


def phantom_with_bias() -> tuple[ImageVolume, np.ndarray]:
    k, j, i = np.meshgrid(np.arange(24), np.arange(64), np.arange(64), indexing="ij")
    radius = np.sqrt(((i - 32) / 28.0) ** 2 + ((j - 32) / 28.0) ** 2 + ((k - 12) / 11.0) ** 2)
    tissue = radius < 1.0
    truth = np.where(tissue, np.where(radius < 0.5, 600.0, 400.0), 0.0)
    bias = np.exp(0.35 * (i / 63.0 - 0.5) + 0.25 * (k / 23.0 - 0.5))  # smooth, +-20 %
    rng = np.random.default_rng(1)
    array = (truth * bias + rng.normal(0.0, 5.0, truth.shape) * tissue).astype(np.float32)
    volume = ImageVolume(array=array, spacing_mm=(1.0, 1.0, 3.0), origin_mm=(0.0, 0.0, 0.0))
    return volume, tissue & (radius >= 0.55)


def coefficient_of_variation(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


def test_n4_flattens_a_smooth_bias_and_keeps_the_grid() -> None:
    volume, outer_tissue = phantom_with_bias()
    corrected = correct_bias_field(volume)
    assert corrected.same_grid(volume)
    assert corrected.array.dtype == np.float32
    before = coefficient_of_variation(volume.array[outer_tissue])
    after = coefficient_of_variation(corrected.array[outer_tissue])
    assert after < 0.5 * before, (before, after)


def test_n4_refuses_a_constant_image_and_a_mask_on_another_grid() -> None:
    volume, _ = phantom_with_bias()
    with pytest.raises(ValueError, match="non-constant"):
        correct_bias_field(volume.with_array(np.ones_like(volume.array)))
    other = ImageVolume(np.ones((4, 4, 4), np.uint8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="grid"):
        correct_bias_field(volume, mask=other)
