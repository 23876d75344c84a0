"""Study assembly on SQLite and PostgreSQL: quiet period, deadline, late series, job rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesionwatch.config.schema import AssemblyConfig, LateSeriesPolicy, PipelinesConfig, SeriesClass
from lesionwatch.service.assembler import StudyAssembler
from lesionwatch.service.db import Job, JobState, Series, Study, StudyState
from lesionwatch.service.db.work_models import AuditEvent, OutboxMessage
from lesionwatch.service.messages import JobMessage, decode_message
from lesionwatch.service.queries import list_jobs

T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)


def add_study(
    sessions: sessionmaker[Session],
    uid: str,
    classes: list[SeriesClass],
    at: datetime,
    *,
    patient_id: str = "P1",
    study_date: str = "20261102",
) -> None:
    with sessions.begin() as session:
        study = Study(
            study_instance_uid=uid,
            patient_id=patient_id,
            study_date=study_date,
            first_received_at=at,
            last_received_at=at,
            receiving_since=at,
        )
        session.add(study)
        session.flush()
        for number, series_class in enumerate(classes, start=1):
            add_series(session, study, number, series_class, at)


def add_series(
    session: Session, study: Study, number: int, series_class: SeriesClass, at: datetime
) -> None:
    session.add(
        Series(
            study_id=study.id,
            series_instance_uid=f"{study.study_instance_uid}.{number}",
            series_number=number,
            series_class=series_class,
            first_received_at=at,
            last_received_at=at,
        )
    )
    study.last_received_at = max(study.last_received_at, at)


def assembler(sessions: sessionmaker[Session], **assembly: object) -> StudyAssembler:
    cfg = AssemblyConfig(quiet_period_s=60, deadline_s=900, **assembly)  # type: ignore[arg-type]
    return StudyAssembler(sessions, cfg, PipelinesConfig())


def study_state(sessions: sessionmaker[Session], uid: str) -> tuple[StudyState, str, int]:
    with sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        return study.state, study.state_reason, study.generation


def test_waits_for_quiet_period_then_creates_jobs_in_one_step(
    sessions: sessionmaker[Session],
) -> None:
    add_study(sessions, "1.2.1", [SeriesClass.FLAIR, SeriesClass.T1_PRE, SeriesClass.T1_POST], T0)
    asm = assembler(sessions)
    assert asm.run_once(T0 + timedelta(seconds=59)) == []
    assert study_state(sessions, "1.2.1")[0] is StudyState.RECEIVING
    decisions = asm.run_once(T0 + timedelta(seconds=61))
    assert [d.jobs for d in decisions] == [("flair", "enhancing")]
    state, reason, _ = study_state(sessions, "1.2.1")
    assert state is StudyState.READY
    assert "new_lesions: no prior study" in reason
    with sessions() as session:
        jobs = list_jobs(session)
        messages = [decode_message(m.body.encode()) for m in session.scalars(select(OutboxMessage))]
        audit = [(e.action, e.job_id) for e in session.scalars(select(AuditEvent))]
    assert {(j.pipeline, j.state) for j in jobs} == {
        ("flair", "pending"),
        ("enhancing", "pending"),
        ("new_lesions", "skipped"),  # the report says why it did not run
    }
    skipped = next(j for j in jobs if j.state == "skipped")
    assert skipped.reason == "no prior study with a FLAIR series for this patient"
    # Each runnable job's message waits in the outbox, committed with the job rows.
    pending = {j.job_id: j for j in jobs if j.state == "pending"}
    assert {m.job_id for m in messages} == set(pending)
    assert all(isinstance(m, JobMessage) and m.study_instance_uid == "1.2.1" for m in messages)
    assert {job_id for action, job_id in audit if action == "job.pending"} == set(pending)
    assert asm.run_once(T0 + timedelta(seconds=600)) == []  # decided once only


def test_new_lesions_job_when_a_prior_with_flair_exists(sessions: sessionmaker[Session]) -> None:
    add_study(
        sessions, "1.2.0", [SeriesClass.FLAIR], T0 - timedelta(days=400), study_date="20251001"
    )
    add_study(sessions, "1.2.1", [SeriesClass.FLAIR], T0)
    asm = assembler(sessions)
    asm.run_once(T0 - timedelta(days=399))
    decisions = asm.run_once(T0 + timedelta(seconds=61))
    assert decisions[0].jobs == ("flair", "new_lesions")
    assert "enhancing: waiting for series T1_PRE, T1_POST" in decisions[0].reason


def test_nothing_runnable_waits_until_deadline_then_incomplete(
    sessions: sessionmaker[Session],
) -> None:
    add_study(sessions, "1.2.2", [SeriesClass.T2, SeriesClass.OTHER], T0)
    asm = assembler(sessions)
    assert asm.run_once(T0 + timedelta(seconds=120)) == []
    decisions = asm.run_once(T0 + timedelta(seconds=901))
    assert decisions[0].state is StudyState.INCOMPLETE
    state, reason, _ = study_state(sessions, "1.2.2")
    assert state is StudyState.INCOMPLETE and "flair: waiting for series FLAIR" in reason
    with sessions() as session:
        assert session.scalars(select(Job)).all() == []


def test_forced_deadline_for_a_study_that_never_goes_quiet(sessions: sessionmaker[Session]) -> None:
    add_study(sessions, "1.2.3", [SeriesClass.FLAIR], T0)
    with sessions.begin() as session:
        study = session.scalars(select(Study)).one()
        study.last_received_at = T0 + timedelta(seconds=890)  # images keep trickling in
    decisions = assembler(sessions).run_once(T0 + timedelta(seconds=901))
    assert decisions[0].state is StudyState.READY
    assert "forced at deadline" in decisions[0].reason


def test_incomplete_study_resumes_when_the_missing_series_arrives(
    sessions: sessionmaker[Session],
) -> None:
    add_study(sessions, "1.2.4", [SeriesClass.T2], T0)
    asm = assembler(sessions)
    asm.run_once(T0 + timedelta(seconds=901))
    late = T0 + timedelta(seconds=1000)
    with sessions.begin() as session:
        add_series(session, session.scalars(select(Study)).one(), 2, SeriesClass.FLAIR, late)
    assert asm.run_once(late + timedelta(seconds=1))[0].state is StudyState.RECEIVING
    decisions = asm.run_once(late + timedelta(seconds=61))
    assert decisions[0].state is StudyState.READY and decisions[0].jobs == ("flair",)


@pytest.mark.parametrize(
    ("policy", "late_class", "expected_jobs"),
    [
        (LateSeriesPolicy.IGNORE, SeriesClass.T1_POST, None),
        (LateSeriesPolicy.REPROCESS_IF_REQUIRED, SeriesClass.OTHER, None),
        (LateSeriesPolicy.REPROCESS_IF_REQUIRED, SeriesClass.T1_POST, ("enhancing",)),
        (LateSeriesPolicy.REPROCESS, SeriesClass.OTHER, ("flair",)),
    ],
)
def test_late_series_policy(
    sessions: sessionmaker[Session],
    policy: LateSeriesPolicy,
    late_class: SeriesClass,
    expected_jobs: tuple[str, ...] | None,
) -> None:
    add_study(sessions, "1.2.5", [SeriesClass.FLAIR, SeriesClass.T1_PRE], T0)
    asm = assembler(sessions, late_series_policy=policy)
    assert asm.run_once(T0 + timedelta(seconds=61))[0].jobs == ("flair",)
    late = T0 + timedelta(seconds=300)
    with sessions.begin() as session:
        add_series(session, session.scalars(select(Study)).one(), 3, late_class, late)
    first = asm.run_once(late + timedelta(seconds=5))
    assert len(first) == 1
    if expected_jobs is None:
        state, reason, generation = study_state(sessions, "1.2.5")
        assert state is StudyState.READY and generation == 0 and "late series ignored" in reason
        assert asm.run_once(late + timedelta(seconds=120)) == []  # reported once
        return
    assert first[0].state is StudyState.RECEIVING and first[0].generation == 1
    second = asm.run_once(late + timedelta(seconds=61))
    assert second[0].jobs == expected_jobs and second[0].generation == 1
    with sessions() as session:
        by_generation = {(j.pipeline, j.generation): j.state for j in session.scalars(select(Job))}
    # Only the pipelines that run again replace their earlier job; the others' results stand.
    flair_before = JobState.SUPERSEDED if "flair" in expected_jobs else JobState.PENDING
    assert by_generation[("flair", 0)] is flair_before
    assert all(by_generation[(name, 1)] is JobState.PENDING for name in expected_jobs)
