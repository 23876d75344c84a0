"""The new-lesion pipeline: what changed between the prior FLAIR and the current one.

Both FLAIRs are preprocessed (N4, isotropic working grid, brain mask, z-score) and the prior
is registered onto the current one (rigid, affine or SyN). The registration is checked: the
correlation of the two FLAIRs inside the current brain must reach
`min_registration_similarity`, else the comparison is unreliable and no lesion is reported.

Then, on the current working grid:
- the FLAIR model segments the current FLAIR and the registered prior, and
  `pipelines.lesion_tracking` gives each current lesion its change (new, enlarging, stable,
  shrinking) and counts the prior lesions that disappeared;
- the new-lesion U-Net sees prior, current and their difference (`build_channels`, as in
  training) when the method needs it;
- `method` picks the new lesions reported (see `NewLesionsPipelineConfig.method`).

New lesions come back on the current FLAIR's source grid; the tracking table uses the same
lesion ids as the FLAIR pipeline on the same study (same preprocessing, same model), which
is how the report attaches each status to its FLAIR lesion.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TypeAlias

import numpy as np

from lesionwatch.config.schema import (
    InferenceConfig,
    NewLesionsPipelineConfig,
    PipelineConfig,
)
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import ModelCard, ModelCardMismatchError
from lesionwatch.pipelines.channels import TASK_CHANNELS, build_channels, channel_options
from lesionwatch.pipelines.lesion_inference import (
    HelperModel,
    LesionSegmentation,
    RegisteredPair,
    check_isotropic_card,
    lesions_to_source_grid,
    predict_on_working_grid,
    prepare_registered_pair,
)
from lesionwatch.pipelines.lesion_tracking import (
    ChangeStatus,
    TrackingResult,
    TrackingSettings,
    track_lesions,
)
from lesionwatch.pipelines.postprocess import Lesion, label_lesions, select_lesions

__all__ = [
    "METHODS",
    "NEW_LESIONS_CHANNELS",
    "ChangeAnalysis",
    "ChangeEvidence",
    "NewLesionsResult",
    "analyse_change",
    "register_prior",
    "run_new_lesions_pipeline",
    "select_new_lesions",
    "subtraction_candidates",
]

NEW_LESIONS_CHANNELS = TASK_CHANNELS["new_lesions"]  # the default; see channel_options
METHODS = ("subtraction", "tracking", "confirmed", "tracking_confirmed")
_NEEDS_SUBTRACTION = {"subtraction", "confirmed", "tracking_confirmed"}

# mask/labels/probability on the current FLAIR's source grid, lesions on the working grid
NewLesionsResult: TypeAlias = LesionSegmentation


@dataclass(frozen=True)
class ChangeAnalysis:
    """What the report says about the comparison with the prior."""

    method: str
    registration: str
    similarity: float
    min_similarity: float
    tracking: TrackingResult | None  # None when unreliable
    # Current FLAIR lesions (tracking ids) that touch a reported new lesion: a lesion tracked
    # as new that the method did not report is left without a status in the report.
    reported_new_ids: frozenset[int] = frozenset()

    @property
    def reliable(self) -> bool:
        return self.similarity >= self.min_similarity

    def unreliable_reason(self) -> str:
        return (
            f"the prior FLAIR could not be aligned with the current one ({self.registration} "
            f"registration, similarity {self.similarity:.2f} below the required "
            f"{self.min_similarity:.2f}); the comparison is unreliable"
        )


@dataclass(frozen=True)
class ChangeEvidence:
    """Everything the methods choose from, on the current working grid."""

    pair: RegisteredPair
    current_probability: ImageVolume  # FLAIR model, current
    current_labels: ImageVolume
    current_lesions: list[Lesion]
    prior_probability: ImageVolume  # FLAIR model on the registered prior
    prior_labels: ImageVolume
    prior_lesions: list[Lesion]
    difference: ImageVolume  # current minus registered prior FLAIR, z-scored in the brain
    tracking: TrackingResult
    subtraction_probability: ImageVolume | None  # new-lesion U-Net (None: not run)
    subtraction_labels: ImageVolume | None
    timings_s: dict[str, float]


def _check_cards(subtraction: ModelCard, flair: ModelCard) -> None:
    if subtraction.task != "new_lesions":
        raise ModelCardMismatchError(
            f"the new-lesion pipeline got a model card for task {subtraction.task!r} "
            f"(version {subtraction.version}); it needs task 'new_lesions'"
        )
    if tuple(subtraction.architecture.channels) not in channel_options("new_lesions"):
        raise ModelCardMismatchError(
            f"model card channels {list(subtraction.architecture.channels)} cannot be provided "
            f"by the new-lesion pipeline: it provides one of "
            f"{[list(c) for c in channel_options('new_lesions')]}"
        )
    if tuple(flair.architecture.channels) != ("flair",):
        raise ModelCardMismatchError(
            f"lesion tracking runs the FLAIR model on both FLAIRs; its card asks for channels "
            f"{list(flair.architecture.channels)} (a FLAIR-only model is needed)"
        )
    for card in (subtraction, flair):
        check_isotropic_card(card)
    if subtraction.spacing_mm != flair.spacing_mm:
        raise ModelCardMismatchError(
            f"the new-lesion model ({subtraction.spacing_mm} mm) and the FLAIR model "
            f"({flair.spacing_mm} mm) must share their working grid"
        )


def _settings(config: PipelineConfig) -> tuple[str, str, float, TrackingSettings]:
    """(method, registration, minimum similarity, tracking settings); a plain
    `PipelineConfig` gets the new-lesion defaults."""
    if not isinstance(config, NewLesionsPipelineConfig):
        config = NewLesionsPipelineConfig(
            threshold=config.threshold, min_lesion_volume_mm3=config.min_lesion_volume_mm3
        )
    return (
        config.method,
        config.registration,
        config.min_registration_similarity,
        TrackingSettings(
            config.enlarging_relative,
            config.enlarging_absolute_ml,
            config.match_margin_mm,
            config.new_max_prior_probability,
            config.new_min_difference_sd,
        ),
    )


def register_prior(
    prior_flair: ImageVolume,
    current_flair: ImageVolume,
    card: ModelCard,
    pipeline_cfg: PipelineConfig,
) -> tuple[RegisteredPair, ChangeAnalysis]:
    """Preprocess both FLAIRs and register the prior onto the current working grid; the
    analysis (tracking still empty) says whether the registration passed its check."""
    method, registration, min_similarity, _ = _settings(pipeline_cfg)
    pair = prepare_registered_pair(
        prior_flair,
        current_flair,
        spacing_mm=card.spacing_mm[0],
        registration=registration,  # type: ignore[arg-type]
        names=("prior", "current"),
    )
    return pair, ChangeAnalysis(method, registration, pair.similarity, min_similarity, None)


def subtraction_candidates(
    pair: RegisteredPair,
    model: UNet3D,
    card: ModelCard,
    inference_cfg: InferenceConfig,
    pipeline_cfg: PipelineConfig,
) -> tuple[ImageVolume, ImageVolume]:
    """The new-lesion U-Net's probability and labelled candidates on the working grid."""
    image = build_channels(
        "new_lesions",
        {"prior_flair_registered": pair.moving_registered, "current_flair": pair.fixed_image},
        pair.fixed.brain_mask,
        channels=tuple(card.architecture.channels),
    )
    probability = predict_on_working_grid(image, pair.fixed, model, card, inference_cfg)
    labels, _ = label_lesions(
        probability, pipeline_cfg.threshold, pipeline_cfg.min_lesion_volume_mm3
    )
    return probability, labels


