"""All result objects of one job: SEG per source series, SR, secondary captures, JSON.

The one entry point the worker calls. Every UID comes from `derive_uid(job_key, role)`, so
building the results of the same job twice gives identical UIDs and a re-send replaces what
the PACS already has. Objects are returned in send order: SEGs first, then secondary
captures, then the SR (which references the SEGs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

from pydicom.dataset import Dataset

from lesionwatch.config.schema import ResultsConfig
from lesionwatch.dicom_io.codes import FindingType
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
    "FindingType",
    "JobIdentity",
    "LesionMeasurement",
    "PriorStudyReference",
    "ResultObjects",
    "ResultsInputError",
    "build_result_objects",
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
    """What makes a job's output UIDs: the same key always gives the same UIDs."""

    job_key: str  # e.g. f"{study_uid}/{pipeline}/{model_version}" or the job row's key


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


def _check(findings: Sequence[FindingInput]) -> None:
    if not findings:
        raise ResultsInputError("no findings to report: pass at least one finding type")
    seen: set[FindingType] = set()
    studies: set[str] = set()
    for finding in findings:
        if finding.finding_type in seen:
            raise ResultsInputError(f"finding type {finding.finding_type.value} given twice")
        seen.add(finding.finding_type)
        if not finding.source_series:
            raise ResultsInputError(f"{finding.finding_type.value}: the source series is empty")
        series_uids = {str(ds.SeriesInstanceUID) for ds in finding.source_series}
        if len(series_uids) != 1:
            raise ResultsInputError(
                f"{finding.finding_type.value}: source images come from {len(series_uids)} "
                f"series ({sorted(series_uids)}); one series per finding type"
            )
        studies |= {str(ds.StudyInstanceUID) for ds in finding.source_series}
    if len(studies) != 1:
        raise ResultsInputError(f"source series belong to several studies: {sorted(studies)}")


def build_result_objects(
    findings: Sequence[FindingInput],
    *,
    job: JobIdentity,
    config: ResultsConfig | None = None,
    prior: PriorStudyReference | None = None,
    notes: Sequence[AnalysisNote] = (),
) -> ResultObjects:
    """SEG, SR, secondary captures and JSON for one job, as `config` switches them on."""
    config = config or ResultsConfig()
    _check(findings)
    equipment = Equipment(
        manufacturer=config.manufacturer,
        model_name=config.model_name,
        software_versions=_software_version(),
    )

    def uid(role: str) -> str:
        return derive_uid(job.job_key, role, config.uid_prefix)

    # Group finding types by source series: one SEG (and one SC series) per source series.
    by_series: dict[str, list[FindingInput]] = {}
    for finding in findings:
        by_series.setdefault(str(finding.source_series[0].SeriesInstanceUID), []).append(finding)

    segmentations: list[Dataset] = []
    secondary_captures: list[Dataset] = []
    reports: list[FindingReport] = []
    evidence: list[Dataset] = []
    for n, (series_uid, group) in enumerate(by_series.items(), start=1):
        source = sort_by_slice(group[0].source_series, group[0].mask)
        evidence += source
        seg: Dataset | None = None
        if config.seg:
            seg = build_segmentation(
                source,
                [
                    SegmentInput(f.finding_type, f.mask, f.algorithm, uid(f"tracking/segment/{t}"))
                    for f in group
                    for t in [f.finding_type.value]
                ],
                series_instance_uid=uid(f"seg/series/{series_uid}"),
                sop_instance_uid=uid(f"seg/instance/{series_uid}"),
                series_number=config.series_number_base + n,
                equipment=equipment,
            )
            segmentations.append(seg)
        for number, f in enumerate(group, start=1):
            lesions = [
                item if isinstance(item, LesionMeasurement) else LesionMeasurement.from_lesion(item)
                for item in f.lesions
            ]
            lesions = [
                lesion
                if lesion.tracking_uid
                else replace(
                    lesion, tracking_uid=uid(f"tracking/{f.finding_type}/{lesion.lesion_id}")
                )
                for lesion in lesions
            ]
            reports.append(
                FindingReport(f.finding_type, lesions, seg, number, series_uid, f.algorithm)
            )
        if config.secondary_capture:
            algorithms = dict.fromkeys(f"{f.algorithm.name} {f.algorithm.version}" for f in group)
            secondary_captures += build_secondary_captures(
                source,
                [OverlayLayer(f.finding_type, f.mask, len(f.lesions)) for f in group],
                series_instance_uid=uid(f"sc/series/{series_uid}"),
                instance_uid=lambda k, s=series_uid: uid(f"sc/instance/{s}/{k}"),
                series_number=config.series_number_base + 10 + n,
                equipment=equipment,
                algorithm_text=", ".join(algorithms),
                all_slices=config.secondary_capture_all_slices,
            )

    report = None
    if config.sr:
        report = build_measurement_report(
            reports,
            evidence,
            job_key=job.job_key,
            series_instance_uid=uid("sr/series"),
            sop_instance_uid=uid("sr/instance"),
            series_number=config.series_number_base + 20,
            equipment=equipment,
            prior=prior,
            notes=notes,
            uid_prefix=config.uid_prefix,
        )
    objects = ResultObjects(tuple(segmentations), tuple(secondary_captures), report)
    if config.json_export:
        objects = replace(
            objects,
            json=build_result_json(
                job_key=job.job_key,
                current=evidence[0],
                findings=reports,
                objects=objects.datasets,
                equipment=equipment,
                prior=prior,
                notes=notes,
            ),
        )
    return objects
