"""Result objects: one SEG (+ secondary captures) per finding type, one SR per study.

A pipeline job calls `build_finding_objects` for its finding type (the SEG on the grid of
its source series, and the labelled secondary-capture fallback); the study's report job calls
`build_study_report` with every finding type that ran (the TID 1500 SR and the JSON export).
`build_result_objects` does both at once (offline `segment --dicom-out`, tests).

Every UID comes from `derive_uid(key, role)` where the key names the study (the role names
the finding type and object), so re-processing a study gives the very same UIDs: a new
version replaces the old one at a PACS rather than adding a second SEG or report. Objects are
in send order: SEG, then secondary captures, then the SR (which references the SEGs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

from pydicom.dataset import Dataset

from lesionwatch.config.schema import ResultsConfig
from lesionwatch.dicom_io.codes import FINDING_CONCEPTS, FindingType
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.output_uids import derive_uid
from lesionwatch.dicom_io.result_json import build_result_json
from lesionwatch.dicom_io.secondary_capture import OverlayLayer, build_secondary_captures
from lesionwatch.dicom_io.seg import (
    AlgorithmIdentity,
    Equipment,
    SegmentInput,
    build_segmentation,
    sort_by_slice,
)
from lesionwatch.dicom_io.sr import (
    AnalysisNote,
    AnalysisState,
    FindingReport,
    LesionMeasurement,
    PriorStudyReference,
    build_measurement_report,
)

__all__ = [
    "AlgorithmIdentity",
    "AnalysisNote",
    "AnalysisState",
    "FindingInput",
    "FindingObjects",
    "FindingReport",
    "FindingType",
    "JobIdentity",
    "LesionMeasurement",
    "PriorStudyReference",
    "ResultObjects",
    "ResultsInputError",
    "build_finding_objects",
    "build_result_objects",
    "build_study_report",
    "series_numbers",
]


class ResultsInputError(ValueError):
    """The inputs of a job's results do not fit together (study, series, finding types)."""


@dataclass(frozen=True)
class FindingInput:
    """One finding type of a job: its source series, mask on that grid, and lesion table."""

    finding_type: FindingType
    source_series: Sequence[Dataset]  # the classic multi-file series the mask was mapped onto
    mask: ImageVolume  # on the exact grid of `source_series`
    lesions: Sequence[Any]  # LesionMeasurement, or anything LesionMeasurement.from_lesion takes
    algorithm: AlgorithmIdentity


@dataclass(frozen=True)
class JobIdentity:
    """What makes the output UIDs: the same key always gives the same UIDs.

    The service uses the Study Instance UID, so every version of a study's results keeps its
    UIDs (a PACS replaces rather than adds); offline runs add what they ran with.
    """

    job_key: str


@dataclass(frozen=True)
class ResultObjects:
    segmentations: tuple[Dataset, ...] = ()
    secondary_captures: tuple[Dataset, ...] = ()
    report: Dataset | None = None
    json: dict[str, Any] | None = field(default=None)

    @property
    def datasets(self) -> list[Dataset]:
        """Every DICOM object, in send order (the SR after the SEGs it references)."""
        report = [self.report] if self.report is not None else []
        return [*self.segmentations, *self.secondary_captures, *report]


def _software_version() -> str:
    try:
        return metadata.version("lesionwatch")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class FindingObjects:
    """What one finding type produced: its SEG, its fallback images, and its report entry."""

    finding_type: FindingType
    segmentation: Dataset | None
    secondary_captures: tuple[Dataset, ...]
    report_entry: FindingReport  # lesions with their tracking UIDs, the SEG segment
    capture_slices: tuple[int, ...] = ()  # source slice index of each secondary capture

    @property
    def datasets(self) -> list[Dataset]:
        seg = [self.segmentation] if self.segmentation is not None else []
        return [*seg, *self.secondary_captures]


def series_numbers(finding_type: FindingType, config: ResultsConfig) -> tuple[int, int]:
    """(SEG, secondary capture) series numbers of a finding type: fixed per type, so that a
    viewer shows them in the same place in every study; the SR is base + 20."""
    index = list(FindingType).index(finding_type) + 1
    return config.series_number_base + index, config.series_number_base + 10 + index


def _check_finding(finding: FindingInput) -> None:
    if not finding.source_series:
        raise ResultsInputError(f"{finding.finding_type.value}: the source series is empty")
    series_uids = {str(ds.SeriesInstanceUID) for ds in finding.source_series}
    if len(series_uids) != 1:
        raise ResultsInputError(
            f"{finding.finding_type.value}: source images come from {len(series_uids)} "
            f"series ({sorted(series_uids)}); one series per finding type"
        )


def _check(findings: Sequence[FindingInput]) -> None:
    if not findings:
        raise ResultsInputError("no findings to report: pass at least one finding type")
    seen: set[FindingType] = set()
    studies: set[str] = set()
    for finding in findings:
        if finding.finding_type in seen:
            raise ResultsInputError(f"finding type {finding.finding_type.value} given twice")
        seen.add(finding.finding_type)
        _check_finding(finding)
        studies |= {str(ds.StudyInstanceUID) for ds in finding.source_series}
    if len(studies) != 1:
        raise ResultsInputError(f"source series belong to several studies: {sorted(studies)}")


def _equipment(config: ResultsConfig) -> Equipment:
    return Equipment(
        manufacturer=config.manufacturer,
        model_name=config.model_name,
        software_versions=_software_version(),
    )


