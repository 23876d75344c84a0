"""The new-lesion pipeline on a real FLAIR pair with a known answer: the prior moved by a
known rigid transform, the current with one painted lesion; a U-Net of known output
(a threshold on the difference channel) must find that lesion and nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from known_unet import difference_threshold_unet, intensity_threshold_unet
from moved_pairs import SPACING_MM, moved_pair

from lesionwatch.config.schema import InferenceConfig, NewLesionsPipelineConfig, PipelineConfig
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import ModelCardMismatchError, load_model, save_model
from lesionwatch.pipelines.lesion_inference import HelperModel
from lesionwatch.pipelines.lesion_tracking import ChangeStatus
from lesionwatch.pipelines.new_lesions import (
    NEW_LESIONS_CHANNELS,
    analyse_change,
    register_prior,
    run_new_lesions_pipeline,
    select_new_lesions,
)

INFERENCE = InferenceConfig(device="cpu", patch_size_mm=64, step_mm=64, batch_size=2)


def _save_and_load(
    tmp_path: Path,
    model: UNet3D,
    channels: tuple[str, ...],
    task: str = "new_lesions",
    spacing_mm: tuple[float, float, float] = (SPACING_MM,) * 3,
):
    weights = tmp_path / f"{task}-{'-'.join(channels)}-{spacing_mm[2]}.pt"
    save_model(
        model, weights, task=task, channels=channels, version="test",  # type: ignore[arg-type]
        training_data="none: weights set by hand for a plumbing test", spacing_mm=spacing_mm,
        patch_size_mm=64,
    )  # fmt: skip
    return load_model(weights, task, channels)


def _flair_helper(tmp_path: Path, threshold_z: float = 3.0) -> HelperModel:
    """A FLAIR 'model' that flags voxels brighter than `threshold_z` SD in the brain."""
    model, card = _save_and_load(
        tmp_path, intensity_threshold_unet(threshold_z, 8.0), ("flair",), task="flair"
    )
    return HelperModel(model, card, PipelineConfig(min_lesion_volume_mm3=20.0))


def test_the_painted_lesion_and_only_it_is_found_on_the_current_grid(tmp_path: Path) -> None:
    pair = moved_pair("FLAIR.nii.gz", "FLAIR.nii.gz")
    model, card = _save_and_load(
        tmp_path, difference_threshold_unet(3.0, 8.0), NEW_LESIONS_CHANNELS
    )
    config = NewLesionsPipelineConfig(threshold=0.5, min_lesion_volume_mm3=20.0)
    result = run_new_lesions_pipeline(
        pair.earlier, pair.later, model, card, INFERENCE, config, _flair_helper(tmp_path)
    )

    for volume in (
        result.mask_source_grid,
        result.labels_source_grid,
        result.probability_source_grid,
    ):
        assert volume.same_grid(pair.later)
        assert volume.array.shape == pair.later.array.shape
        assert np.allclose(volume.affine_lps, pair.later.affine_lps)
    # the prior's real lesions are there too, and were registered away: one lesion is new
    assert len(result.lesions) == 1
    (lesion,) = result.lesions
    assert lesion.volume_ml == pytest.approx(pair.sphere_ml, rel=0.1)
    assert np.linalg.norm(np.subtract(lesion.centroid_lps_mm, pair.sphere_centre_lps)) < 1.0
    mask = result.mask_source_grid.array > 0
    dice = 2 * (mask & pair.sphere).sum() / (mask.sum() + pair.sphere.sum())
    assert dice > 0.9
    assert "registration.affine" in result.timings_s  # the config's default kind
    assert {"inference.subtraction", "inference.flair_both", "tracking", "to_source_grid"} <= set(
        result.timings_s
    )
    assert any(name.startswith("preprocess.prior.") for name in result.timings_s)
    assert any(name.startswith("preprocess.current.") for name in result.timings_s)
    # tracking: the bright sphere is a FLAIR lesion with nothing under it on the prior
    change = result.change
    assert change.reliable and change.similarity > 0.8
    new = [t for t in change.tracking.lesions if t.status is ChangeStatus.NEW]
    assert any(
        np.linalg.norm(np.subtract(t.centroid_lps_mm, pair.sphere_centre_lps)) < 2.0 for t in new
    )
    assert change.tracking.active


def _near_sphere(lesions, pair) -> list:
    return [
        lesion
        for lesion in lesions
        if np.linalg.norm(np.subtract(lesion.centroid_lps_mm, pair.sphere_centre_lps)) < 2.0
    ]


def test_tracking_methods_report_the_new_flair_lesion(tmp_path: Path) -> None:
    pair = moved_pair("FLAIR.nii.gz", "FLAIR.nii.gz")
    model, card = _save_and_load(
        tmp_path, difference_threshold_unet(3.0, 8.0), NEW_LESIONS_CHANNELS
    )
    flair = _flair_helper(tmp_path)
    config = NewLesionsPipelineConfig(method="tracking", min_lesion_volume_mm3=20.0)
    result = run_new_lesions_pipeline(
        pair.earlier, pair.later, model, card, INFERENCE, config, flair
    )
    (near,) = _near_sphere(result.lesions, pair)
    assert near.volume_ml == pytest.approx(pair.sphere_ml, rel=0.2)
    assert "inference.subtraction" not in result.timings_s  # tracking alone needs no U-Net
    assert result.change.reported_new_ids

    # the combinations, from one analysis: confirmed by both, the sphere and nothing else
    registered, analysis = register_prior(pair.earlier, pair.later, card, config)
    assert analysis.reliable
    evidence = analyse_change(registered, model, card, flair, INFERENCE, config)
    for method in ("confirmed", "tracking_confirmed"):
        _, _, lesions = select_new_lesions(evidence, method)
        assert len(_near_sphere(lesions, pair)) == 1 == len(lesions), method
    with pytest.raises(ValueError, match="unknown new-lesion method"):
        select_new_lesions(evidence, "guess")


def test_a_registration_below_the_similarity_floor_reports_no_lesion(tmp_path: Path) -> None:
    pair = moved_pair("FLAIR.nii.gz", "FLAIR.nii.gz")
    model, card = _save_and_load(
        tmp_path, difference_threshold_unet(3.0, 8.0), NEW_LESIONS_CHANNELS
    )
    config = NewLesionsPipelineConfig(min_registration_similarity=0.999)
    result = run_new_lesions_pipeline(
        pair.earlier, pair.later, model, card, INFERENCE, config, _flair_helper(tmp_path)
    )
    assert not result.change.reliable
    assert result.change.tracking is None
    assert result.lesions == [] and not result.mask_source_grid.array.any()
    assert result.mask_source_grid.same_grid(pair.later)
    assert "unreliable" in result.change.unreliable_reason()
    assert "inference.flair_both" not in result.timings_s  # nothing was segmented


def test_cards_that_do_not_fit_the_new_lesion_pipeline_are_refused(tmp_path: Path) -> None:
    flair = ImageVolume(np.zeros((4, 4, 4), dtype=np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    flair_helper = _flair_helper(tmp_path)
    config = (InferenceConfig(device="cpu"), PipelineConfig(), flair_helper)
    net = UNet3D(3, depth=3, base_width=2)
    model, card = _save_and_load(tmp_path, net, NEW_LESIONS_CHANNELS, task="enhancing")
    with pytest.raises(ModelCardMismatchError, match="task 'enhancing'.*needs task 'new_lesions'"):
        run_new_lesions_pipeline(flair, flair, model, card, *config)
    swapped = ("current_flair", "prior_flair_registered", "difference")
    model, card = _save_and_load(tmp_path, net, swapped)
    with pytest.raises(ModelCardMismatchError, match="cannot be provided by the new-lesion"):
        run_new_lesions_pipeline(flair, flair, model, card, *config)
    model, card = _save_and_load(tmp_path, UNet3D(1, depth=3, base_width=2), ("flair",))
    with pytest.raises(ModelCardMismatchError, match="provides one of"):
        run_new_lesions_pipeline(flair, flair, model, card, *config)
    model, card = _save_and_load(tmp_path, net, NEW_LESIONS_CHANNELS, spacing_mm=(1.0, 1.0, 3.0))
    with pytest.raises(ModelCardMismatchError, match="not isotropic"):
        run_new_lesions_pipeline(flair, flair, model, card, *config)
