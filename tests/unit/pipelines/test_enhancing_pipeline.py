"""The enhancing-lesion pipeline on the real T1 / T1POST pair of one patient: the pre-contrast
T1 moved by a known rigid transform, one enhancing lesion painted into the post-contrast T1,
a U-Net of known output (a threshold on the post-minus-pre channel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from known_unet import difference_threshold_unet
from moved_pairs import PATIENT07, SPACING_MM, moved_pair

from lesionwatch.config.schema import EnhancingPipelineConfig, InferenceConfig, PipelineConfig
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import ModelCardMismatchError, load_model, save_model
from lesionwatch.pipelines.enhancing import ENHANCING_CHANNELS, run_enhancing_pipeline
from lesionwatch.pipelines.enhancing_guard import RemovalReason

THRESHOLD_Z = 5.0
LARGEST_LESION_INDEX = (98, 100, 61)  # (i, j, k): inside patient07's largest expert lesion


def _save_and_load(tmp_path: Path, model: UNet3D, channels: tuple[str, ...], task: str):
    weights = tmp_path / f"{task}-{'-'.join(channels)}.pt"
    save_model(
        model, weights, task=task, channels=channels, version="test",  # type: ignore[arg-type]
        training_data="none: weights set by hand for a plumbing test",
        spacing_mm=(SPACING_MM,) * 3, patch_size_mm=64,
    )  # fmt: skip
    return load_model(weights, task, channels)


def _true_enhancement_z(point_lps: tuple[float, float, float]) -> float:
    """Largest post-minus-pre z difference within 2 voxels of a point, computed on the
    original co-registered T1 / T1POST (no registration, no painted lesion)."""
    images = [
        sitk.ReadImage(str(PATIENT07 / f), sitk.sitkFloat32) for f in ("T1.nii.gz", "T1POST.nii.gz")
    ]
    arrays = [sitk.GetArrayFromImage(image) for image in images]
    brain = (arrays[0] > 0) & (arrays[1] > 0)
    z = [(a - a[brain].mean()) / a[brain].std() for a in arrays]
    i, j, k = np.rint(images[0].TransformPhysicalPointToContinuousIndex(point_lps)).astype(int)
    window = (slice(k - 2, k + 3), slice(j - 2, j + 3), slice(i - 2, i + 3))
    return float((z[1][window] - z[0][window]).max())


def test_the_painted_lesion_is_found_and_the_rest_is_real_enhancement(tmp_path: Path) -> None:
    pair = moved_pair("T1.nii.gz", "T1POST.nii.gz")
    model, card = _save_and_load(
        tmp_path, difference_threshold_unet(THRESHOLD_Z, 8.0), ENHANCING_CHANNELS, "enhancing"
    )
    config = PipelineConfig(threshold=0.5, min_lesion_volume_mm3=20.0)
    inference = InferenceConfig(device="cpu", patch_size_mm=64, step_mm=64, batch_size=2)
    result = run_enhancing_pipeline(pair.earlier, pair.later, model, card, inference, config)

    for volume in (
        result.mask_source_grid,
        result.labels_source_grid,
        result.probability_source_grid,
    ):
        assert volume.same_grid(pair.later)
    mask = result.mask_source_grid.array > 0
    assert mask[pair.sphere].all()
    painted = [
        lesion
        for lesion in result.lesions
        if np.linalg.norm(np.subtract(lesion.centroid_lps_mm, pair.sphere_centre_lps)) < 1.0
    ]
    assert len(painted) == 1
    assert painted[0].volume_ml == pytest.approx(pair.sphere_ml, rel=0.1)
    # Patient07's T1POST has real enhancement (venous sinuses, vessels): every other finding
    # must sit where the original, co-registered pair enhances too.
    others = [lesion for lesion in result.lesions if lesion is not painted[0]]
    for lesion in others:
        assert _true_enhancement_z(lesion.centroid_lps_mm) > THRESHOLD_Z - 1.5, lesion
    assert "registration.rigid" in result.timings_s


def test_the_guard_keeps_an_enhancing_lesion_in_a_flair_lesion_and_removes_the_rest(
    tmp_path: Path,
) -> None:
    """Real patient07 T1/T1POST: a lesion painted into its largest expert FLAIR lesion, and
    the real enhancement of vessels and sinuses that a synthetic-trained model also finds.
    With the expert FLAIR lesion mask as the study's FLAIR lesions, only the painted lesion
    stays, and every other candidate is counted as removed."""
    pair = moved_pair(
        "T1.nii.gz", "T1POST.nii.gz", centre_index=LARGEST_LESION_INDEX, radius_mm=4.0
    )
    flair_lesions = ImageVolume.load(PATIENT07 / "lesion_mask.nii.gz")
    assert flair_lesions.array[LARGEST_LESION_INDEX[::-1]] > 0
    model, card = _save_and_load(
        tmp_path, difference_threshold_unet(THRESHOLD_Z, 8.0), ENHANCING_CHANNELS, "enhancing"
    )
    config = EnhancingPipelineConfig(threshold=0.5, min_lesion_volume_mm3=3.0)
    inference = InferenceConfig(device="cpu", patch_size_mm=64, step_mm=64, batch_size=2)
    unchecked = run_enhancing_pipeline(pair.earlier, pair.later, model, card, inference, config)
    checked = run_enhancing_pipeline(
        pair.earlier, pair.later, model, card, inference, config, flair_lesions=flair_lesions
    )

    [kept] = checked.lesions
    assert np.linalg.norm(np.subtract(kept.centroid_lps_mm, pair.sphere_centre_lps)) < 2.0
    assert (checked.mask_source_grid.array > 0)[pair.sphere].mean() > 0.9
    review = checked.review
    assert review.checked_against_flair and review.kept == 1
    outside = review.removed[RemovalReason.NO_FLAIR_LESION.value]
    assert outside >= 1 and review.candidates == 1 + sum(review.removed.values())
    # Without a FLAIR the same candidates pass the size and surface rules only: unconfirmed.
    assert not unchecked.review.checked_against_flair
    assert RemovalReason.NO_FLAIR_LESION.value not in unchecked.review.removed
    assert len(unchecked.lesions) > len(checked.lesions)


def test_cards_that_do_not_fit_the_enhancing_pipeline_are_refused(tmp_path: Path) -> None:
    t1 = ImageVolume(np.zeros((4, 4, 4), dtype=np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    config = (InferenceConfig(device="cpu"), PipelineConfig())
    net = UNet3D(3, depth=3, base_width=2)
    channels = ("prior_flair_registered", "current_flair", "difference")
    model, card = _save_and_load(tmp_path, net, channels, "new_lesions")
    with pytest.raises(ModelCardMismatchError, match="task 'new_lesions'.*needs task 'enhancing'"):
        run_enhancing_pipeline(t1, t1, model, card, *config)
    model, card = _save_and_load(tmp_path, net, channels, "enhancing")
    with pytest.raises(ModelCardMismatchError, match="cannot be provided by the enhancing-lesion"):
        run_enhancing_pipeline(t1, t1, model, card, *config)
