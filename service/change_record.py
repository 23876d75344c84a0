"""The comparison with the prior, between a new-lesion job's record and the study report.

The new-lesion job stores its `pipelines.new_lesions.ChangeAnalysis` as JSON on its job row
(`change_record`); the report job turns that back into the SR's change summary and gives each
FLAIR lesion of the same study its status (`attach_change_status`). The FLAIR job and the
tracking segment the same current FLAIR with the same model and preprocessing, so their lesion
tables agree; a lesion is matched by id AND centroid, and a table that does not match (other
weights or settings for one of them) gets no per-lesion status, only the summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from lesionwatch.dicom_io.sr import ChangeSummary, LesionMeasurement

__all__ = ["CENTROID_TOLERANCE_MM", "attach_change_status", "change_record", "change_summary"]

CENTROID_TOLERANCE_MM = 1.0


def change_record(change: Any) -> dict[str, Any]:
    """A `ChangeAnalysis` as JSON for the job row."""
    record: dict[str, Any] = {
        "method": change.method,
        "registration": change.registration,
        "similarity": round(float(change.similarity), 4),
        "min_similarity": change.min_similarity,
        "reliable": bool(change.reliable),
    }
    if not change.reliable:
        record["reason"] = change.unreliable_reason()
        return record
    tracking = change.tracking
    record.update(
        counts=tracking.counts,
        radiological_activity=tracking.active,
        prior_lesion_count=tracking.prior_lesion_count,
        prior_volume_ml=tracking.prior_volume_ml,
        settings={
            "enlarging_relative": tracking.settings.enlarging_relative,
            "enlarging_absolute_ml": tracking.settings.enlarging_absolute_ml,
            "match_margin_mm": tracking.settings.match_margin_mm,
        },
        lesions=[
            {
                "lesion_id": t.lesion_id,
                "status": t.status.value,
                "reported_new": t.lesion_id in change.reported_new_ids,
                "volume_ml": t.volume_ml,
                "prior_volume_ml": t.prior_volume_ml,
                "centroid_lps_mm": list(t.centroid_lps_mm),
            }
            for t in tracking.lesions
        ],
        disappeared=[
            {"volume_ml": lesion.volume_ml, "centroid_lps_mm": list(lesion.centroid_lps_mm)}
            for lesion in tracking.disappeared
        ],
    )
    return record


def _status(row: Mapping[str, Any]) -> str | None:
    # a lesion tracked as new that the configured method did not report stays unlabelled
    if row["status"] == "new" and not row.get("reported_new", True):
        return None
    return str(row["status"])


def attach_change_status(
    lesions: Sequence[LesionMeasurement], record: Mapping[str, Any]
) -> tuple[list[LesionMeasurement], bool]:
    """The FLAIR lesions with their change status; False when the tables do not match."""
    tracked = {int(row["lesion_id"]): row for row in record.get("lesions", [])}
    if len(tracked) != len(lesions):
        return list(lesions), False
    out = []
    for lesion in lesions:
        row = tracked.get(lesion.lesion_id)
        if row is None or math.dist(row["centroid_lps_mm"], lesion.centroid_lps_mm) > (
            CENTROID_TOLERANCE_MM
        ):
            return list(lesions), False
        out.append(
            replace(
                lesion, change_status=_status(row), prior_volume_ml=float(row["prior_volume_ml"])
            )
        )
    return out, True


def change_summary(record: Mapping[str, Any], new_lesion_count: int) -> ChangeSummary:
    """The SR's summary: new lesions as the new-lesion finding reports them, the rest from
    tracking."""
    counts = record["counts"]
    return ChangeSummary(
        new=new_lesion_count,
        enlarging=int(counts["enlarging"]),
        stable=int(counts["stable"]),
        shrinking=int(counts["shrinking"]),
        disappeared=int(counts["disappeared"]),
        prior_lesions=int(record["prior_lesion_count"]),
        registration=str(record["registration"]),
        similarity=float(record["similarity"]),
    )