def analyse_change(
    pair: RegisteredPair,
    subtraction_model: UNet3D | None,
    subtraction_card: ModelCard,
    flair: HelperModel,
    inference_cfg: InferenceConfig,
    pipeline_cfg: PipelineConfig,
) -> ChangeEvidence:
    """Segment both time points with the FLAIR model and track; run the new-lesion U-Net
    too unless `subtraction_model` is None."""
    tracking_settings = _settings(pipeline_cfg)[3]
    timings = dict(pair.timings_s)
    current = pair.fixed
    brain = current.brain_mask

    start = time.perf_counter()
    current_probability = predict_on_working_grid(
        current.channels["flair"].array[None], current, flair.network, flair.card, inference_cfg
    )
    prior_input = build_channels("flair", {"flair": pair.moving_registered}, brain)
    prior_probability = predict_on_working_grid(
        prior_input, current, flair.network, flair.card, inference_cfg
    )
    timings["inference.flair_both"] = time.perf_counter() - start

    start = time.perf_counter()
    threshold, min_volume = flair.config.threshold, flair.config.min_lesion_volume_mm3
    current_labels, current_lesions = label_lesions(current_probability, threshold, min_volume)
    prior_labels, prior_lesions = label_lesions(prior_probability, threshold, min_volume)
    z_prior, z_current = build_channels(
        "new_lesions",
        {"prior_flair_registered": pair.moving_registered, "current_flair": pair.fixed_image},
        brain,
        channels=("prior_flair_registered", "current_flair"),
    )
    difference = brain.with_array(((z_current - z_prior) * (brain.array > 0)).astype(np.float32))
    tracking = track_lesions(
        current_labels,
        current_lesions,
        prior_labels,
        prior_lesions,
        tracking_settings,
        prior_probability=prior_probability,
        difference=difference,
    )
    timings["tracking"] = time.perf_counter() - start

    subtraction_probability = subtraction_labels = None
    if subtraction_model is not None:
        start = time.perf_counter()
        subtraction_probability, subtraction_labels = subtraction_candidates(
            pair, subtraction_model, subtraction_card, inference_cfg, pipeline_cfg
        )
        timings["inference.subtraction"] = time.perf_counter() - start
    return ChangeEvidence(
        pair,
        current_probability,
        current_labels,
        current_lesions,
        prior_probability,
        prior_labels,
        prior_lesions,
        difference,
        tracking,
        subtraction_probability,
        subtraction_labels,
        timings,
    )


