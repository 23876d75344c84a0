"""What the lesion pipelines share: card checks, a registered image pair, and the tail
"network input on the working grid -> probability -> lesions -> source grid".

Lesions are found and measured on the isotropic working grid (the grid the network was
trained on, where volumes and diameters are most faithful). The binary mask goes back onto
the source grid through the kept lesions' interpolated probabilities; the label map (lesion
ids matching the table) goes back by nearest neighbour. Every step's wall time is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from lesionwatch.config.schema import InferenceConfig, PipelineConfig
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import ModelCard, ModelCardMismatchError
from lesionwatch.pipelines.inference import SlidingWindowInferer
from lesionwatch.pipelines.postprocess import Lesion, label_lesions
from lesionwatch.pipelines.preprocess import PreprocessResult, preprocess
from lesionwatch.pipelines.steps.registration import register, similarity_in_mask

__all__ = [
    "CandidateCheck",
    "HelperModel",
    "LesionSegmentation",
    "RegisteredPair",
    "RegistrationName",
    "check_isotropic_card",
    "check_task_card",
    "lesions_to_source_grid",
    "predict_on_working_grid",
    "prepare_registered_pair",
    "segment_on_working_grid",
]

RegistrationName = Literal["rigid", "affine", "syn"]


@dataclass(frozen=True)
class HelperModel:
    """Another pipeline's model that a pipeline runs too (new lesions: the FLAIR model at both
    time points), with that pipeline's settings (threshold, minimum volume)."""

    network: UNet3D
    card: ModelCard
    config: PipelineConfig


@dataclass(frozen=True)
class LesionSegmentation:
    mask_source_grid: ImageVolume  # uint8, 1 = lesion, on the source grid
    labels_source_grid: ImageVolume  # int32 lesion ids matching `lesions`, source grid
    probability_source_grid: ImageVolume  # float32 lesion probability, source grid
    lesions: list[Lesion]  # measured on the working grid
    timings_s: dict[str, float] = field(default_factory=dict)
    review: Any = None  # what a candidate check removed (enhancing_guard.CandidateReview)
    change: Any = None  # the comparison with the prior (new_lesions.ChangeAnalysis)


# Checks the candidates on the working grid: (labels, lesions) -> (kept labels, kept lesions,
# a record of what was removed and why).
CandidateCheck = Callable[[ImageVolume, list[Lesion]], tuple[ImageVolume, list[Lesion], Any]]


def check_isotropic_card(card: ModelCard) -> None:
    if len(set(card.spacing_mm)) != 1:
        raise ModelCardMismatchError(
            f"model card spacing {card.spacing_mm} mm is not isotropic; the pipeline resamples "
            "to isotropic grids only"
        )


def check_task_card(card: ModelCard, task: str, pipeline: str, channels: tuple[str, ...]) -> None:
    """The card must be for `task`, take exactly `channels` in order, at isotropic spacing."""
    if card.task != task:
        raise ModelCardMismatchError(
            f"the {pipeline} pipeline got a model card for task {card.task!r} "
            f"(version {card.version}); it needs task {task!r}"
        )
    if tuple(card.architecture.channels) != channels:
        raise ModelCardMismatchError(
            f"model card channels {list(card.architecture.channels)} cannot be provided by the "
            f"{pipeline} pipeline: it provides exactly {list(channels)}, in this order"
        )
    check_isotropic_card(card)


@dataclass(frozen=True)
class RegisteredPair:
    """The fixed image preprocessed, and the moving image on its working grid.

    Both images are N4-corrected and unmasked: `build_channels` z-scores them in the fixed
    image's brain, as training did. (A moving image already masked by its own brain mask
    would be 0, i.e. a large negative z, wherever the two masks disagree: a rim of false
    "new" voxels in the difference channel.)
    """

    fixed: PreprocessResult
    fixed_image: ImageVolume  # N4-corrected fixed image on its working grid
    moving_registered: ImageVolume  # N4-corrected moving image, warped onto fixed.grid
    timings_s: dict[str, float]
    registration: RegistrationName
    similarity: float  # correlation of the two inside the fixed brain (same contrast only)


def _positive_brain(prepared: PreprocessResult) -> ImageVolume:
    """The z-scored brain shifted to values >= 1, 0 outside: what the fit sees.

    ANTs starts from the images' intensity centres of mass; z-scored intensities sum to about
    0, which throws that start metres away (measured: translations of 1e11 mm). Mutual
    information itself does not care about the shift.
    """
    brain = prepared.brain_mask.array > 0
    z = prepared.image.array
    shifted = np.where(brain, z - z[brain].min() + 1.0, 0.0)
    return prepared.image.with_array(shifted.astype(np.float32))


