"""JSON export of a job's results, for reporting systems that do not read DICOM SR.

The same numbers as the SR (lesion count and total volume per finding type, one row per
lesion with its tracking UID), the analysis states, the prior study compared with, and the
UIDs of every DICOM object sent, so a reporting system can link back to the images.
Plain JSON types only: `json.dumps(build_result_json(...))` always works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from pydicom.dataset import Dataset

from lesionwatch.dicom_io.codes import FINDING_CONCEPTS
from lesionwatch.dicom_io.secondary_capture import BANNER_TEXT
from lesionwatch.dicom_io.seg import Equipment
from lesionwatch.dicom_io.sr import AnalysisNote, FindingReport, PriorStudyReference

__all__ = ["RESULT_JSON_SCHEMA", "build_result_json"]

RESULT_JSON_SCHEMA = "lesionwatch.result/1"


def _list(value: tuple[int, int, int] | None) -> list[int] | None:
    return None if value is None else list(value)


def _finding(finding: FindingReport) -> dict[str, Any]:
    concept = FINDING_CONCEPTS[finding.finding_type]
    return {
        "label": concept.label,
        "lesion_count": len(finding.lesions),
        "total_volume_ml": finding.total_volume_ml,
        "source_series_instance_uid": finding.source_series_instance_uid,
        "seg_sop_instance_uid": (
            str(finding.segmentation.SOPInstanceUID) if finding.segmentation is not None else None
        ),
        "segment_number": finding.segment_number,
        "algorithm": {
            "name": finding.algorithm.name,
            "version": finding.algorithm.version,
            "model_card_sha256": finding.algorithm.model_card_sha256,
        },
        "lesions": [
            {
                "lesion_id": lesion.lesion_id,
                "tracking_uid": lesion.tracking_uid,
                "volume_ml": lesion.volume_ml,
                "centroid_lps_mm": list(lesion.centroid_lps_mm),
                "bbox_min_ijk": _list(lesion.bbox_min_ijk),
                "bbox_max_ijk": _list(lesion.bbox_max_ijk),
                "longest_diameter_mm": lesion.longest_diameter_mm,
                "change_status": lesion.change_status,
                "prior_volume_ml": lesion.prior_volume_ml,
            }
            for lesion in finding.lesions
        ],
    }


def build_result_json(
    *,
    job_key: str,
    current: Dataset,
    findings: Sequence[FindingReport],
    objects: Sequence[Dataset],
    equipment: Equipment,
    prior: PriorStudyReference | None = None,
    notes: Sequence[AnalysisNote] = (),
) -> dict[str, Any]:
    """The export document; `current` is any image of the analysed study (patient, study)."""
    return {
        "schema": RESULT_JSON_SCHEMA,
        "job_key": job_key,
        "computer_generated": True,
        "disclaimer": BANNER_TEXT,
        "generated_by": {
            "manufacturer": equipment.manufacturer,
            "model_name": equipment.model_name,
            "software_versions": equipment.software_versions,
        },
        "patient_id": str(current.get("PatientID", "")),
        "study_instance_uid": str(current.StudyInstanceUID),
        "accession_number": str(current.get("AccessionNumber", "")),
        "study_date": str(current.get("StudyDate", "")),
        "prior_study": (
            {
                "study_instance_uid": prior.study_instance_uid,
                "study_date": prior.study_date,
                "change": None
                if prior.change is None
                else {**asdict(prior.change), "radiological_activity": prior.change.active},
            }
            if prior is not None
            else None
        ),
        "states": [{"state": note.state.value, "detail": note.detail} for note in notes],
        "findings": {finding.finding_type.value: _finding(finding) for finding in findings},
        "objects": [
            {
                "sop_class_uid": str(ds.SOPClassUID),
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
                "modality": str(ds.Modality),
            }
            for ds in objects
        ],
    }
