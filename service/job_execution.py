"""What a job does, given its inputs as files: the part that runs inside the executor process.

A pipeline job loads its series from the archive, runs the pipeline from the registry with the
model loaded once per process, builds its SEG and secondary captures and writes them into the
job's result folder. A report job reads the stored findings of a study's pipelines and writes
the study's SR (and JSON export). Both return a small record that the worker commits.

Nothing here touches the database or the broker: the worker process does that, so a job that
hangs or crashes here can be stopped without leaving a transaction open.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from lesionwatch.config.schema import InferenceConfig, PipelinesConfig, ResultsConfig, SeriesClass
from lesionwatch.dicom_io.codes import FindingType
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.series_errors import DicomSeriesError
from lesionwatch.dicom_io.series_files import read_dicom_file

__all__ = [
    "MASK_FILE",
    "ExecResult",
    "ExecutorSettings",
    "PermanentJobError",
    "PipelineRequest",
    "PriorStudy",
    "ReportNote",
    "ReportRequest",
    "SeriesFiles",
    "execute_pipeline",
    "execute_report",
    "is_permanent",
    "load_source_headers",
    "write_result_files",
]


MASK_FILE = "mask.nii.gz"  # a pipeline job's lesion mask on its source grid


class PermanentJobError(Exception):
    """The job's input itself is the problem; running it again unchanged cannot help."""


@dataclass(frozen=True)
class ExecutorSettings:
    """What the executor process needs of the config (no secrets: it crosses a process)."""

    data_dir: str
    inference: InferenceConfig
    pipelines: PipelinesConfig
    results: ResultsConfig
    log_level: str = "INFO"


@dataclass(frozen=True)
class SeriesFiles:
    series_instance_uid: str
    files: tuple[str, ...]  # relative to the data directory


@dataclass(frozen=True)
class PriorStudy:
    study_instance_uid: str
    study_date: str
    series: Mapping[SeriesClass, SeriesFiles]


@dataclass(frozen=True)
class PipelineRequest:
    job_id: int
    pipeline: str
    study_instance_uid: str
    current: Mapping[SeriesClass, SeriesFiles]
    prior: PriorStudy | None
    output_dir: str  # relative to the data directory; emptied first
    # Slices the previous version had secondary captures of (replaced, never left stale).
    previous_capture_slices: tuple[int, ...] = ()
    # The reference pipeline's mask from its finished job on this study (relative path), so
    # that it is not computed again (the enhancing guard's FLAIR lesions).
    reference_mask: str | None = None


@dataclass(frozen=True)
class ReportNote:
    state: str  # dicom_io.sr.AnalysisState value
    detail: str


@dataclass(frozen=True)
class ReportRequest:
    job_id: int
    study_instance_uid: str
    version: int
    findings: Sequence[dict[str, Any]]  # the stored records of the succeeded pipeline jobs
    notes: Sequence[ReportNote]
    inputs: list[list[Any]]  # which job outcomes this report covers (see service.jobs)
    output_dir: str


@dataclass(frozen=True)
class ExecResult:
    files: tuple[str, ...]  # written DICOM objects, relative to the data directory, send order
    record: dict[str, Any]  # JSON-able; stored on the job row
    timings_s: dict[str, float] = field(default_factory=dict)
    summary: str = ""


def is_permanent(exc: BaseException) -> bool:
    """Errors that say the input cannot be processed as it is (retrying cannot help)."""
    from lesionwatch.dicom_io.results import ResultsInputError
    from lesionwatch.dicom_io.seg import SegmentationGeometryError
    from lesionwatch.models.weights import ModelCardMismatchError, WeightsIntegrityError
    from lesionwatch.pipelines.channels import ChannelInputError
    from lesionwatch.pipelines.registry import UnknownPipelineError
    from lesionwatch.pipelines.steps.brain_mask import BrainMaskError

    return isinstance(
        exc,
        PermanentJobError
        | DicomSeriesError
        | ModelCardMismatchError
        | WeightsIntegrityError
        | BrainMaskError
        | ChannelInputError
        | ResultsInputError
        | SegmentationGeometryError
        | UnknownPipelineError
        | FileNotFoundError,
    )


