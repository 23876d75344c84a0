"""Elastic augmentation on a 48 mm cube of a real FLAIR (patient07) and its lesion mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import ndimage

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.augmentation import (
    AugmentationSettings,
    SpatialTransform,
    extract_patch,
    random_transform,
    source_coordinates,
)

PATCH = (32, 32, 32)


@pytest.fixture(scope="module")
def volume(test_data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAIR (1, 48, 48, 48) scaled to unit SD and the lesion mask, around a lesion."""
    folder = test_data / "open_ms_data" / "cross_sectional" / "patient07"
    flair = ImageVolume.load(folder / "FLAIR.nii.gz").array.astype(np.float32)
    mask = ImageVolume.load(folder / "lesion_mask.nii.gz").array > 0
    labels, _ = ndimage.label(mask)
    biggest = np.bincount(labels.ravel())[1:].argmax() + 1
    centre = np.round(ndimage.center_of_mass(labels == biggest)).astype(int)
    box = tuple(slice(int(c) - 24, int(c) + 24) for c in centre)
    image = flair[box] / flair[flair > 0].std()
    return torch.from_numpy(image[None].copy()), torch.from_numpy(mask[box].astype(np.uint8))


def test_identity_transform_gives_the_plain_patch(volume: tuple[torch.Tensor, torch.Tensor]):
    image, label = volume
    start = (5, 9, 13)
    plain_image, plain_label = extract_patch(image, label, start, PATCH)
    assert torch.equal(plain_image, image[:, 5:37, 9:41, 13:45])
    warped_image, warped_label = extract_patch(
        image, label, start, PATCH, SpatialTransform.identity()
    )
    assert torch.allclose(warped_image, plain_image, atol=1e-4)
    assert torch.equal(warped_label, plain_label)
    assert int(plain_label.sum()) > 50  # the cube holds a real lesion


def test_identity_coordinates_are_the_slice_indices():
    coords = source_coordinates(SpatialTransform.identity(), (20, 21, 22), (4, 4, 4))
    assert coords[0, 0, 0].tolist() == [18.0, 19.0, 20.0]
    assert coords[3, 2, 1].tolist() == [21.0, 21.0, 21.0]


def test_random_transform_keeps_label_binary_and_changes_the_image(
    volume: tuple[torch.Tensor, torch.Tensor],
):
    image, label = volume
    generator = torch.Generator().manual_seed(3)
    transform = random_transform(AugmentationSettings(), PATCH, (1.0, 1.0, 1.0), generator)
    warped_image, warped_label = extract_patch(image, label, (8, 8, 8), PATCH, transform)
    plain_image, _ = extract_patch(image, label, (8, 8, 8), PATCH)
    assert warped_image.shape == (1, *PATCH) and warped_label.shape == PATCH
    assert set(warped_label.unique().tolist()) <= {0, 1}
    assert warped_label.dtype == torch.int64
    assert float((warped_image - plain_image).abs().mean()) > 0.05


def test_image_and_label_stay_aligned(volume: tuple[torch.Tensor, torch.Tensor]):
    """A ball drawn both as a label and as an image channel lands on the same voxels."""
    image, _ = volume
    k, j, i = np.meshgrid(*(np.arange(48) for _ in range(3)), indexing="ij")
    ball = ((k - 22) ** 2 + (j - 25) ** 2 + (i - 24) ** 2 <= 7**2).astype(np.float32)
    stacked = torch.cat([image, torch.from_numpy(ball)[None]])
    label = torch.from_numpy(ball.astype(np.uint8))
    generator = torch.Generator().manual_seed(11)
    settings = AugmentationSettings(rotation_deg=25.0, deformation_sd_mm=3.0)
    for _ in range(3):
        transform = random_transform(settings, PATCH, (1.0, 1.0, 1.0), generator)
        warped, warped_label = extract_patch(stacked, label, (8, 8, 8), PATCH, transform)
        as_image = (warped[1] >= 0.5).numpy()
        as_label = warped_label.numpy() > 0
        dice = 2 * (as_image & as_label).sum() / (as_image.sum() + as_label.sum())
        assert dice > 0.95
        shift = np.subtract(ndimage.center_of_mass(as_image), ndimage.center_of_mass(as_label))
        assert np.abs(shift).max() < 0.3


def test_determinism_per_generator_seed():
    a = random_transform(
        AugmentationSettings(), PATCH, (1.0, 1.0, 1.0), torch.Generator().manual_seed(5)
    )
    b = random_transform(
        AugmentationSettings(), PATCH, (1.0, 1.0, 1.0), torch.Generator().manual_seed(5)
    )
    assert torch.equal(a.matrix_kji, b.matrix_kji)
    assert a.displacement_kji is not None and b.displacement_kji is not None
    assert torch.equal(a.displacement_kji, b.displacement_kji)


def test_anisotropic_rotation_is_a_rotation_in_millimetres():
    settings = AugmentationSettings(
        rotation_deg=30, translation_mm=0, scale_range=(1, 1), deformation_sd_mm=0
    )
    spacing_ijk = (1.0, 1.0, 3.0)
    transform = random_transform(settings, PATCH, spacing_ijk, torch.Generator().manual_seed(2))
    scale = torch.diag(torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64))  # k, j, i
    rotation_mm = scale @ transform.matrix_kji @ torch.linalg.inv(scale)
    assert torch.allclose(rotation_mm @ rotation_mm.T, torch.eye(3, dtype=torch.float64))


def test_patch_past_the_volume_is_zero_padded(volume: tuple[torch.Tensor, torch.Tensor]):
    image, label = volume
    patch, patch_label = extract_patch(image, label, (30, 30, 30), PATCH)
    assert patch.shape == (1, *PATCH)
    assert float(patch[:, 18:].abs().sum()) == 0.0 and int(patch_label[18:].sum()) == 0


def test_bad_settings_are_rejected():
    with pytest.raises(ValidationError, match="scale_range"):
        AugmentationSettings(scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="same grid"):
        extract_patch(torch.zeros(1, 8, 8, 8), torch.zeros(8, 8, 7), (0, 0, 0), (4, 4, 4))


def test_intensity_augmentation_scales_the_brain_and_shifts_only_acquisitions() -> None:
    from lesionwatch.models.augmentation import augment_intensity

    patch = torch.zeros(3, 6, 6, 6)
    patch[0, 1:5, 1:5, 1:5] = 2.0  # acquisition inside the brain
    patch[1, 1:5, 1:5, 1:5] = 1.0
    patch[2, 1:5, 1:5, 1:5] = -1.0  # a difference channel
    settings = AugmentationSettings(intensity_scale_range=(0.5, 1.5), intensity_shift=0.4)
    out = augment_intensity(patch, settings, [True, True, False], torch.Generator().manual_seed(3))
    inside = (slice(1, 5),) * 3
    scale = float(out[2][inside].mean()) / -1.0  # the difference channel is only scaled
    shift = float(out[1][inside].mean()) - scale * 1.0
    assert 0.5 <= scale <= 1.5 and abs(shift) <= 0.4 and (scale, shift) != (1.0, 0.0)
    assert torch.allclose(out[0][inside], torch.full((4, 4, 4), 2.0 * scale + shift))
    assert (out[:, 0] == 0).all() and (out[:, 5] == 0).all()  # outside the brain stays 0
    # the default (off) leaves patches untouched
    same = augment_intensity(patch, AugmentationSettings(), [True] * 3, torch.Generator())
    assert same is patch
