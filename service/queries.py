"""Read-only views of studies and jobs for the CLI and the demo."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .db.models import Instance, Job, JobState, Study, StudyState

__all__ = ["JobRow", "SeriesRow", "StudyRow", "list_jobs", "list_studies"]


@dataclass(frozen=True)
class SeriesRow:
    series_number: int | None
    series_instance_uid: str
    description: str
    manufacturer: str
    series_class: str
    reason: str
    instances: int


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    patient_id: str
    study_date: str
    state: str
    reason: str
    generation: int
    series: tuple[SeriesRow, ...]

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.series)


@dataclass(frozen=True)
class JobRow:
    job_id: int
    study_instance_uid: str
    pipeline: str
    generation: int
    state: str
    attempt: int
    reason: str


def list_studies(session: Session, state: StudyState | None = None) -> list[StudyRow]:
    counts = dict(
        session.execute(select(Instance.series_id, func.count()).group_by(Instance.series_id)).all()
    )
    query = select(Study).order_by(Study.first_received_at)
    if state is not None:
        query = query.where(Study.state == state)
    rows = []
    for study in session.scalars(query):
        series = tuple(
            SeriesRow(
                s.series_number,
                s.series_instance_uid,
                s.series_description,
                s.manufacturer,
                s.series_class.value,
                s.classification_reason,
                counts.get(s.id, 0),
            )
            for s in sorted(
                study.series, key=lambda s: (s.series_number or 0, s.series_instance_uid)
            )
        )
        rows.append(
            StudyRow(
                study.study_instance_uid,
                study.patient_id,
                study.study_date,
                study.state.value,
                study.state_reason,
                study.generation,
                series,
            )
        )
    return rows


def list_jobs(session: Session, state: JobState | None = None) -> list[JobRow]:
    query = (
        select(Job, Study.study_instance_uid).join(Study, Job.study_id == Study.id).order_by(Job.id)
    )
    if state is not None:
        query = query.where(Job.state == state)
    return [
        JobRow(job.id, uid, job.pipeline, job.generation, job.state.value, job.attempt, job.reason)
        for job, uid in session.execute(query)
    ]