def build_finding_objects(
    finding: FindingInput,
    *,
    job: JobIdentity,
    config: ResultsConfig | None = None,
    also_capture_slices: Sequence[int] = (),
) -> FindingObjects:
    """The SEG (one segment) and secondary captures of one finding type, as `config` says.

    `also_capture_slices`: slices an earlier version had captures of; they are rendered again
    (same UIDs) so that a PACS replaces every capture of the earlier version.
    """
    config = config or ResultsConfig()
    _check_finding(finding)
    equipment = _equipment(config)
    kind = finding.finding_type.value

    def uid(role: str) -> str:
        return derive_uid(job.job_key, role, config.uid_prefix)

    seg_number, sc_number = series_numbers(finding.finding_type, config)
    label = FINDING_CONCEPTS[finding.finding_type].label
    source = sort_by_slice(finding.source_series, finding.mask)
    series_uid = str(source[0].SeriesInstanceUID)
    seg: Dataset | None = None
    if config.seg:
        seg = build_segmentation(
            source,
            [
                SegmentInput(
                    finding.finding_type,
                    finding.mask,
                    finding.algorithm,
                    uid(f"tracking/segment/{kind}"),
                )
            ],
            series_instance_uid=uid(f"seg/{kind}/series"),
            sop_instance_uid=uid(f"seg/{kind}/instance"),
            series_number=seg_number,
            equipment=equipment,
            series_description=f"LesionWatch {label} (computer-generated)",
            encoding=config.seg_encoding,
        )
    lesions = [
        item if isinstance(item, LesionMeasurement) else LesionMeasurement.from_lesion(item)
        for item in finding.lesions
    ]
    lesions = [
        lesion
        if lesion.tracking_uid
        else replace(lesion, tracking_uid=uid(f"tracking/{kind}/{lesion.lesion_id}"))
        for lesion in lesions
    ]
    entry = FindingReport(finding.finding_type, lesions, seg, 1, series_uid, finding.algorithm)
    captures: list[Dataset] = []
    if config.secondary_capture:
        captures = list(
            build_secondary_captures(
                source,
                [OverlayLayer(finding.finding_type, finding.mask, len(finding.lesions))],
                series_instance_uid=uid(f"sc/{kind}/series"),
                instance_uid=lambda k: uid(f"sc/{kind}/instance/{k}"),
                series_number=sc_number,
                equipment=equipment,
                algorithm_text=f"{finding.algorithm.name} {finding.algorithm.version}",
                all_slices=config.secondary_capture_all_slices,
                also_slices=also_capture_slices,
            )
        )
    slice_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(source)}
    slices = tuple(
        slice_of[str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)] for sc in captures
    )
    return FindingObjects(finding.finding_type, seg, tuple(captures), entry, slices)


def build_study_report(
    entries: Sequence[FindingReport],
    evidence: Sequence[Dataset],
    *,
    job: JobIdentity,
    config: ResultsConfig | None = None,
    prior: PriorStudyReference | None = None,
    notes: Sequence[AnalysisNote] = (),
    objects: Sequence[Dataset] = (),
) -> tuple[Dataset | None, dict[str, Any] | None]:
    """The study's SR and JSON export over every finding type in `entries`.

    `evidence` holds the current source images the findings rest on (the first names patient
    and study); `objects` lists the SEG and secondary captures already sent, for the JSON.
    """
    config = config or ResultsConfig()
    if not entries:
        raise ResultsInputError("no findings to report: pass at least one finding type")
    kinds = [entry.finding_type for entry in entries]
    if len(set(kinds)) != len(kinds):
        raise ResultsInputError(f"a finding type is given twice: {[k.value for k in kinds]}")
    equipment = _equipment(config)
    report = None
    if config.sr:
        report = build_measurement_report(
            entries,
            evidence,
            job_key=job.job_key,
            series_instance_uid=derive_uid(job.job_key, "sr/series", config.uid_prefix),
            sop_instance_uid=derive_uid(job.job_key, "sr/instance", config.uid_prefix),
            series_number=config.series_number_base + 20,
            equipment=equipment,
            prior=prior,
            notes=notes,
            uid_prefix=config.uid_prefix,
        )
    export = None
    if config.json_export:
        export = build_result_json(
            job_key=job.job_key,
            current=evidence[0],
            findings=entries,
            objects=[*objects, *([report] if report is not None else [])],
            equipment=equipment,
            prior=prior,
            notes=notes,
        )
    return report, export


def build_result_objects(
    findings: Sequence[FindingInput],
    *,
    job: JobIdentity,
    config: ResultsConfig | None = None,
    prior: PriorStudyReference | None = None,
    notes: Sequence[AnalysisNote] = (),
) -> ResultObjects:
    """Every object of a set of findings at once: the SEGs and captures of each finding type,
    then the SR over all of them (the path the worker takes in two steps)."""
    config = config or ResultsConfig()
    _check(findings)
    per_type = [build_finding_objects(f, job=job, config=config) for f in findings]
    evidence: list[Dataset] = []
    seen: set[str] = set()
    for finding in findings:
        for ds in sort_by_slice(finding.source_series, finding.mask):
            if str(ds.SOPInstanceUID) not in seen:
                seen.add(str(ds.SOPInstanceUID))
                evidence.append(ds)
    segs = tuple(o.segmentation for o in per_type if o.segmentation is not None)
    captures = tuple(sc for o in per_type for sc in o.secondary_captures)
    report, export = build_study_report(
        [o.report_entry for o in per_type],
        evidence,
        job=job,
        config=config,
        prior=prior,
        notes=notes,
        objects=[*segs, *captures],
    )
    return ResultObjects(segs, captures, report, export)
