"""The enhancing-lesion pipeline: lesions that light up on T1 after gadolinium.

Both T1s are preprocessed (N4, isotropic working grid, brain mask, z-score), the
pre-contrast T1 is rigidly registered onto the post-contrast one (same session: only patient
motion between them), and `pipelines.channels.build_channels` makes the network input exactly as
in training: pre and post z-scored in the post-contrast brain, plus post minus pre. Lesions
are measured on the working grid; mask, labels and probability come back on the T1-post
source grid.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from lesionwatch.config.schema import EnhancingPipelineConfig, InferenceConfig, PipelineConfig
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import ModelCard
from lesionwatch.pipelines.channels import TASK_CHANNELS, build_channels
from lesionwatch.pipelines.enhancing_guard import GuardSettings, guard_candidates
from lesionwatch.pipelines.lesion_inference import (
    LesionSegmentation,
    check_task_card,
    prepare_registered_pair,
    segment_on_working_grid,
)
from lesionwatch.pipelines.postprocess import Lesion

__all__ = ["ENHANCING_CHANNELS", "EnhancingResult", "guard_settings", "run_enhancing_pipeline"]

ENHANCING_CHANNELS = TASK_CHANNELS["enhancing"]

# mask/labels/probability on the T1-post source grid, lesions on the working grid
EnhancingResult: TypeAlias = LesionSegmentation


def run_enhancing_pipeline(
    t1_pre: ImageVolume,
    t1_post: ImageVolume,
    model: UNet3D,
    card: ModelCard,
    inference_cfg: InferenceConfig,
    pipeline_cfg: PipelineConfig,
    flair_lesions: ImageVolume | None = None,
) -> EnhancingResult:
    """Segment gadolinium-enhancing lesions, on the T1-post grid.

    `flair_lesions`: the study's FLAIR lesion mask (any grid of the same patient space), the
    guard's reference; None when the study has no FLAIR (the result is then unconfirmed).
    """
    check_task_card(card, "enhancing", "enhancing-lesion", ENHANCING_CHANNELS)
    pair = prepare_registered_pair(
        t1_pre,
        t1_post,
        spacing_mm=card.spacing_mm[0],
        registration="rigid",
        names=("t1_pre", "t1_post"),
    )
    post = pair.fixed
    image = build_channels(
        "enhancing",
        {"t1_pre": pair.moving_registered, "t1_post": pair.fixed_image},
        post.brain_mask,
    )
    settings = guard_settings(pipeline_cfg)

    def check(labels: ImageVolume, lesions: list[Lesion]) -> tuple[ImageVolume, list[Lesion], Any]:
        return guard_candidates(labels, lesions, post.brain_mask, flair_lesions, settings)

    return segment_on_working_grid(
        image, post, model, card, inference_cfg, pipeline_cfg, pair.timings_s, check
    )


def guard_settings(pipeline_cfg: PipelineConfig) -> GuardSettings:
    """The guard as configured (defaults for a plain PipelineConfig)."""
    if not isinstance(pipeline_cfg, EnhancingPipelineConfig):
        return GuardSettings()
    return GuardSettings(
        min_volume_mm3=pipeline_cfg.guard_min_volume_mm3,
        surface_margin_mm=pipeline_cfg.surface_margin_mm,
        flair_margin_mm=pipeline_cfg.flair_margin_mm,
        flair_overlap_fraction=pipeline_cfg.flair_overlap_fraction,
        require_flair_lesion=pipeline_cfg.require_flair_lesion,
    )
