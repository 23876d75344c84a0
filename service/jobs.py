"""The job state machine: every transition of a job row, fenced by its lease and audited.

    PENDING --claim--> RUNNING --complete--> SUCCEEDED
                          |--fail (attempts left)--> RETRYING --claim--> RUNNING ...
                          |--fail (attempts used up)--> FAILED (dead-lettered, reason kept)
                          |--release (worker shutting down)--> PENDING
    PENDING/RETRYING/RUNNING --cancel--> CANCELLED
    FAILED/CANCELLED/SUCCEEDED/SKIPPED --retry (operator)--> PENDING

A worker holds a RUNNING job through a lease (`lease_owner`, `lease_expires_at`) that its
heartbeats renew. Every transition a worker makes names its worker id and succeeds only while
it still holds the lease, so a worker that stalled past its lease (and lost the job to another
worker, or to an operator's cancel) cannot overwrite the newer outcome. A message that names a
finished job is acknowledged without running anything: redelivery is harmless.

Each function works inside the caller's transaction (`service.db.engine.write_session`); the
messages it causes go to the outbox in that same transaction.

When the last running job of a study ends, `schedule_report` queues the study's report job:
one SR that gathers every pipeline's latest result and says which did not run and why.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lesionwatch.config.schema import WorkerConfig

from .audit import record_event, record_job_transition
from .db.models import REPORT_PIPELINE, Job, JobState, Study
from .delivery import enqueue_results
from .messages import DELIVERY_QUEUE, DeliveryMessage, JobMessage
from .outbox import add_message

__all__ = [
    "ACTIVE_STATES",
    "Claim",
    "ClaimKind",
    "Completion",
    "FailureDecision",
    "FailureKind",
    "JobTicket",
    "JobTransitionError",
    "RetryPolicy",
    "cancel_job",
    "claim_job",
    "complete_job",
    "create_job",
    "fail_attempt",
    "inputs_signature",
    "latest_per_pipeline",
    "publish_job",
    "release_job",
    "renew_lease",
    "requeue_stalled_jobs",
    "retry_job",
    "schedule_report",
    "skip_job",
]

ACTIVE_STATES = (JobState.PENDING, JobState.RUNNING, JobState.RETRYING)


class JobTransitionError(ValueError):
    """An operator asked for a transition the job's state does not allow."""


class FailureKind(enum.StrEnum):
    TRANSIENT = "transient"  # may succeed later (database away, worker crashed, out of memory)
    PERMANENT = "permanent"  # the input itself is the problem (unreadable series, bad weights)
    TIMEOUT = "timeout"  # ran past worker.job_timeout_s


class ClaimKind(enum.StrEnum):
    RUN = "run"  # this worker now holds the job
    SKIP = "skip"  # nothing to do (finished, cancelled, superseded, unknown): ack the message
    BUSY = "busy"  # another live worker holds it: try the message again later


@dataclass(frozen=True)
class JobTicket:
    """What a worker needs of a claimed job, detached from the session."""

    job_id: int
    study_id: int
    study_instance_uid: str
    pipeline: str
    generation: int
    attempt: int
    queue: str
    priority: int
    prior_study_id: int | None
    report_version: int  # the version the study's report gets if this is the report job


@dataclass(frozen=True)
class Claim:
    kind: ClaimKind
    reason: str = ""
    retry_after_s: float = 0.0
    ticket: JobTicket | None = None


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    initial_delay_s: float
    backoff_factor: float
    max_delay_s: float

    @classmethod
    def from_config(cls, worker: WorkerConfig) -> RetryPolicy:
        return cls(
            worker.max_attempts,
            worker.retry_initial_delay_s,
            worker.retry_backoff_factor,
            worker.retry_max_delay_s,
        )

    def delay_s(self, failed_attempts: int) -> float:
        """Wait before the next attempt after `failed_attempts` failures (exponential, capped)."""
        try:
            delay = self.initial_delay_s * self.backoff_factor ** max(failed_attempts - 1, 0)
        except OverflowError:
            return self.max_delay_s
        return min(self.max_delay_s, delay)


