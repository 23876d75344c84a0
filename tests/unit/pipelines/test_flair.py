"""The FLAIR pipeline's plumbing on a real FLAIR crop, and its refusal of unfitting cards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from known_unet import intensity_threshold_unet

from lesionwatch.config.schema import InferenceConfig, PipelineConfig
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import ModelCardMismatchError, load_model, save_model
from lesionwatch.pipelines.flair import run_flair_pipeline
from lesionwatch.pipelines.postprocess import label_lesions
from lesionwatch.pipelines.preprocess import preprocess

PATIENT07 = Path(__file__).resolve().parents[2] / "data/open_ms_data/cross_sectional/patient07"


def _save_and_load(tmp_path: Path, model: UNet3D, channels: tuple[str, ...], task: str = "flair"):
    weights = tmp_path / f"{task}-{len(channels)}.pt"
    save_model(
        model, weights, task=task, channels=channels, version="test",  # type: ignore[arg-type]
        training_data="none: weights set by hand for a plumbing test",
    )  # fmt: skip
    return load_model(weights, task, channels)


def _clinical_like_flair() -> ImageVolume:
    """A crop of the real FLAIR around lesions, resampled to 1 x 1 x 3 mm like a 2-D FLAIR."""
    image = sitk.ReadImage(str(PATIENT07 / "FLAIR.nii.gz"))[50:130, 60:150, 40:100]
    size = [image.GetSize()[0], image.GetSize()[1], image.GetSize()[2] // 3]
    thick = sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
        (1.0, 1.0, 3.0), image.GetDirection(), 0.0, sitk.sitkFloat32,
    )  # fmt: skip
    return ImageVolume.from_sitk(thick)


def test_pipeline_result_is_the_known_answer_on_the_source_grid(tmp_path: Path) -> None:
    model, card = _save_and_load(tmp_path, intensity_threshold_unet(2.0, 4.0), ("flair",))
    flair = _clinical_like_flair()
    pipeline_cfg = PipelineConfig(threshold=0.5, min_lesion_volume_mm3=3.0)
    inference_cfg = InferenceConfig(device="cpu", patch_size_mm=32, step_mm=16, batch_size=2)
    result = run_flair_pipeline(flair, None, model, card, inference_cfg, pipeline_cfg)

    # the same answer computed directly from the preprocessed image
    prepared = preprocess(flair)
    z = torch.from_numpy(prepared.image.array.astype(np.float32))
    expected_probability = torch.sigmoid(4.0 * (z.clamp(min=0) - 2.0)).numpy()
    labels_1mm, lesions = label_lesions(
        prepared.image.with_array(expected_probability), 0.5, pipeline_cfg.min_lesion_volume_mm3
    )
    expected_mask = prepared.to_source_grid(labels_1mm, is_label=True).array > 0

    for volume in (
        result.mask_source_grid,
        result.labels_source_grid,
        result.probability_source_grid,
    ):
        assert volume.same_grid(flair)
    assert len(lesions) > 0
    assert len(result.lesions) == pytest.approx(len(lesions), abs=1)
    total_ml = sum(lesion.volume_ml for lesion in result.lesions)
    assert total_ml == pytest.approx(sum(lesion.volume_ml for lesion in lesions), rel=0.02)
    assert np.mean((result.mask_source_grid.array > 0) == expected_mask) > 0.999
    probability = result.probability_source_grid.array
    assert probability.min() >= 0.0 and probability.max() <= 1.0
    ids = {lesion.lesion_id for lesion in result.lesions}
    assert set(np.unique(result.labels_source_grid.array).tolist()) - {0} <= ids
    assert np.array_equal(result.mask_source_grid.array > 0, result.labels_source_grid.array > 0)
    assert all(lesion.volume_ml * 1000 >= 3.0 for lesion in result.lesions)
    assert {"inference", "postprocess", "to_source_grid"} <= set(result.timings_s)
    assert any(name.startswith("preprocess.") for name in result.timings_s)


def test_cards_for_other_tasks_or_missing_inputs_are_refused(tmp_path: Path) -> None:
    flair = ImageVolume(np.zeros((4, 4, 4), dtype=np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    config = (InferenceConfig(device="cpu"), PipelineConfig())
    net = UNet3D(1, depth=3, base_width=2)
    model, card = _save_and_load(tmp_path, net, ("flair",), task="enhancing")
    with pytest.raises(ModelCardMismatchError, match="task 'enhancing'"):
        run_flair_pipeline(flair, None, model, card, *config)
    model, card = _save_and_load(tmp_path, UNet3D(2, depth=3, base_width=2), ("flair", "t1"))
    with pytest.raises(ModelCardMismatchError, match="needs a T1 channel"):
        run_flair_pipeline(flair, None, model, card, *config)
    channels = ("prior_flair", "current_flair", "difference")
    model, card = _save_and_load(tmp_path, UNet3D(3, depth=3, base_width=2), channels)
    with pytest.raises(ModelCardMismatchError, match="cannot be provided by the FLAIR pipeline"):
        run_flair_pipeline(flair, None, model, card, *config)
