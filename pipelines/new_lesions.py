"""The new-lesion pipeline: lesions present on the current FLAIR and absent on the prior one.

Both FLAIRs are preprocessed (N4, isotropic working grid, brain mask, z-score), the prior is
registered onto the current one (affine by default), and `pipelines.channels.build_channels`
makes the network input exactly as in training: prior and current z-scored in the current
brain, plus their difference. Lesions are measured on the working grid; mask, labels and
probability come back on the current FLAIR's source grid.
"""

from __future__ import annotations

from typing import TypeAlias

from lesionwatch.config.schema import InferenceConfig, NewLesionsPipelineConfig, PipelineConfig
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import ModelCard
from lesionwatch.pipelines.channels import TASK_CHANNELS, build_channels
from lesionwatch.pipelines.lesion_inference import (
    LesionSegmentation,
    RegistrationName,
    check_task_card,
    prepare_registered_pair,
    segment_on_working_grid,
)

__all__ = ["NEW_LESIONS_CHANNELS", "NewLesionsResult", "run_new_lesions_pipeline"]

NEW_LESIONS_CHANNELS = TASK_CHANNELS["new_lesions"]

# mask/labels/probability on the current FLAIR's source grid, lesions on the working grid
NewLesionsResult: TypeAlias = LesionSegmentation


def run_new_lesions_pipeline(
    prior_flair: ImageVolume,
    current_flair: ImageVolume,
    model: UNet3D,
    card: ModelCard,
    inference_cfg: InferenceConfig,
    pipeline_cfg: PipelineConfig,
    registration: RegistrationName | None = None,
) -> NewLesionsResult:
    """Segment lesions new since the prior FLAIR, on the current FLAIR's grid.

    `registration` (prior -> current) defaults to `pipeline_cfg.registration` when that is a
    `NewLesionsPipelineConfig`, else to "affine".
    """
    check_task_card(card, "new_lesions", "new-lesion", NEW_LESIONS_CHANNELS)
    if registration is None:
        registration = (
            pipeline_cfg.registration
            if isinstance(pipeline_cfg, NewLesionsPipelineConfig)
            else "affine"
        )
    pair = prepare_registered_pair(
        prior_flair,
        current_flair,
        spacing_mm=card.spacing_mm[0],
        registration=registration,
        names=("prior", "current"),
    )
    current = pair.fixed
    image = build_channels(
        "new_lesions",
        {"prior_flair_registered": pair.moving_registered, "current_flair": pair.fixed_image},
        current.brain_mask,
    )
    return segment_on_working_grid(
        image, current, model, card, inference_cfg, pipeline_cfg, pair.timings_s
    )