def _job_for_update(session: Session, job_id: int) -> Job | None:
    return session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one_or_none()


def _study_uid(session: Session, study_id: int) -> str:
    return session.scalars(select(Study.study_instance_uid).where(Study.id == study_id)).one()


def _lock_study(session: Session, study_id: int) -> Study:
    # Study before job, everywhere: concurrent completions of one study's jobs serialise here.
    return session.scalars(select(Study).where(Study.id == study_id).with_for_update()).one()


def _lock(session: Session, job_id: int) -> tuple[Study, Job] | None:
    """The job and its study, locked in that order (None: no such job)."""
    study_id = session.scalar(select(Job.study_id).where(Job.id == job_id))
    if study_id is None:
        return None
    study = _lock_study(session, study_id)
    job = _job_for_update(session, job_id)
    return None if job is None else (study, job)


def _lock_held(session: Session, job_id: int, worker_id: str) -> tuple[Study, Job] | None:
    """As `_lock`, but only while `worker_id` still holds the job's lease."""
    locked = _lock(session, job_id)
    if locked is None or not _lease_held(locked[1], worker_id):
        return None
    return locked


def _move(
    session: Session,
    actor: str,
    study: Study,
    job: Job,
    state: JobState,
    reason: str,
    now: datetime,
    *,
    finished: bool,
) -> None:
    """Set `job`'s state and reason, drop its lease, and audit the transition."""
    previous = job.state
    job.state = state
    job.reason = reason
    job.updated_at = now
    if finished:
        job.finished_at = now
    _clear_lease(job)
    record_job_transition(
        session, actor, job, previous, study_instance_uid=study.study_instance_uid,
        detail=reason, at=now,
    )  # fmt: skip


def job_message(job: Job, study_instance_uid: str) -> JobMessage:
    return JobMessage(
        job_id=job.id,
        study_instance_uid=study_instance_uid,
        pipeline=job.pipeline,
        generation=job.generation,
        attempt=job.attempt,
    )


def publish_job(session: Session, job: Job, study_instance_uid: str) -> None:
    """Queue `job`'s message for after the commit (the job row must be flushed)."""
    if job.id is None:
        session.flush()
    add_message(session, job.queue, job_message(job, study_instance_uid), priority=job.priority)


def _lease_held(job: Job, worker_id: str) -> bool:
    return job.state == JobState.RUNNING and job.lease_owner == worker_id


def _clear_lease(job: Job) -> None:
    job.lease_owner = None
    job.lease_expires_at = None


def claim_job(
    session: Session, job_id: int, worker_id: str, *, lease_s: float, now: datetime
) -> Claim:
    """Take job `job_id` for `worker_id`, if it is due and nobody alive holds it."""
    job = _job_for_update(session, job_id)
    if job is None:
        return Claim(ClaimKind.SKIP, f"job {job_id} does not exist (deleted)")
    if job.state.terminal:
        return Claim(ClaimKind.SKIP, f"job {job_id} is already {job.state.value}")
    if (
        job.state == JobState.RUNNING
        and job.lease_owner != worker_id
        and job.lease_expires_at is not None
        and job.lease_expires_at > now
    ):
        remaining = (job.lease_expires_at - now).total_seconds()
        return Claim(
            ClaimKind.BUSY, f"job {job_id} is running on {job.lease_owner}", remaining + 1.0
        )
    previous = job.state
    taken_over = previous == JobState.RUNNING
    study = session.get_one(Study, job.study_id)
    job.state = JobState.RUNNING
    job.attempt += 1
    job.lease_owner = worker_id
    job.lease_expires_at = now + timedelta(seconds=lease_s)
    job.started_at = now
    job.next_attempt_at = None
    job.updated_at = now
    record_job_transition(
        session,
        worker_id,
        job,
        previous,
        study_instance_uid=study.study_instance_uid,
        detail=f"attempt {job.attempt}"
        + (" (taken over: the previous holder stopped renewing its lease)" if taken_over else ""),
        at=now,
    )
    return Claim(
        ClaimKind.RUN,
        ticket=JobTicket(
            job.id,
            job.study_id,
            study.study_instance_uid,
            job.pipeline,
            job.generation,
            job.attempt,
            job.queue,
            job.priority,
            job.prior_study_id,
            study.report_version + 1,
        ),
    )