def _touching(labels: ImageVolume, other: ImageVolume) -> set[int]:
    """Ids of `labels` that share at least one voxel with a lesion of `other`."""
    ids = np.unique(labels.array[(labels.array > 0) & (other.array > 0)])
    return {int(i) for i in ids}


def select_new_lesions(
    evidence: ChangeEvidence, method: str
) -> tuple[ImageVolume, ImageVolume, list[Lesion]]:
    """(probability, labels, lesions) of the new lesions `method` reports, working grid."""
    if method not in METHODS:
        raise ValueError(f"unknown new-lesion method {method!r}; use one of {METHODS}")
    if method in _NEEDS_SUBTRACTION and evidence.subtraction_labels is None:
        raise ValueError(f"method {method!r} needs the new-lesion U-Net's output")
    new_ids = {t.lesion_id for t in evidence.tracking.lesions if t.status is ChangeStatus.NEW}
    if method in ("tracking", "tracking_confirmed"):
        if method == "tracking_confirmed":
            assert evidence.subtraction_labels is not None
            new_ids &= _touching(evidence.current_labels, evidence.subtraction_labels)
        labels, lesions = select_lesions(evidence.current_labels, new_ids)
        return evidence.current_probability, labels, lesions
    assert evidence.subtraction_labels is not None and evidence.subtraction_probability is not None
    keep = set(range(1, int(evidence.subtraction_labels.array.max(initial=0)) + 1))
    if method == "confirmed":
        keep = _touching(evidence.subtraction_labels, evidence.current_labels)
    labels, lesions = select_lesions(evidence.subtraction_labels, keep)
    return evidence.subtraction_probability, labels, lesions


def run_new_lesions_pipeline(
    prior_flair: ImageVolume,
    current_flair: ImageVolume,
    model: UNet3D,
    card: ModelCard,
    inference_cfg: InferenceConfig,
    pipeline_cfg: PipelineConfig,
    flair: HelperModel,
) -> NewLesionsResult:
    """New lesions since the prior FLAIR on the current FLAIR's grid, with the tracking of
    every current FLAIR lesion in `result.change` (a `ChangeAnalysis`)."""
    _check_cards(card, flair.card)
    pair, analysis = register_prior(prior_flair, current_flair, card, pipeline_cfg)
    if not analysis.reliable:  # no lesion is reported, the report says why
        empty = pair.fixed.image.with_array(np.zeros(pair.fixed.image.array.shape, np.int32))
        return lesions_to_source_grid(
            empty.with_array(np.zeros(empty.array.shape, np.float32)),
            empty,
            [],
            pair.fixed,
            pipeline_cfg.threshold,
            dict(pair.timings_s),
            change=analysis,
        )
    method = analysis.method
    evidence = analyse_change(
        pair,
        model if method in _NEEDS_SUBTRACTION else None,
        card,
        flair,
        inference_cfg,
        pipeline_cfg,
    )
    probability, labels, lesions = select_new_lesions(evidence, method)
    threshold = flair.config.threshold if method.startswith("tracking") else pipeline_cfg.threshold
    return lesions_to_source_grid(
        probability,
        labels,
        lesions,
        pair.fixed,
        threshold,
        dict(evidence.timings_s),
        change=replace(
            analysis,
            tracking=evidence.tracking,
            reported_new_ids=frozenset(_touching(evidence.current_labels, labels)),
        ),
    )