def prepare_registered_pair(
    moving: ImageVolume,
    fixed: ImageVolume,
    *,
    spacing_mm: float,
    registration: RegistrationName,
    names: tuple[str, str],
) -> RegisteredPair:
    """Preprocess both images, then register the moving onto the fixed working grid.

    Both are skull-stripped and z-scored by `preprocess`, so the fit sees brain against brain
    (no scalp or neck to pull it). `names` (moving, fixed) prefix the preprocessing timings.
    """
    timings: dict[str, float] = {}
    prepared = {}
    for name, image in zip(names, (moving, fixed), strict=True):
        prepared[name] = preprocess(image, spacing_mm=spacing_mm)
        timings.update({f"preprocess.{name}.{s.name}": s.seconds for s in prepared[name].steps})
    moving_prepared, fixed_prepared = prepared[names[0]], prepared[names[1]]

    start = time.perf_counter()
    # Transforms are estimated at 2 mm at most (as preprocess does for T1 -> FLAIR): about a
    # tenth of the time of a 1 mm fit, and applied at full resolution as they live in mm.
    result = register(
        _positive_brain(moving_prepared),
        _positive_brain(fixed_prepared),
        registration,
        fixed_mask=fixed_prepared.brain_mask,
        working_spacing_mm=max(2.0, spacing_mm),
    )
    assert moving_prepared.bias_corrected is not None
    assert fixed_prepared.bias_corrected is not None
    warped = result.apply(moving_prepared.bias_corrected)
    result.close()
    timings[f"registration.{registration}"] = time.perf_counter() - start
    similarity = similarity_in_mask(
        fixed_prepared.bias_corrected, warped, fixed_prepared.brain_mask
    )
    return RegisteredPair(
        fixed_prepared, fixed_prepared.bias_corrected, warped, timings, registration, similarity
    )


def predict_on_working_grid(
    image: npt.NDArray[np.float32],
    prepared: PreprocessResult,
    model: UNet3D,
    card: ModelCard,
    inference_cfg: InferenceConfig,
) -> ImageVolume:
    """Network input (C, Z, Y, X) on `prepared`'s working grid -> lesion probability there."""
    inferer = SlidingWindowInferer(model, inference_cfg, card.spacing_mm)
    brain = prepared.brain_mask.array > 0
    probabilities = inferer(torch.from_numpy(image), torch.from_numpy(brain))
    lesion_probability = (1.0 - probabilities[0]).clamp_(0.0, 1.0).numpy()  # any non-background
    return prepared.image.with_array(lesion_probability.astype(np.float32))


def lesions_to_source_grid(
    probability_1mm: ImageVolume,
    labels_1mm: ImageVolume,
    lesions: list[Lesion],
    prepared: PreprocessResult,
    threshold: float,
    timings: dict[str, float],
    review: Any = None,
    change: Any = None,
) -> LesionSegmentation:
    """Kept lesions (labels on the working grid) -> mask, labels, probability on the source
    grid; `timings` gains the step "to_source_grid"."""
    start = time.perf_counter()
    labels = prepared.to_source_grid(labels_1mm, is_label=True)
    probability = prepared.to_source_grid(probability_1mm, is_label=False)
    # The mask is the kept lesions' probability interpolated onto the source grid and
    # thresholded: measured closer to the truth than nearest-neighbour labels on thick-slice
    # and oblique grids (Dice 0.89-0.95 vs 0.84-0.91, see pipelines/preprocess.py).
    kept = probability_1mm.with_array(np.where(labels_1mm.array > 0, probability_1mm.array, 0.0))
    mask = prepared.mask_to_source_grid(kept, threshold=threshold)
    timings["to_source_grid"] = time.perf_counter() - start
    return LesionSegmentation(
        mask_source_grid=mask,
        labels_source_grid=labels.with_array(labels.array.astype(np.int32)),
        probability_source_grid=probability,
        lesions=lesions,
        timings_s=timings,
        review=review,
        change=change,
    )


def segment_on_working_grid(
    image: npt.NDArray[np.float32],
    prepared: PreprocessResult,
    model: UNet3D,
    card: ModelCard,
    inference_cfg: InferenceConfig,
    pipeline_cfg: PipelineConfig,
    timings: dict[str, float],
    check: CandidateCheck | None = None,
) -> LesionSegmentation:
    """Network input (C, Z, Y, X) on `prepared`'s working grid -> lesions on its source grid.

    `timings` (the steps so far) are copied into the result, followed by this function's steps.
    `check` reviews the candidate lesions before they are mapped back (enhancing guard).
    """
    timings = dict(timings)
    start = time.perf_counter()
    probability_1mm = predict_on_working_grid(image, prepared, model, card, inference_cfg)
    timings["inference"] = time.perf_counter() - start

    start = time.perf_counter()
    labels_1mm, lesions = label_lesions(
        probability_1mm, pipeline_cfg.threshold, pipeline_cfg.min_lesion_volume_mm3
    )
    review = None
    if check is not None:
        labels_1mm, lesions, review = check(labels_1mm, lesions)
    timings["postprocess"] = time.perf_counter() - start
    return lesions_to_source_grid(
        probability_1mm, labels_1mm, lesions, prepared, pipeline_cfg.threshold, timings, review
    )