def renew_lease(
    session: Session, job_id: int, worker_id: str, *, lease_s: float, now: datetime
) -> bool:
    """Extend the lease; False when the worker no longer holds the job (cancelled, taken)."""
    job = session.get(Job, job_id)
    if job is None or not _lease_held(job, worker_id):
        return False
    job.lease_expires_at = now + timedelta(seconds=lease_s)
    return True


@dataclass(frozen=True)
class Completion:
    """The outcome of a successful run, as the worker hands it to `complete_job`."""

    result: dict[str, Any]  # JSON-able finding record (read by the report job)
    timings_s: dict[str, float]
    files: Sequence[Path]  # result DICOM files, in send order
    data_dir: Path  # result paths are recorded relative to it
    summary: str  # one line for `lesionwatch jobs`


def complete_job(
    session: Session,
    job_id: int,
    worker_id: str,
    completion: Completion,
    *,
    destinations: Iterable[str],
    report_queue: str,
    now: datetime,
) -> bool:
    """Mark the job SUCCEEDED and queue its results for delivery, in the caller's transaction.

    False (nothing changed) when the worker lost the job meanwhile; its results are then
    discarded by the caller.
    """
    locked = _lock_held(session, job_id, worker_id)
    if locked is None:
        return False
    study, job = locked
    job.failure_kind = ""
    job.result_json = json.dumps(completion.result)
    job.timings_json = json.dumps(completion.timings_s)
    if job.pipeline == REPORT_PIPELINE:
        study.report_version = int(completion.result.get("version", study.report_version + 1))
    _move(session, worker_id, study, job, JobState.SUCCEEDED, completion.summary, now,
          finished=True)  # fmt: skip
    names = list(dict.fromkeys(destinations))
    paths = list(completion.files)
    if paths and names:
        relative = {p: str(p.relative_to(completion.data_dir)) for p in paths}
        queued = enqueue_results(
            session, paths, names, job_id=job.id, now=now, stored_path=relative
        )
        for delivery in queued:
            record_event(
                session,
                worker_id,
                "object.queued",
                job_id=job.id,
                study_instance_uid=study.study_instance_uid,
                sop_instance_uid=delivery.sop_instance_uid,
                sop_class_uid=delivery.sop_class_uid,
                destination=delivery.destination,
                detail=delivery.path,
                at=now,
            )
        add_message(
            session,
            DELIVERY_QUEUE,
            DeliveryMessage(job_id=job.id, study_instance_uid=study.study_instance_uid),
            priority=job.priority,
        )
    schedule_report(session, study, worker_id, report_queue=report_queue, now=now)
    return True


@dataclass(frozen=True)
class FailureDecision:
    dead_lettered: bool
    retry_in_s: float
    reason: str


def fail_attempt(
    session: Session,
    job_id: int,
    worker_id: str,
    *,
    reason: str,
    kind: FailureKind,
    policy: RetryPolicy,
    report_queue: str,
    now: datetime,
) -> FailureDecision | None:
    """Record a failed attempt: RETRYING with a delay, or FAILED once attempts are used up.

    None when the worker no longer held the job (nothing recorded).
    """
    locked = _lock_held(session, job_id, worker_id)
    if locked is None:
        return None
    study, job = locked
    job.failure_kind = kind.value
    if job.attempt >= policy.max_attempts:
        reason = f"dead-lettered after {job.attempt} attempt(s); last failure ({kind}): {reason}"
        _move(session, worker_id, study, job, JobState.FAILED, reason, now, finished=True)
        schedule_report(session, study, worker_id, report_queue=report_queue, now=now)
        return FailureDecision(True, 0.0, reason)
    delay_s = policy.delay_s(job.attempt)
    job.next_attempt_at = now + timedelta(seconds=delay_s)
    reason = (
        f"attempt {job.attempt} of {policy.max_attempts} failed ({kind}): {reason}; "
        f"next attempt in {delay_s:g} s"
    )
    _move(session, worker_id, study, job, JobState.RETRYING, reason, now, finished=False)
    return FailureDecision(False, delay_s, reason)


