"""Run one registry pipeline on one study: the reference pipeline first when the spec has one.

The one way a pipeline runs, for the worker's executor and for `lesionwatch segment`: the
enhancing pipeline checks its candidates against the FLAIR lesions of the same study, so when
the study has a FLAIR the FLAIR model runs first (its mask is then the guard's reference).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

from lesionwatch.config.schema import InferenceConfig, PipelinesConfig, SeriesClass
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.lesion_inference import HelperModel, LesionSegmentation
from lesionwatch.pipelines.model_cache import ModelCache
from lesionwatch.pipelines.registry import PipelineInputs, PipelineSpec, get_pipeline

__all__ = ["run_pipeline"]


def run_pipeline(
    spec: PipelineSpec,
    current: Mapping[SeriesClass, ImageVolume],
    prior: Mapping[SeriesClass, ImageVolume],
    models: ModelCache,
    inference: InferenceConfig,
    pipelines: PipelinesConfig,
    *,
    reference_lesions: ImageVolume | None = None,
) -> LesionSegmentation:
    """`spec` on these volumes with its model from `models`; timings of a reference run are
    included as ``reference.<name>.<step>``. `reference_lesions`: the reference pipeline's
    mask when it is already known (the study's FLAIR job finished first), not run again."""
    reference_timings: dict[str, float] = {}
    if spec.reference is not None and reference_lesions is None:
        reference = get_pipeline(spec.reference)
        if all(c in current for c in reference.required_series):
            started = time.perf_counter()
            result = run_pipeline(reference, current, {}, models, inference, pipelines)
            reference_lesions = result.mask_source_grid
            reference_timings = {
                f"reference.{reference.name}.{step}": seconds
                for step, seconds in result.timings_s.items()
            }
            reference_timings[f"reference.{reference.name}"] = time.perf_counter() - started
    loaded = models.get(spec)
    helpers = {}
    for name in spec.helper_models:
        helper = models.get(get_pipeline(name))
        helpers[name] = HelperModel(helper.network, helper.card, getattr(pipelines, name))
    segmentation = spec.run(
        PipelineInputs(current, prior, reference_lesions, helpers),
        loaded.network,
        loaded.card,
        inference,
        getattr(pipelines, spec.name),
    )
    if not reference_timings:
        return segmentation
    return replace(segmentation, timings_s={**reference_timings, **segmentation.timings_s})
