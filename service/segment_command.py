"""`lesionwatch segment flair|new-lesions|enhancing`: one pipeline run offline on one case.

A thin caller of the pieces the worker uses: the pipeline registry (runner and required
series), the model cache (weights verified against their card), and the result builders
(`build_finding_objects`, `build_study_report`). Inputs are NIfTI files or folders holding one
DICOM series each; the output is the lesion mask on the grid of the series the pipeline
reports on (the FLAIR, the current FLAIR, the T1 post contrast), optionally the lesion table
(CSV) and, with DICOM input and ``--dicom-out``, the SEG, SR and fallback objects the service
would send.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset

from lesionwatch.config.schema import LesionWatchConfig, SeriesClass
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.model_cache import SHIPPED_WEIGHTS_DIR

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "SegmentInputError",
    "SegmentOutputs",
    "load_case_image",
    "segment",
]

DEFAULT_WEIGHTS_DIR = SHIPPED_WEIGHTS_DIR


class SegmentInputError(ValueError):
    """The case cannot be segmented as given (missing file, no weights, DICOM needed, ...)."""


@dataclass(frozen=True)
class CaseImage:
    volume: ImageVolume
    datasets: tuple[Dataset, ...]  # the source DICOM series (empty for NIfTI input)


@dataclass(frozen=True)
class SegmentOutputs:
    mask_path: Path
    lesion_count: int
    total_volume_ml: float
    timings_s: dict[str, float]
    dicom_files: tuple[Path, ...] = ()
    review: str = ""  # what a candidate check removed (enhancing), in words
    change: str = ""  # the comparison with the prior (new lesions), in words


def load_case_image(source: Path) -> CaseImage:
    """A NIfTI/NRRD file, or a folder with one DICOM series (its datasets kept for SEG/SR)."""
    from lesionwatch.dicom_io.series_files import read_dicom_file
    from lesionwatch.dicom_io.series_reader import load_series

    if source.is_dir():
        loaded = load_series(source)
        files = [f for f in dict.fromkeys(loaded.slice_files) if f is not None]
        return CaseImage(loaded.volume, tuple(read_dicom_file(f) for f in files))
    if source.is_file():
        return CaseImage(ImageVolume.load(source), ())
    raise SegmentInputError(f"{source} is neither an image file nor a folder of DICOM files")


_DICOM_NAMES = {
    SeriesClass.FLAIR: "the FLAIR",
    SeriesClass.T1_POST: "the T1 post-contrast series",
}


def segment(
    config: LesionWatchConfig,
    pipeline: str,
    current: Mapping[SeriesClass, Path],
    out_mask: Path,
    *,
    prior: Mapping[SeriesClass, Path] | None = None,
    table_csv: Path | None = None,
    weights: Path | None = None,
    dicom_out: Path | None = None,
) -> SegmentOutputs:
    """Run registry pipeline `pipeline` on one case, as a worker would."""
    from lesionwatch.models.device import select_device
    from lesionwatch.models.weights import WeightsIntegrityError
    from lesionwatch.pipelines.model_cache import ModelCache
    from lesionwatch.pipelines.postprocess import write_lesion_table_csv
    from lesionwatch.pipelines.registry import get_pipeline
    from lesionwatch.pipelines.runner import run_pipeline

    spec = get_pipeline(pipeline)
    images = {c: load_case_image(p) for c, p in current.items()}
    prior_images = {c: load_case_image(p) for c, p in (prior or {}).items()}
    result_image = images[spec.result_series]
    if dicom_out is not None and not result_image.datasets:
        what = _DICOM_NAMES.get(spec.result_series, spec.result_series.value)
        raise SegmentInputError(
            f"--dicom-out needs {what} as a DICOM series folder, not a NIfTI file"
        )
    models = ModelCache(
        config.pipelines,
        select_device(config.inference.device),
        {pipeline: weights} if weights is not None else None,
    )
    try:
        loaded = models.get(spec)
    except WeightsIntegrityError as exc:
        if "no weights for" in str(exc):
            raise SegmentInputError(str(exc)) from exc
        raise
    result = run_pipeline(
        spec,
        {c: image.volume for c, image in images.items()},
        {c: image.volume for c, image in prior_images.items()},
        models,
        config.inference,
        config.pipelines,
    )
    out_mask.parent.mkdir(parents=True, exist_ok=True)
    result.mask_source_grid.save(out_mask)
    if table_csv is not None:
        write_lesion_table_csv(result.lesions, table_csv)
    files: tuple[Path, ...] = ()
    if dicom_out is not None:
        files = _write_dicom_results(
            config,
            spec.name,
            result_image.datasets,
            result,
            loaded.algorithm,
            prior_images,
            dicom_out,
        )
    return SegmentOutputs(
        mask_path=out_mask,
        lesion_count=len(result.lesions),
        total_volume_ml=sum(lesion.volume_ml for lesion in result.lesions),
        timings_s=result.timings_s,
        dicom_files=files,
        review="" if result.review is None else result.review.summary(),
        change=_change_text(result.change, len(result.lesions)),
    )


def _change_text(change: object, new_lesions: int) -> str:
    from lesionwatch.service.change_record import change_record, change_summary

    if change is None:
        return ""
    if not change.reliable:  # type: ignore[attr-defined]
        return f"Change since prior: not assessed, {change.unreliable_reason()}"  # type: ignore[attr-defined]
    return change_summary(change_record(change), new_lesions).text()


def _write_dicom_results(
    config: LesionWatchConfig,
    pipeline: str,
    datasets: tuple[Dataset, ...],
    result: object,
    algorithm: object,
    prior_images: Mapping[SeriesClass, CaseImage],
    out_dir: Path,
) -> tuple[Path, ...]:
    """The objects a worker and a report job would write for this one finding type."""
    from lesionwatch.dicom_io.results import (
        FindingInput,
        JobIdentity,
        build_finding_objects,
        build_study_report,
    )
    from lesionwatch.dicom_io.sr import AnalysisNote, AnalysisState, PriorStudyReference
    from lesionwatch.pipelines.registry import get_pipeline

    from .change_record import change_record, change_summary
    from .job_execution import finding_notes, write_result_files

    spec = get_pipeline(pipeline)
    study_uid = str(datasets[0].StudyInstanceUID)
    job = JobIdentity(f"offline/{study_uid}/{pipeline}/{algorithm.model_card_sha256}")  # type: ignore[attr-defined]
    objects = build_finding_objects(
        FindingInput(
            spec.finding_type,
            datasets,
            result.mask_source_grid,  # type: ignore[attr-defined]
            result.lesions,  # type: ignore[attr-defined]
            algorithm,  # type: ignore[arg-type]
        ),
        job=job,
        config=config.results,
    )
    prior = None
    notes = [
        AnalysisNote(AnalysisState(note.state), note.detail)
        for note in finding_notes(spec, result.review)  # type: ignore[attr-defined]
    ]
    prior_flair = prior_images.get(SeriesClass.FLAIR)
    change = getattr(result, "change", None)
    if change is not None and not change.reliable:
        notes.append(
            AnalysisNote(
                AnalysisState.ANALYSIS_FAILED,
                f"New lesions: not assessed, {change.unreliable_reason()}",
            )
        )
    if spec.needs_prior and prior_flair is not None and prior_flair.datasets:
        first = prior_flair.datasets[0]
        reliable = change is not None and change.reliable
        prior = PriorStudyReference(
            str(first.StudyInstanceUID),
            str(first.get("StudyDate", "")) or None,
            prior_flair.datasets,
            change=change_summary(change_record(change), len(result.lesions))  # type: ignore[attr-defined]
            if reliable
            else None,
        )
    elif spec.needs_prior:
        raise SegmentInputError(
            "--dicom-out needs the prior FLAIR as a DICOM series folder: the report names the "
            "prior study it compared with"
        )
    else:
        notes.append(
            AnalysisNote(
                AnalysisState.NO_PRIOR_AVAILABLE,
                f"offline run of the {pipeline} pipeline: no prior compared",
            )
        )
    report, export = build_study_report(
        [objects.report_entry],
        list(datasets),
        job=job,
        config=config.results,
        prior=prior,
        notes=notes,
        objects=objects.datasets,
    )
    written = write_result_files(
        [*objects.datasets, *([report] if report is not None else [])], out_dir
    )
    if export is not None:
        path = out_dir / "lesionwatch-results.json"
        path.write_text(json.dumps(export, indent=2))
        written.append(path)
    return tuple(written)