def release_job(
    session: Session, job_id: int, worker_id: str, *, reason: str, now: datetime
) -> bool:
    """Give a running job back without counting the attempt (worker shutting down)."""
    locked = _lock_held(session, job_id, worker_id)
    if locked is None:
        return False
    study, job = locked
    job.attempt = max(0, job.attempt - 1)
    _move(session, worker_id, study, job, JobState.PENDING, reason, now, finished=False)
    return True


def skip_job(
    session: Session,
    job_id: int,
    worker_id: str,
    *,
    reason: str,
    report_queue: str,
    now: datetime,
) -> bool:
    """The job cannot run for this study (e.g. no prior exam any more): SKIPPED with why."""
    locked = _lock_held(session, job_id, worker_id)
    if locked is None:
        return False
    study, job = locked
    _move(session, worker_id, study, job, JobState.SKIPPED, reason, now, finished=True)
    schedule_report(session, study, worker_id, report_queue=report_queue, now=now)
    return True


def cancel_job(
    session: Session, job_id: int, actor: str, *, report_queue: str, now: datetime
) -> Job:
    """Stop a job that has not finished; a worker running it discards its results."""
    locked = _lock(session, job_id)
    if locked is None:
        raise JobTransitionError(f"no job {job_id}")
    study, job = locked
    if job.state.terminal:
        raise JobTransitionError(
            f"job {job_id} is {job.state.value}; only pending, retrying or running jobs can be "
            "cancelled"
        )
    _move(session, actor, study, job, JobState.CANCELLED, f"cancelled by {actor}", now,
          finished=True)  # fmt: skip
    schedule_report(session, study, actor, report_queue=report_queue, now=now)
    return job


def retry_job(session: Session, job_id: int, actor: str, *, now: datetime) -> Job:
    """Run a finished job again (failed, cancelled, skipped, or succeeded: re-processing).

    Its results replace the earlier ones at the destinations, and the study's report is sent
    again as a new version.
    """
    locked = _lock(session, job_id)
    if locked is None:
        raise JobTransitionError(f"no job {job_id}")
    study, job = locked
    if not job.state.terminal:
        raise JobTransitionError(f"job {job_id} is {job.state.value} already; nothing to retry")
    if job.state == JobState.SUPERSEDED:
        raise JobTransitionError(
            f"job {job_id} was superseded by a later generation of its study; retry that one"
        )
    _reset(session, actor, study, job, f"retried by {actor} (was {job.state.value})", now)
    publish_job(session, job, study.study_instance_uid)
    return job


def _reset(
    session: Session, actor: str, study: Study, job: Job, reason: str, now: datetime
) -> None:
    """Make a finished job PENDING again, with a fresh attempt budget."""
    job.attempt = 0
    job.failure_kind = ""
    job.next_attempt_at = None
    job.finished_at = None
    _move(session, actor, study, job, JobState.PENDING, reason, now, finished=False)


def latest_per_pipeline(jobs: Iterable[Job]) -> dict[str, Job]:
    """Each pipeline's most recent job of a study (newest generation, then newest row),
    ignoring superseded ones; the report job is not a pipeline."""
    latest: dict[str, Job] = {}
    for job in jobs:
        if job.pipeline == REPORT_PIPELINE or job.state == JobState.SUPERSEDED:
            continue
        current = latest.get(job.pipeline)
        if current is None or (job.generation, job.id) > (current.generation, current.id):
            latest[job.pipeline] = job
    return latest


def inputs_signature(latest: dict[str, Job]) -> list[list[Any]]:
    return [
        [name, job.id, job.state.value, job.finished_at.isoformat() if job.finished_at else ""]
        for name, job in sorted(latest.items())
    ]