# -- files -----------------------------------------------------------------------------------


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_result_files(datasets: Sequence[Dataset], directory: Path) -> list[Path]:
    """Write each object as ``<Modality>_<SOPInstanceUID>.dcm``: temporary file, fsync, rename."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for ds in datasets:
        final = directory / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        temporary = final.with_suffix(".tmp")
        ds.save_as(temporary, enforce_file_format=True)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        written.append(final)
    _fsync_directory(directory)
    return written


def _fresh_directory(path: Path) -> Path:
    # A rerun of the same job replaces what an interrupted attempt left behind.
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def load_source_headers(data_dir: Path, files: Sequence[str]) -> list[Dataset]:
    """Headers (no pixels) of archived instances, as SR evidence."""
    return [read_dicom_file(data_dir / f, stop_before_pixels=True) for f in files]


# -- pipeline jobs ---------------------------------------------------------------------------


def _load(data_dir: Path, series: SeriesFiles) -> tuple[Any, tuple[Dataset, ...]]:
    from lesionwatch.dicom_io.series_reader import load_series

    paths = [data_dir / f for f in series.files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PermanentJobError(
            f"{len(missing)} of {len(paths)} archived files of series "
            f"{series.series_instance_uid} are missing (first: {missing[0]})"
        )
    loaded = load_series(paths, series_instance_uid=series.series_instance_uid)
    used = [f for f in dict.fromkeys(loaded.slice_files) if f is not None]
    return loaded.volume, tuple(read_dicom_file(f) for f in used)


def execute_pipeline(
    request: PipelineRequest, models: Any, settings: ExecutorSettings
) -> ExecResult:
    """Run one pipeline job; `models` is the process's `pipelines.model_cache.ModelCache`."""
    from lesionwatch.dicom_io.results import FindingInput, JobIdentity, build_finding_objects
    from lesionwatch.pipelines.registry import get_pipeline
    from lesionwatch.pipelines.runner import run_pipeline
    from lesionwatch.service.change_record import change_record

    data_dir = Path(settings.data_dir)
    spec = get_pipeline(request.pipeline)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    loaded = models.get(spec)
    timings["load_model"] = time.perf_counter() - started

    wanted = (*spec.required_series, *spec.optional_series(loaded.card))
    missing = [c.value for c in spec.required_series if c not in request.current]
    if missing:
        raise PermanentJobError(f"the study has no {', '.join(missing)} series any more")
    if spec.needs_prior and request.prior is None:
        raise PermanentJobError("the job needs a prior study and none was given")
    started = time.perf_counter()
    current: dict[SeriesClass, Any] = {}
    sources: dict[SeriesClass, tuple[Dataset, ...]] = {}
    for series_class in wanted:
        if series_class in request.current:
            current[series_class], sources[series_class] = _load(
                data_dir, request.current[series_class]
            )
    prior: dict[SeriesClass, Any] = {}
    if spec.needs_prior and request.prior is not None:
        for series_class in spec.prior_series:
            if series_class not in request.prior.series:
                raise PermanentJobError(
                    f"the prior study {request.prior.study_instance_uid} has no "
                    f"{series_class.value} series"
                )
            prior[series_class], _ = _load(data_dir, request.prior.series[series_class])
    timings["load_series"] = time.perf_counter() - started

    reference = None
    if request.reference_mask is not None and (data_dir / request.reference_mask).is_file():
        reference = ImageVolume.load(data_dir / request.reference_mask)
    segmentation = run_pipeline(
        spec, current, prior, models, settings.inference, settings.pipelines,
        reference_lesions=reference,
    )  # fmt: skip
    timings.update(segmentation.timings_s)
    change = segmentation.change
    if change is not None and not change.reliable:
        return _unreliable_comparison(request, spec, loaded, change, timings, models)

    started = time.perf_counter()
    objects = build_finding_objects(
        FindingInput(
            spec.finding_type,
            sources[spec.result_series],
            segmentation.mask_source_grid,
            segmentation.lesions,
            loaded.algorithm,
        ),
        job=JobIdentity(request.study_instance_uid),
        config=settings.results,
        also_capture_slices=request.previous_capture_slices,
    )
    timings["build_results"] = time.perf_counter() - started
    started = time.perf_counter()
    out_dir = _fresh_directory(data_dir / request.output_dir)
    written = write_result_files(objects.datasets, out_dir)
    # The mask on the source grid, for pipelines that check against it (not sent anywhere).
    segmentation.mask_source_grid.save(out_dir / MASK_FILE)
    timings["write_results"] = time.perf_counter() - started

    entry = objects.report_entry
    seg = objects.segmentation
    record = {
        "kind": "finding",
        "pipeline": spec.name,
        "finding_type": spec.finding_type.value,
        "source_series_instance_uid": entry.source_series_instance_uid,
        "source_files": list(request.current[spec.result_series].files),
        "segment_number": entry.segment_number,
        "seg": None
        if seg is None
        else {
            "sop_instance_uid": str(seg.SOPInstanceUID),
            "sop_class_uid": str(seg.SOPClassUID),
            "file": str((out_dir / f"SEG_{seg.SOPInstanceUID}.dcm").relative_to(data_dir)),
        },
        "algorithm": asdict(loaded.algorithm),
        "lesion_count": len(entry.lesions),
        "total_volume_ml": entry.total_volume_ml,
        "lesions": [asdict(lesion) for lesion in entry.lesions],
        "prior": _prior_record(request) if spec.needs_prior else None,
        "objects": [
            {
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "sop_class_uid": str(ds.SOPClassUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
                "modality": str(ds.Modality),
            }
            for ds in objects.datasets
        ],
        "capture_slices": list(objects.capture_slices),
        "mask_file": str((out_dir / MASK_FILE).relative_to(data_dir)),
        "review": review_record(segmentation.review),
        "change": None if change is None else change_record(change),
        "notes": [asdict(note) for note in finding_notes(spec, segmentation.review)],
        "device": str(models.device),
    }
    summary = (
        f"{len(entry.lesions)} {spec.finding_type.value.replace('_', ' ')}(s), "
        f"{entry.total_volume_ml:.2f} mL"
    )
    return ExecResult(
        tuple(str(p.relative_to(data_dir)) for p in written), record, timings, summary
    )


def _prior_record(request: PipelineRequest) -> dict[str, Any] | None:
    if request.prior is None:
        return None
    return {
        "study_instance_uid": request.prior.study_instance_uid,
        "study_date": request.prior.study_date,
        "files": [f for s in request.prior.series.values() for f in s.files],
    }


def _unreliable_comparison(
    request: PipelineRequest,
    spec: Any,
    loaded: Any,
    change: Any,
    timings: dict[str, float],
    models: Any,
) -> ExecResult:
    """A prior that could not be registered: no lesion is reported (never a wrong count);
    the report says the comparison is unreliable and why."""
    from lesionwatch.dicom_io.sr import AnalysisState
    from lesionwatch.service.change_record import change_record

    label = _FINDING_LABELS.get(spec.finding_type.value, spec.name)
    date = request.prior.study_date if request.prior is not None else ""
    when = f" of {date[:4]}-{date[4:6]}-{date[6:]}" if len(date) == 8 else ""
    note = ReportNote(
        AnalysisState.ANALYSIS_FAILED.value,
        f"{label}: not assessed, comparison with the prior study{when} unreliable: "
        f"{change.unreliable_reason()}",
    )
    record = {
        "kind": "finding",
        "pipeline": spec.name,
        "finding_type": spec.finding_type.value,
        "comparison_unreliable": True,
        "algorithm": asdict(loaded.algorithm),
        "lesion_count": None,
        "lesions": [],
        "seg": None,
        "objects": [],
        "capture_slices": list(request.previous_capture_slices),
        "prior": _prior_record(request),
        "change": change_record(change),
        "notes": [asdict(note)],
        "device": str(models.device),
    }
    return ExecResult((), record, timings, "comparison with the prior unreliable: not assessed")


def review_record(review: Any) -> dict[str, Any] | None:
    """The candidate check's outcome as JSON (enhancing guard), or None."""
    if review is None:
        return None
    return {
        "candidates": review.candidates,
        "kept": review.kept,
        "removed": dict(review.removed),
        "checked_against_flair": review.checked_against_flair,
        "settings": asdict(review.settings),
    }


def finding_notes(spec: Any, review: Any) -> list[ReportNote]:
    """What the report must say about this finding: the pipeline's caution, what its
    candidate check removed, and whether it could be confirmed against FLAIR lesions."""
    from lesionwatch.dicom_io.sr import AnalysisState

    label = _FINDING_LABELS.get(spec.finding_type.value, spec.name)
    warning = AnalysisState.QUALITY_WARNING.value
    notes = []
    if spec.caution:
        notes.append(ReportNote(warning, f"{label}: {spec.caution}"))
    if review is not None:
        if any(review.removed.values()):
            notes.append(ReportNote(warning, f"{label}: {review.summary()}"))
        if not review.checked_against_flair:
            why = (
                "the study has no FLAIR series to check them against"
                if review.settings.require_flair_lesion
                else "the check against FLAIR lesions is switched off in the configuration"
            )
            notes.append(ReportNote(warning, f"{label} unconfirmed: {why}"))
    return notes


_FINDING_LABELS = {
    "ms_lesion": "FLAIR lesions",
    "new_lesion": "New lesions",
    "enhancing_lesion": "Enhancing lesions",
}


# -- report jobs -----------------------------------------------------------------------------


def _lesion(row: Mapping[str, Any]) -> Any:
    from lesionwatch.dicom_io.sr import LesionMeasurement

    def triple(value: Any) -> Any:
        return None if value is None else tuple(value)

    return LesionMeasurement(
        lesion_id=int(row["lesion_id"]),
        volume_ml=float(row["volume_ml"]),
        centroid_lps_mm=tuple(row["centroid_lps_mm"]),
        bbox_min_ijk=triple(row.get("bbox_min_ijk")),
        bbox_max_ijk=triple(row.get("bbox_max_ijk")),
        longest_diameter_mm=row.get("longest_diameter_mm"),
        tracking_uid=row.get("tracking_uid"),
    )


def execute_report(request: ReportRequest, settings: ExecutorSettings) -> ExecResult:
    """The study's SR (TID 1500) and JSON export over every finding that succeeded."""
    from lesionwatch.dicom_io.results import JobIdentity, build_study_report
    from lesionwatch.dicom_io.seg import AlgorithmIdentity
    from lesionwatch.dicom_io.sr import (
        AnalysisNote,
        AnalysisState,
        FindingReport,
        PriorStudyReference,
    )
    from lesionwatch.service.change_record import attach_change_status, change_summary

    data_dir = Path(settings.data_dir)
    started = time.perf_counter()
    order = list(FindingType)
    findings = sorted(request.findings, key=lambda f: order.index(FindingType(f["finding_type"])))
    entries: list[FindingReport] = []
    evidence: list[Dataset] = []
    seen: set[str] = set()
    objects: list[Dataset] = []
    prior: PriorStudyReference | None = None
    change = next(
        (f["change"] for f in findings if f.get("change") and f["change"].get("reliable")), None
    )
    change_notes: list[AnalysisNote] = []
    for finding in findings:
        if finding.get("comparison_unreliable"):
            continue  # its note says why; no lesions, no prior compared
        seg = None
        if finding.get("seg") is not None:
            # with pixels: the SR locates each lesion on its largest slice from the SEG
            seg = read_dicom_file(data_dir / finding["seg"]["file"])
            objects.append(seg)
        for ds in load_source_headers(data_dir, finding["source_files"]):
            if str(ds.SOPInstanceUID) not in seen:
                seen.add(str(ds.SOPInstanceUID))
                evidence.append(ds)
        lesions = [_lesion(row) for row in finding["lesions"]]
        if change is not None and finding["finding_type"] == FindingType.MS_LESION.value:
            lesions, matched = attach_change_status(lesions, change)
            if not matched:
                change_notes.append(
                    AnalysisNote(
                        AnalysisState.QUALITY_WARNING,
                        "FLAIR lesions: change since the prior is given as counts only (the "
                        "FLAIR job and the lesion tracking used different models or settings)",
                    )
                )
        entries.append(
            FindingReport(
                FindingType(finding["finding_type"]),
                lesions,
                seg,
                int(finding["segment_number"]),
                finding["source_series_instance_uid"],
                AlgorithmIdentity(**finding["algorithm"]),
            )
        )
        if finding.get("prior") is not None:
            prior_info = finding["prior"]
            prior = PriorStudyReference(
                study_instance_uid=prior_info["study_instance_uid"],
                study_date=prior_info["study_date"] or None,
                series=load_source_headers(data_dir, prior_info["files"]),
                change=None
                if finding.get("change") is None
                else change_summary(finding["change"], len(finding["lesions"])),
            )
    notes = [AnalysisNote(AnalysisState(n.state), n.detail) for n in request.notes]
    notes += change_notes
    for finding in findings:
        notes += [
            AnalysisNote(AnalysisState(n["state"]), n["detail"]) for n in finding.get("notes", [])
        ]
    if request.version > 1:
        notes.append(
            AnalysisNote(
                AnalysisState.REPORT_VERSION,
                f"version {request.version} of this report; it replaces version "
                f"{request.version - 1} (same SOP Instance UID)",
            )
        )
    report, export = build_study_report(
        entries,
        evidence,
        job=JobIdentity(request.study_instance_uid),
        config=settings.results,
        prior=prior,
        notes=notes,
        objects=objects,
    )
    timings = {"build_report": time.perf_counter() - started}
    started = time.perf_counter()
    out_dir = _fresh_directory(data_dir / request.output_dir)
    written = write_result_files([report] if report is not None else [], out_dir)
    if export is not None:
        export["report_version"] = request.version
        temporary = out_dir / "lesionwatch-results.json.tmp"
        temporary.write_text(json.dumps(export, indent=2))
        os.replace(temporary, out_dir / "lesionwatch-results.json")
    timings["write_results"] = time.perf_counter() - started
    record = {
        "kind": "report",
        "version": request.version,
        "inputs": request.inputs,
        "sr": None
        if report is None
        else {
            "sop_instance_uid": str(report.SOPInstanceUID),
            "file": str(written[0].relative_to(data_dir)),
        },
        "json": None
        if export is None
        else str((out_dir / "lesionwatch-results.json").relative_to(data_dir)),
        "findings": {
            e.finding_type.value: {
                "lesion_count": len(e.lesions),
                "total_volume_ml": e.total_volume_ml,
            }
            for e in entries
        },
        "notes": [asdict(n) for n in request.notes],
    }
    summary = f"report version {request.version}: " + ", ".join(
        f"{e.finding_type.value} {len(e.lesions)}" for e in entries
    )
    return ExecResult(
        tuple(str(p.relative_to(data_dir)) for p in written), record, timings, summary
    )
