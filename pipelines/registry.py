"""The pipeline registry: every MS pipeline by name, with what it needs and what it reports.

One table, read by the worker (which series to load for a job, which model to load once,
which finding type the result is) and by `lesionwatch segment` (the same runner offline).
Names are the ones used in the config (`pipelines.<name>`), in job rows and in messages.
Nothing here imports training code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from lesionwatch.config.schema import InferenceConfig, PipelineConfig, PipelinesConfig, SeriesClass
from lesionwatch.dicom_io.codes import FindingType
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import ModelCard
from lesionwatch.pipelines.lesion_inference import HelperModel, LesionSegmentation

__all__ = [
    "PIPELINES",
    "PipelineInputs",
    "PipelineSpec",
    "UnknownPipelineError",
    "config_problems",
    "get_pipeline",
]


class UnknownPipelineError(KeyError):
    """A job or command names a pipeline this version does not have."""


@dataclass(frozen=True)
class PipelineInputs:
    """Image volumes by series class: the current study's, and the prior study's, plus the
    lesion mask of the spec's `reference` pipeline on the same study (when it could run)."""

    current: Mapping[SeriesClass, ImageVolume]
    prior: Mapping[SeriesClass, ImageVolume] = field(default_factory=dict)
    reference_lesions: ImageVolume | None = None
    helpers: Mapping[str, HelperModel] = field(default_factory=dict)  # spec.helper_models


Runner = Callable[
    [PipelineInputs, UNet3D, ModelCard, InferenceConfig, PipelineConfig], LesionSegmentation
]


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    task: str  # the model card task its weights must declare
    finding_type: FindingType  # what its SEG segment and SR groups report
    algorithm_name: str  # as the SEG and SR name the algorithm
    required_series: tuple[SeriesClass, ...]  # current-study series it cannot run without
    result_series: SeriesClass  # its mask (and SEG) is on this series' grid
    prior_series: tuple[SeriesClass, ...]  # prior-study series it needs (empty: no prior)
    run: Runner
    # Another pipeline whose lesions on the same study this one checks its candidates against
    # (the enhancing guard keeps candidates inside FLAIR lesions); run first when it can.
    reference: str | None = None
    # What a reader must know about this pipeline's results, said in every report.
    caution: str | None = None
    # Other pipelines whose models this one runs as well (new lesions: FLAIR at both times).
    helper_models: tuple[str, ...] = ()

    @property
    def needs_prior(self) -> bool:
        return bool(self.prior_series)

    def optional_series(self, card: ModelCard) -> tuple[SeriesClass, ...]:
        """Series it uses when present: the FLAIR model's T1 (if the model takes one), the
        reference pipeline's series."""
        wanted: tuple[SeriesClass, ...] = ()
        if self.name == "flair" and "t1" in card.architecture.channels:
            wanted += (SeriesClass.T1_PRE,)
        if self.reference is not None:
            wanted += PIPELINES[self.reference].required_series
        return tuple(dict.fromkeys(c for c in wanted if c not in self.required_series))


def _run_flair(
    inputs: PipelineInputs,
    model: UNet3D,
    card: ModelCard,
    inference: InferenceConfig,
    config: PipelineConfig,
) -> LesionSegmentation:
    from lesionwatch.pipelines.flair import run_flair_pipeline

    return run_flair_pipeline(
        inputs.current[SeriesClass.FLAIR],
        inputs.current.get(SeriesClass.T1_PRE),
        model,
        card,
        inference,
        config,
    )


def _run_new_lesions(
    inputs: PipelineInputs,
    model: UNet3D,
    card: ModelCard,
    inference: InferenceConfig,
    config: PipelineConfig,
) -> LesionSegmentation:
    from lesionwatch.pipelines.new_lesions import run_new_lesions_pipeline

    return run_new_lesions_pipeline(
        inputs.prior[SeriesClass.FLAIR],
        inputs.current[SeriesClass.FLAIR],
        model,
        card,
        inference,
        config,
        flair=inputs.helpers["flair"],
    )


def _run_enhancing(
    inputs: PipelineInputs,
    model: UNet3D,
    card: ModelCard,
    inference: InferenceConfig,
    config: PipelineConfig,
) -> LesionSegmentation:
    from lesionwatch.pipelines.enhancing import run_enhancing_pipeline

    return run_enhancing_pipeline(
        inputs.current[SeriesClass.T1_PRE],
        inputs.current[SeriesClass.T1_POST],
        model,
        card,
        inference,
        config,
        flair_lesions=inputs.reference_lesions,
    )


PIPELINES: dict[str, PipelineSpec] = {
    spec.name: spec
    for spec in (
        PipelineSpec(
            name="flair",
            task="flair",
            finding_type=FindingType.MS_LESION,
            algorithm_name="LesionWatch FLAIR lesion U-Net",
            required_series=(SeriesClass.FLAIR,),
            result_series=SeriesClass.FLAIR,
            prior_series=(),
            run=_run_flair,
        ),
        PipelineSpec(
            name="new_lesions",
            task="new_lesions",
            finding_type=FindingType.NEW_LESION,
            algorithm_name="LesionWatch new lesion U-Net",
            required_series=(SeriesClass.FLAIR,),
            result_series=SeriesClass.FLAIR,
            prior_series=(SeriesClass.FLAIR,),
            run=_run_new_lesions,
            helper_models=("flair",),
        ),
        PipelineSpec(
            name="enhancing",
            task="enhancing",
            finding_type=FindingType.ENHANCING_LESION,
            algorithm_name="LesionWatch enhancing lesion U-Net",
            required_series=(SeriesClass.T1_PRE, SeriesClass.T1_POST),
            result_series=SeriesClass.T1_POST,
            prior_series=(),
            run=_run_enhancing,
            reference="flair",
            caution="found by a model trained on synthetic enhancing lesions only, not "
            "validated on real enhancing-lesion masks: confirm each one on the images",
        ),
    )
}


def get_pipeline(name: str) -> PipelineSpec:
    try:
        return PIPELINES[name]
    except KeyError:
        known = ", ".join(PIPELINES)
        raise UnknownPipelineError(f"no pipeline named {name!r} (known: {known})") from None


def config_problems(pipelines: PipelinesConfig) -> list[str]:
    """Settings under `pipelines:` that would let a pipeline start without what it needs."""
    problems = []
    for name, spec in PIPELINES.items():
        configured: PipelineConfig = getattr(pipelines, name)
        missing = [c.value for c in spec.required_series if c not in configured.required_series]
        if configured.enabled and missing:
            problems.append(
                f"pipelines.{name}.required_series must include {', '.join(missing)}: the "
                f"{name} pipeline cannot run without it"
            )
    return problems