def schedule_report(
    session: Session, study: Study, actor: str, *, report_queue: str, now: datetime
) -> Job | None:
    """Queue the study report when no pipeline job of `study` is still active and the
    pipelines' outcomes changed since the last report (the caller holds the study lock)."""
    jobs = list(session.scalars(select(Job).where(Job.study_id == study.id)))
    if any(j.state in ACTIVE_STATES for j in jobs if j.pipeline != REPORT_PIPELINE):
        return None
    latest = latest_per_pipeline(jobs)
    if not any(j.state == JobState.SUCCEEDED for j in latest.values()):
        return None  # nothing was measured: no report (job states say why)
    signature = inputs_signature(latest)
    reports = sorted(
        (j for j in jobs if j.pipeline == REPORT_PIPELINE), key=lambda j: (j.generation, j.id)
    )
    report = next((j for j in reports if j.generation == study.generation), None)
    if report is not None:
        if report.state in ACTIVE_STATES:
            return None  # it reads the newest outcomes when it runs
        recorded = json.loads(report.result_json or "{}").get("inputs")
        if recorded == signature:
            return None  # already reported (or failed on exactly these outcomes)
        report.result_json = json.dumps({"inputs": signature})
        reason = "outcomes changed since the last report: a new version will be sent"
        _reset(session, actor, study, report, reason, now)
    else:
        report = create_job(
            session,
            actor,
            study,
            REPORT_PIPELINE,
            queue=report_queue,
            # A finished study's report (light work) goes out before the next heavy job.
            priority=min(study.priority + 1, 9),
            reason="every pipeline of the study has finished",
            now=now,
        )
        report.result_json = json.dumps({"inputs": signature})
    publish_job(session, report, study.study_instance_uid)
    return report


def create_job(
    session: Session,
    actor: str,
    study: Study,
    pipeline: str,
    *,
    queue: str,
    priority: int,
    now: datetime,
    state: JobState = JobState.PENDING,
    reason: str = "",
    prior_study_id: int | None = None,
) -> Job:
    """A new job row of `study`'s current generation, audited (the caller publishes it)."""
    job = Job(
        study_id=study.id,
        pipeline=pipeline,
        generation=study.generation,
        state=state,
        attempt=0,
        reason=reason,
        queue=queue,
        priority=priority,
        prior_study_id=prior_study_id,
        created_at=now,
        updated_at=now,
        finished_at=now if state.terminal else None,
    )
    session.add(job)
    session.flush()
    record_job_transition(
        session, actor, job, None, study_instance_uid=study.study_instance_uid, detail=reason,
        at=now,
    )  # fmt: skip
    return job


def requeue_stalled_jobs(
    sessions: Any, lease_s: float, *, grace_s: float = 600.0, now: datetime | None = None
) -> int:
    """Publish again the message of RUNNING jobs whose lease ran out long ago.

    A worker that dies loses its lease and the broker hands its message to another worker, so
    this finds nothing in normal operation. It covers a message lost outside LesionWatch (a
    purged or deleted queue): the job runs again instead of staying RUNNING for ever. A
    duplicate message is harmless (the claim skips finished jobs).
    """
    from .db.engine import write_session

    now = now or datetime.now(tz=UTC)
    cutoff = now - timedelta(seconds=lease_s + grace_s)
    with write_session(sessions) as session:
        stalled = session.scalars(
            select(Job).where(Job.state == JobState.RUNNING, Job.lease_expires_at < cutoff)
        ).all()
        for job in stalled:
            job.lease_expires_at = now  # one republish per grace period
            record_event(
                session,
                "relay",
                "job.requeued",
                job_id=job.id,
                study_instance_uid=_study_uid(session, job.study_id),
                from_state=job.state.value,
                to_state=job.state.value,
                detail=f"lease of {job.lease_owner} ran out; message published again",
                at=now,
            )
            publish_job(session, job, _study_uid(session, job.study_id))
    return len(stalled)
