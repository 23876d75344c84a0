"""The job state machine on SQLite and PostgreSQL: leases fence workers, every transition is
audited, results are queued with the success, and a study's report follows its last job."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesionwatch.service.db import Job, JobState, Study
from lesionwatch.service.db.delivery_models import Delivery
from lesionwatch.service.db.engine import write_session
from lesionwatch.service.db.models import REPORT_PIPELINE
from lesionwatch.service.db.work_models import AuditEvent, OutboxMessage
from lesionwatch.service.jobs import (
    ClaimKind,
    Completion,
    FailureKind,
    JobTransitionError,
    RetryPolicy,
    cancel_job,
    claim_job,
    complete_job,
    fail_attempt,
    release_job,
    renew_lease,
    retry_job,
)
from lesionwatch.service.messages import DeliveryMessage, JobMessage, decode_message

T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
LEASE_S = 60.0
POLICY = RetryPolicy(max_attempts=3, initial_delay_s=30, backoff_factor=4, max_delay_s=1800)
GE_T1 = Path(__file__).resolve().parents[2] / "data" / "dicom_t1" / "ge_signa_t1_mprage"


def _study_with_jobs(sessions: sessionmaker[Session], pipelines: list[str]) -> list[int]:
    with sessions.begin() as session:
        study = Study(study_instance_uid="1.2.3", patient_id="P", first_received_at=T0,
                      last_received_at=T0, receiving_since=T0)  # fmt: skip
        session.add(study)
        session.flush()
        jobs = [Job(study_id=study.id, pipeline=name, created_at=T0, updated_at=T0)
                for name in pipelines]  # fmt: skip
        session.add_all(jobs)
        session.flush()
        return [job.id for job in jobs]


def _claim(sessions: sessionmaker[Session], job_id: int, worker: str, at: datetime):  # type: ignore[no-untyped-def]
    with write_session(sessions) as session:
        return claim_job(session, job_id, worker, lease_s=LEASE_S, now=at)


def _job(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as session:
        return session.get_one(Job, job_id)


def _complete(
    sessions: sessionmaker[Session], job_id: int, worker: str, at: datetime,
    files: list[Path] | None = None, data_dir: Path = Path("/"),
) -> bool:  # fmt: skip
    completion = Completion(
        result={"kind": "finding", "lesion_count": 2},
        timings_s={"inference": 1.5},
        files=files or [],
        data_dir=data_dir,
        summary="2 ms lesion(s), 0.10 mL",
    )
    with write_session(sessions) as session:
        return complete_job(
            session, job_id, worker, completion, destinations=["PACS"], report_queue="jobs",
            now=at,
        )  # fmt: skip


def _outbox(sessions: sessionmaker[Session]) -> list[JobMessage | DeliveryMessage]:
    with sessions() as session:
        rows = session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
        return [decode_message(row.body.encode()) for row in rows]


def test_a_claim_is_a_lease_that_fences_other_workers(sessions: sessionmaker[Session]) -> None:
    [job_id] = _study_with_jobs(sessions, ["flair"])
    first = _claim(sessions, job_id, "host:1:0", T0)
    assert first.kind is ClaimKind.RUN and first.ticket is not None
    assert first.ticket.attempt == 1 and first.ticket.study_instance_uid == "1.2.3"
    # A duplicate message reaches another worker while the lease holds: try later.
    busy = _claim(sessions, job_id, "host:2:0", T0 + timedelta(seconds=10))
    assert busy.kind is ClaimKind.BUSY and busy.retry_after_s == pytest.approx(51, abs=1)
    # Heartbeats keep the lease alive.
    with write_session(sessions) as session:
        assert renew_lease(
            session, job_id, "host:1:0", lease_s=LEASE_S, now=T0 + timedelta(seconds=50)
        )
    assert _claim(sessions, job_id, "host:2:0", T0 + timedelta(seconds=100)).kind is ClaimKind.BUSY
    # The holder dies: once its lease has run out another worker takes the job over.
    taken = _claim(sessions, job_id, "host:2:0", T0 + timedelta(seconds=111))
    assert taken.kind is ClaimKind.RUN and taken.ticket is not None and taken.ticket.attempt == 2
    # The old holder can no longer renew, fail or complete it.
    with write_session(sessions) as session:
        assert not renew_lease(session, job_id, "host:1:0", lease_s=LEASE_S, now=T0)
    assert _complete(sessions, job_id, "host:1:0", T0 + timedelta(seconds=120)) is False
    assert _complete(sessions, job_id, "host:2:0", T0 + timedelta(seconds=130)) is True
    assert _job(sessions, job_id).state is JobState.SUCCEEDED
    # A late redelivery of the message is acknowledged without running anything.
    assert _claim(sessions, job_id, "host:3:0", T0 + timedelta(seconds=200)).kind is ClaimKind.SKIP
    with sessions() as session:
        actions = [e.action for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert actions.count("job.running") == 2 and actions.count("job.succeeded") == 1


def test_success_queues_results_and_the_report_follows_the_last_job(
    sessions: sessionmaker[Session],
) -> None:
    flair, enhancing = _study_with_jobs(sessions, ["flair", "enhancing"])
    result_file = next(GE_T1.iterdir())
    _claim(sessions, flair, "w", T0)
    assert _complete(sessions, flair, "w", T0 + timedelta(seconds=5), [result_file], GE_T1.parent)
    with sessions() as session:
        [delivery] = session.scalars(select(Delivery)).all()
        assert delivery.destination == "PACS" and delivery.job_id == flair
        assert delivery.path == f"{GE_T1.name}/{result_file.name}"  # relative to the data dir
        stored = session.get_one(Job, flair)
        assert json.loads(stored.result_json or "{}")["lesion_count"] == 2
        assert json.loads(stored.timings_json or "{}") == {"inference": 1.5}
        assert not session.scalars(select(Job).where(Job.pipeline == REPORT_PIPELINE)).all()
    # The dispatcher's wake-up message went to the outbox with the success.
    assert [type(m) for m in _outbox(sessions)] == [DeliveryMessage]
    _claim(sessions, enhancing, "w", T0 + timedelta(seconds=6))
    assert _complete(sessions, enhancing, "w", T0 + timedelta(seconds=9))
    with sessions() as session:
        [report] = session.scalars(select(Job).where(Job.pipeline == REPORT_PIPELINE)).all()
        assert report.state is JobState.PENDING and report.priority == 1  # before heavy jobs
    messages = _outbox(sessions)
    assert isinstance(messages[-1], JobMessage) and messages[-1].pipeline == REPORT_PIPELINE


def test_failed_attempts_back_off_then_dead_letter_with_the_reason(
    sessions: sessionmaker[Session],
) -> None:
    flair, enhancing = _study_with_jobs(sessions, ["flair", "enhancing"])
    _claim(sessions, enhancing, "w", T0)
    _complete(sessions, enhancing, "w", T0)
    delays = []
    at = T0
    for attempt in range(1, 4):
        claim = _claim(sessions, flair, "w", at)
        assert claim.kind is ClaimKind.RUN and claim.ticket is not None
        assert claim.ticket.attempt == attempt
        with write_session(sessions) as session:
            decision = fail_attempt(
                session, flair, "w", reason="SeriesSelectionError: no FLAIR images",
                kind=FailureKind.PERMANENT, policy=POLICY, report_queue="jobs", now=at,
            )  # fmt: skip
        assert decision is not None
        delays.append(decision.retry_in_s)
        at += timedelta(seconds=decision.retry_in_s + 1)
        if attempt < 3:
            assert _job(sessions, flair).state is JobState.RETRYING
    assert delays == [30.0, 120.0, 0.0]
    assert decision.dead_lettered
    job = _job(sessions, flair)
    assert job.state is JobState.FAILED and job.failure_kind == "permanent"
    assert "dead-lettered after 3 attempt(s)" in job.reason and "no FLAIR images" in job.reason
    # The study's other finding is still reported, with this one marked as not assessed.
    with sessions() as session:
        report = session.scalars(select(Job).where(Job.pipeline == REPORT_PIPELINE)).one()
    assert report.state is JobState.PENDING


def test_release_at_shutdown_does_not_count_the_attempt(sessions: sessionmaker[Session]) -> None:
    [job_id] = _study_with_jobs(sessions, ["flair"])
    _claim(sessions, job_id, "w", T0)
    with write_session(sessions) as session:
        assert release_job(session, job_id, "w", reason="requeued at shutdown", now=T0)
    job = _job(sessions, job_id)
    assert (job.state, job.attempt, job.lease_owner) == (JobState.PENDING, 0, None)


def test_operator_cancel_and_retry(sessions: sessionmaker[Session]) -> None:
    flair, other = _study_with_jobs(sessions, ["flair", "enhancing"])
    _claim(sessions, flair, "w", T0)
    with write_session(sessions) as session:
        cancel_job(session, flair, "cli:admin", report_queue="jobs", now=T0)
    assert _job(sessions, flair).state is JobState.CANCELLED
    # The worker still running it finds out at its next renewal and its result is dropped.
    with write_session(sessions) as session:
        assert not renew_lease(session, flair, "w", lease_s=LEASE_S, now=T0)
    assert _complete(sessions, flair, "w", T0) is False
    with write_session(sessions) as session, pytest.raises(JobTransitionError, match="cancelled"):
        cancel_job(session, flair, "cli:admin", report_queue="jobs", now=T0)
    with write_session(sessions) as session:
        retry_job(session, flair, "cli:admin", now=T0)
    job = _job(sessions, flair)
    assert (job.state, job.attempt) == (JobState.PENDING, 0)
    assert "retried by cli:admin (was cancelled)" in job.reason
    assert isinstance(_outbox(sessions)[-1], JobMessage)
    with write_session(sessions) as session, pytest.raises(JobTransitionError, match="pending"):
        retry_job(session, other, "cli:admin", now=T0)


def test_reprocessing_a_reported_study_sends_a_new_report_version(
    sessions: sessionmaker[Session],
) -> None:
    [flair] = _study_with_jobs(sessions, ["flair"])
    _claim(sessions, flair, "w", T0)
    _complete(sessions, flair, "w", T0 + timedelta(seconds=1))
    with sessions() as session:
        report_id = session.scalars(select(Job.id).where(Job.pipeline == REPORT_PIPELINE)).one()
    claim = _claim(sessions, report_id, "w", T0 + timedelta(seconds=2))
    assert claim.ticket is not None and claim.ticket.report_version == 1
    with sessions() as session:
        inputs = json.loads(session.get_one(Job, report_id).result_json or "{}")["inputs"]
    completion = Completion({"kind": "report", "version": 1, "inputs": inputs}, {}, [], Path("/"),
                            "report version 1")  # fmt: skip
    with write_session(sessions) as session:
        assert complete_job(session, report_id, "w", completion, destinations=[],
                            report_queue="jobs", now=T0 + timedelta(seconds=3))  # fmt: skip
        assert session.get_one(Study, _job(sessions, flair).study_id).report_version == 1
    assert _job(sessions, report_id).state is JobState.SUCCEEDED  # nothing changed: no rerun
    # An operator re-processes the FLAIR job; when it succeeds the report runs again.
    with write_session(sessions) as session:
        retry_job(session, flair, "cli:admin", now=T0 + timedelta(seconds=10))
    assert _job(sessions, report_id).state is JobState.SUCCEEDED  # waits for the FLAIR job
    _claim(sessions, flair, "w", T0 + timedelta(seconds=11))
    _complete(sessions, flair, "w", T0 + timedelta(seconds=12))
    report = _job(sessions, report_id)
    assert report.state is JobState.PENDING and "new version" in report.reason
    again = _claim(sessions, report_id, "w", T0 + timedelta(seconds=13))
    assert again.ticket is not None and again.ticket.report_version == 2


def test_a_running_job_whose_message_was_lost_is_published_again(
    sessions: sessionmaker[Session],
) -> None:
    from lesionwatch.service.jobs import requeue_stalled_jobs

    stalled, healthy = _study_with_jobs(sessions, ["flair", "enhancing"])
    _claim(sessions, stalled, "gone:0", T0)
    _claim(sessions, healthy, "alive:0", T0 + timedelta(minutes=20))
    now = T0 + timedelta(minutes=20, seconds=10)
    assert requeue_stalled_jobs(sessions, LEASE_S, grace_s=600, now=now) == 1
    [message] = _outbox(sessions)
    assert isinstance(message, JobMessage) and message.job_id == stalled
    # Once per grace period, not at every pass.
    assert requeue_stalled_jobs(sessions, LEASE_S, grace_s=600, now=now) == 0


def test_the_report_says_what_the_enhancing_guard_did_and_that_it_is_unvalidated() -> None:
    from lesionwatch.pipelines.enhancing_guard import CandidateReview, RemovalReason
    from lesionwatch.pipelines.registry import PIPELINES
    from lesionwatch.service.job_execution import finding_notes

    checked = CandidateReview(9, {RemovalReason.NO_FLAIR_LESION.value: 7}, True)
    texts = [note.detail for note in finding_notes(PIPELINES["enhancing"], checked)]
    assert texts[0].startswith("Enhancing lesions: found by a model trained on synthetic")
    assert texts[1] == (
        "Enhancing lesions: 7 of 9 candidate(s) removed as not plausible: 7 outside every "
        "FLAIR lesion"
    )
    unchecked = CandidateReview(2, {}, False)
    texts = [note.detail for note in finding_notes(PIPELINES["enhancing"], unchecked)]
    assert texts[-1] == (
        "Enhancing lesions unconfirmed: the study has no FLAIR series to check them against"
    )
    assert finding_notes(PIPELINES["flair"], None) == []
