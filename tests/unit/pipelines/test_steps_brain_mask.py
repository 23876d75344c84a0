"""Brain extraction on real clinical FLAIR (with skull) and on skull-stripped MNI FLAIR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.steps.brain_mask import BrainMaskError, extract_brain_mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_mask_of_raw_clinical_flair_matches_the_reference(test_data: Path) -> None:
    patient = test_data / "open_ms_data" / "longitudinal" / "patient01"
    flair_path = patient / "study1_FLAIR.nii.gz"
    flair = ImageVolume.load(flair_path)
    mask = extract_brain_mask(flair)  # raw, not bias-corrected: must still work
    assert mask.same_grid(flair)
    assert mask.array.dtype == np.uint8
    # The reference brain mask lives in a common space; the ITK transform maps common-space
    # points to raw-FLAIR points, so its inverse brings the mask onto the raw grid.
    transform = sitk.ReadTransform(str(patient / "study1_FLAIR_to_common_space.txt"))
    reference = sitk.Resample(
        sitk.ReadImage(str(patient / "brainmask_common_space.nii.gz")),
        flair.to_sitk(),
        transform.GetInverse(),
        sitk.sitkNearestNeighbor,
        0,
    )
    score = dice(mask.array > 0, sitk.GetArrayFromImage(reference) > 0)
    assert score >= 0.93, score  # 0.95 after N4 (tests/benchmarks/eval_brain_mask.py)
    volume_ml = mask.array.sum() * flair.voxel_volume_mm3 / 1000.0
    assert 1100 < volume_ml < 1600
    assert ndimage.label(mask.array)[1] == 1


def test_skull_stripped_input_keeps_its_nonzero_region(test_data: Path) -> None:
    flair = ImageVolume.load(test_data / "open_ms_data/cross_sectional/patient07/FLAIR.nii.gz")
    mask = extract_brain_mask(flair)
    nonzero = ndimage.binary_fill_holes(np.abs(flair.array) > 1e-6)
    assert dice(mask.array > 0, nonzero) > 0.99


def test_no_brain_is_a_clear_error() -> None:
    empty = ImageVolume(np.zeros((10, 40, 40), np.float32), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0))
    with pytest.raises(BrainMaskError, match="no positive voxels"):
        extract_brain_mask(empty)
    small = np.zeros((10, 40, 40), np.float32)
    small[4:6, 10:14, 10:14] = 100.0
    with pytest.raises(BrainMaskError, match="implausibly small"):
        extract_brain_mask(empty.with_array(small))
