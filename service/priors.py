"""A patient's prior exam as the assembler sees it: the local archive, or the prior search.

`find_local_prior` looks only at what LesionWatch received itself. `prior_for_assembly` adds
the search started on the study's first image (service.prior_search): while it runs, the
study waits, never past the search's deadline; once it ended, its result (or its reason for
having none) decides the new-lesion job.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from lesionwatch.config.schema import SeriesClass

from .db.models import Study
from .db.prior_models import PriorSearch, PriorSearchState

__all__ = ["NO_LOCAL_PRIOR", "PriorChoice", "find_local_prior", "prior_for_assembly"]

NO_LOCAL_PRIOR = "no prior study with a FLAIR series for this patient"


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


@dataclass(frozen=True)
class PriorChoice:
    """The prior to compare with (`prior_study_id`), or why there is none, or wait."""

    prior_study_id: int | None
    waiting: bool = False
    reason: str = ""


def prior_for_assembly(
    session: Session, study: Study, required: Iterable[SeriesClass], now: datetime
) -> PriorChoice:
    """The prior of `study` for its new-lesion job, as far as it can be known at `now`."""
    required = tuple(required)
    search = session.scalar(select(PriorSearch).where(PriorSearch.study_id == study.id))
    if search is None:  # no PACS configured: only what LesionWatch received itself
        local = find_local_prior(session, study, required)
        return PriorChoice(local.id if local else None, reason="" if local else NO_LOCAL_PRIOR)
    if search.state == PriorSearchState.FOUND and search.prior_study_id is not None:
        return PriorChoice(search.prior_study_id)
    if not search.state.terminal and now < search.deadline_at:
        return PriorChoice(
            None, waiting=True, reason=f"waiting for the prior search ({search.state.value})"
        )
    # The search looked in the local archive first (with the site's identity rules): its
    # answer stands.
    if search.state == PriorSearchState.NONE:
        return PriorChoice(None, reason=f"{NO_LOCAL_PRIOR} ({search.reason})")
    if search.state == PriorSearchState.FAILED:
        return PriorChoice(None, reason=f"no prior could be retrieved from PACS ({search.reason})")
    last = f"; last error: {search.reason}" if search.reason else ""
    return PriorChoice(
        None,
        reason="no prior could be retrieved from PACS (search still "
        f"{search.state.value} at its deadline{last})",
    )
