"""The new-lesion pipeline on a real FLAIR pair with a known answer: the prior moved by a
known rigid transform, the current with one painted lesion; a U-Net of known output
(a threshold on the difference channel) must find that lesion and nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from known_unet import difference_threshold_unet
from moved_pairs import SPACING_MM, moved_pair

from lesionwatch.config.schema import InferenceConfig, NewLesionsPipelineConfig, PipelineConfig
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import ModelCardMismatchError, load_model, save_model
from lesionwatch.pipelines.new_lesions import NEW_LESIONS_CHANNELS, run_new_lesions_pipeline

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


def test_the_painted_lesion_and_only_it_is_found_on_the_current_grid(tmp_path: Path) -> None:
    pair = moved_pair("FLAIR.nii.gz", "FLAIR.nii.gz")
    model, card = _save_and_load(
        tmp_path, difference_threshold_unet(3.0, 8.0), NEW_LESIONS_CHANNELS
    )
    config = NewLesionsPipelineConfig(threshold=0.5, min_lesion_volume_mm3=20.0)
    result = run_new_lesions_pipeline(pair.earlier, pair.later, model, card, INFERENCE, config)

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
    assert {"inference", "postprocess", "to_source_grid"} <= set(result.timings_s)
    assert any(name.startswith("preprocess.prior.") for name in result.timings_s)
    assert any(name.startswith("preprocess.current.") for name in result.timings_s)


def test_cards_that_do_not_fit_the_new_lesion_pipeline_are_refused(tmp_path: Path) -> None:
    flair = ImageVolume(np.zeros((4, 4, 4), dtype=np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    config = (InferenceConfig(device="cpu"), PipelineConfig())
    net = UNet3D(3, depth=3, base_width=2)
    model, card = _save_and_load(tmp_path, net, NEW_LESIONS_CHANNELS, task="enhancing")
    with pytest.raises(ModelCardMismatchError, match="task 'enhancing'.*needs task 'new_lesions'"):
        run_new_lesions_pipeline(flair, flair, model, card, *config)
    swapped = ("current_flair", "prior_flair_registered", "difference")
    model, card = _save_and_load(tmp_path, net, swapped)
    with pytest.raises(ModelCardMismatchError, match="cannot be provided by the new-lesion"):
        run_new_lesions_pipeline(flair, flair, model, card, *config)
    model, card = _save_and_load(tmp_path, UNet3D(1, depth=3, base_width=2), ("flair",))
    with pytest.raises(ModelCardMismatchError, match="provides exactly"):
        run_new_lesions_pipeline(flair, flair, model, card, *config)
    model, card = _save_and_load(tmp_path, net, NEW_LESIONS_CHANNELS, spacing_mm=(1.0, 1.0, 3.0))
    with pytest.raises(ModelCardMismatchError, match="not isotropic"):
        run_new_lesions_pipeline(flair, flair, model, card, *config)
