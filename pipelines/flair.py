"""The FLAIR lesion pipeline: preprocess -> sliding-window U-Net -> lesions -> source grid.

Lesions are found and measured on the isotropic working grid and mapped back onto the source
FLAIR grid as `pipelines.lesion_inference` describes. Every step's wall time is recorded.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np

from lesionwatch.config.schema import InferenceConfig, PipelineConfig
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import ModelCard, ModelCardMismatchError
from lesionwatch.pipelines.lesion_inference import (
    LesionSegmentation,
    check_isotropic_card,
    segment_on_working_grid,
)
from lesionwatch.pipelines.preprocess import preprocess

__all__ = ["FLAIR_CHANNELS", "FlairResult", "run_flair_pipeline"]

# channels this pipeline can feed a network, in the names model cards use
FLAIR_CHANNELS = ("flair", "t1")

# mask/labels/probability on the source FLAIR grid, lesions measured on the working grid
FlairResult: TypeAlias = LesionSegmentation


def _check_card(card: ModelCard, t1: ImageVolume | None) -> None:
    if card.task != "flair":
        raise ModelCardMismatchError(
            f"the FLAIR pipeline got a model card for task {card.task!r} (version {card.version})"
        )
    channels = card.architecture.channels
    unknown = [name for name in channels if name not in FLAIR_CHANNELS]
    if unknown or "flair" not in channels:
        raise ModelCardMismatchError(
            f"model card channels {list(channels)} cannot be provided by the FLAIR pipeline "
            f"(it provides {list(FLAIR_CHANNELS)} and needs 'flair')"
        )
    if "t1" in channels and t1 is None:
        raise ModelCardMismatchError(
            f"model card {card.version} needs a T1 channel but the study has no T1 series"
        )
    check_isotropic_card(card)


def run_flair_pipeline(
    flair: ImageVolume,
    t1: ImageVolume | None,
    model: UNet3D,
    card: ModelCard,
    inference_cfg: InferenceConfig,
    pipeline_cfg: PipelineConfig,
) -> FlairResult:
    """Segment FLAIR lesions of one study; results on the source FLAIR grid plus a lesion table."""
    _check_card(card, t1)
    channels = card.architecture.channels
    prepared = preprocess(flair, t1=t1 if "t1" in channels else None, spacing_mm=card.spacing_mm[0])
    timings = {f"preprocess.{step.name}": step.seconds for step in prepared.steps}
    image = np.stack([prepared.channels[name].array for name in channels]).astype(np.float32)
    return segment_on_working_grid(
        image, prepared, model, card, inference_cfg, pipeline_cfg, timings
    )
