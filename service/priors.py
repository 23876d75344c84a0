"""Find a patient's prior exam in the local archive (PACS query/retrieve comes in a later part)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from lesionwatch.config.schema import SeriesClass

from .db.models import Study

__all__ = ["find_local_prior"]


def find_local_prior(
    session: Session, study: Study, required: Iterable[SeriesClass]
) -> Study | None:
    """The most recent earlier study of the same patient holding every `required` series class.

    "Earlier" means an older StudyDate/StudyTime, or for equal or missing dates an earlier first
    arrival. Studies without a PatientID are never matched: identity by name alone is unsafe.
    """
    if not study.patient_id:
        return None
    required_set = set(required)
    candidates = session.scalars(
        select(Study)
        .where(Study.patient_id == study.patient_id, Study.id != study.id)
        .options(selectinload(Study.series))
    ).all()

    def sort_key(candidate: Study) -> tuple[str, str, float]:
        return (
            candidate.study_date or "",
            candidate.study_time or "",
            candidate.first_received_at.timestamp(),
        )

    current_key = sort_key(study)
    earlier = [
        c
        for c in candidates
        if sort_key(c) < current_key and required_set <= {s.series_class for s in c.series}
    ]
    return max(earlier, key=sort_key, default=None)
