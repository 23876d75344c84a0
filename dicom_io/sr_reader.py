"""Read back what a LesionWatch report says: per finding type, the lesion count and total
volume, and the report-level statements (prior compared, what was not assessed and why).

Used by `make demo` to print what the stand-in PACS received, and by tests; it reads any
TID 1500 report written by `dicom_io.sr` (highdicom parses the measurement groups).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import highdicom as hd
from pydicom.dataset import Dataset

from lesionwatch.dicom_io.codes import (
    ASSESSMENT_BY_COMPARISON,
    COMMENT,
    NUMBER_OF_LESIONS,
    QUALITATIVE_EVALUATIONS,
    RADIOLOGICAL_ACTIVITY,
    VOLUME,
    YES,
)

__all__ = ["FindingSummary", "ReportSummary", "read_report_summary"]

_SUMMARY_PREFIX = "Summary: "
_VOLUME = hd.sr.CodedConcept(VOLUME.value, VOLUME.scheme_designator, VOLUME.meaning)
_COUNT = hd.sr.CodedConcept(
    NUMBER_OF_LESIONS.value, NUMBER_OF_LESIONS.scheme_designator, NUMBER_OF_LESIONS.meaning
)
_COMPARISON = hd.sr.CodedConcept(
    ASSESSMENT_BY_COMPARISON.value,
    ASSESSMENT_BY_COMPARISON.scheme_designator,
    ASSESSMENT_BY_COMPARISON.meaning,
)


@dataclass(frozen=True)
class FindingSummary:
    label: str  # e.g. "MS lesion (FLAIR)"
    lesion_count: int
    total_volume_ml: float
    lesion_volumes_ml: tuple[float, ...]


@dataclass(frozen=True)
class ReportSummary:
    study_instance_uid: str
    sop_instance_uid: str
    findings: tuple[FindingSummary, ...]
    statements: tuple[str, ...] = field(default=())  # comments: prior, not assessed, version
    radiological_activity: bool | None = None  # None: no change since a prior was assessed
    # per finding label, how many lesions the report gives each change status ("New", ...)
    change_statuses: dict[str, dict[str, int]] = field(default_factory=dict)


def _value(
    group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations, name: hd.sr.CodedConcept
) -> float:
    measurements = group.get_measurements(name=name)
    return float(measurements[0].value) if measurements else 0.0


def read_report_summary(dataset: Dataset) -> ReportSummary:
    report = hd.sr.Comprehensive3DSR.from_dataset(dataset, copy=True)
    groups = report.content.get_volumetric_roi_measurement_groups()  # type: ignore[attr-defined]
    per_lesion: dict[str, list[float]] = {}
    statuses: dict[str, dict[str, int]] = {}
    summaries = []
    for group in groups:
        identifier = str(group.tracking_identifier)
        if identifier.startswith(_SUMMARY_PREFIX):
            summaries.append(group)
        else:
            label = identifier.rsplit(" ", 1)[0]
            per_lesion.setdefault(label, []).append(_value(group, _VOLUME))
            for evaluation in group.get_qualitative_evaluations(name=_COMPARISON):
                counts = statuses.setdefault(label, {})
                meaning = str(evaluation.value.meaning)
                counts[meaning] = counts.get(meaning, 0) + 1
    findings = []
    for group in summaries:
        label = str(group.tracking_identifier)[len(_SUMMARY_PREFIX) :]
        findings.append(
            FindingSummary(
                label,
                int(_value(group, _COUNT)),
                _value(group, _VOLUME),
                tuple(per_lesion.get(label, [])),
            )
        )
    statements = []
    activity = None
    for item in dataset.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != QUALITATIVE_EVALUATIONS.value:
            continue
        for child in item.get("ContentSequence", []):
            name = child.ConceptNameCodeSequence[0].CodeValue
            if child.ValueType == "TEXT" and name == COMMENT.value:
                statements.append(str(child.TextValue))
            elif child.ValueType == "CODE" and name == RADIOLOGICAL_ACTIVITY.value:
                activity = child.ConceptCodeSequence[0].CodeValue == YES.value
    return ReportSummary(
        str(dataset.StudyInstanceUID),
        str(dataset.SOPInstanceUID),
        tuple(findings),
        tuple(statements),
        activity,
        statuses,
    )
