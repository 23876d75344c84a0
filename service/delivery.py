"""The result outbox: which result files go to which destination, and when to try next.

Producers (the worker, after writing SEG/SR/fallback images) call `enqueue_results` in the
transaction that records the job's outcome. The dispatcher then `claim_due`s rows (the claim
and an IN_PROGRESS attempt are committed before anything is sent), sends them, and
`record_result`s each instance's outcome. A claim is a lease: if the dispatcher dies
mid-send, the row becomes due again when the lease runs out, its open attempt is marked
INTERRUPTED, and the instance is resent; the PACS replaces it, since result UIDs are
deterministic.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from lesionwatch.config.schema import DeliveryConfig
from lesionwatch.dicom_io.scu import Outcome
from lesionwatch.service.db.delivery_models import (
    AttemptOutcome,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
)
from lesionwatch.service.db.models import utcnow

__all__ = [
    "ClaimedDelivery",
    "ResultFileError",
    "backoff_delay_s",
    "claim_due",
    "enqueue_results",
    "list_deliveries",
    "record_result",
]


class ResultFileError(ValueError):
    """A result file handed to the outbox is not a readable DICOM file with SOP UIDs."""


@dataclass(frozen=True)
class ClaimedDelivery:
    """What the dispatcher needs to send one claimed row, detached from the session."""

    delivery_id: int
    attempt_id: int
    attempts: int
    path: str
    destination: str
    sop_instance_uid: str
    sop_class_uid: str = ""
    job_id: int | None = None


def backoff_delay_s(policy: DeliveryConfig, attempts: int) -> float:
    """Delay before the next try after `attempts` transient failures: exponential with a cap."""
    try:
        delay_s = policy.initial_backoff_s * policy.backoff_factor ** max(attempts - 1, 0)
    except OverflowError:  # a huge attempt count: the cap applies anyway
        return policy.max_backoff_s
    return min(policy.max_backoff_s, delay_s)


def _read_uids(path: Path) -> tuple[str, str]:
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SOPClassUID"])
        return str(ds.SOPInstanceUID), str(ds.SOPClassUID)
    except (OSError, InvalidDicomError, AttributeError) as exc:
        raise ResultFileError(f"result file {path} cannot be queued for delivery: {exc}") from exc


def enqueue_results(
    session: Session,
    paths: Iterable[Path],
    destinations: Iterable[str],
    *,
    job_id: int | None = None,
    now: datetime | None = None,
    stored_path: dict[Path, str] | None = None,
) -> list[Delivery]:
    """Queue every result file for every destination (the caller commits).

    A (SOP Instance UID, destination) already in the outbox is reset to PENDING with a fresh
    attempt budget: a regenerated result replaces the earlier one at the destination.
    `stored_path` optionally maps a path to the string recorded in the row (e.g. relative to
    the data directory); by default the path is recorded as given.
    """
    now = now or utcnow()
    names = list(dict.fromkeys(destinations))
    queued: list[Delivery] = []
    for path in paths:
        sop_instance_uid, sop_class_uid = _read_uids(path)
        recorded = (stored_path or {}).get(path, str(path))
        for name in names:
            row = session.scalar(
                select(Delivery).where(
                    Delivery.sop_instance_uid == sop_instance_uid, Delivery.destination == name
                )
            )
            if row is None:
                row = Delivery(sop_instance_uid=sop_instance_uid, destination=name, created_at=now)
                session.add(row)
            elif row.state != DeliveryState.PENDING or row.attempts:
                row.last_reason = f"re-queued at {now.isoformat()} (was {row.state.value})"
            row.sop_class_uid = sop_class_uid
            row.path = recorded
            row.job_id = job_id if job_id is not None else row.job_id
            row.state = DeliveryState.PENDING
            row.attempts = 0
            row.next_attempt_at = now
            row.last_status = None
            row.sent_at = None
            row.updated_at = now
            queued.append(row)
    session.flush()
    return queued


def claim_due(
    session: Session,
    now: datetime,
    *,
    destination: str,
    limit: int,
    lease_s: float,
    max_attempts: int,
) -> list[ClaimedDelivery]:
    """Claim up to `limit` due PENDING rows of one destination and open an attempt for each.

    The caller commits before sending. On PostgreSQL, rows locked by another dispatcher's
    claim are skipped. Rows whose budget was used up by interrupted attempts give up here.
    """
    rows = session.scalars(
        select(Delivery)
        .where(
            Delivery.state == DeliveryState.PENDING,
            Delivery.destination == destination,
            Delivery.next_attempt_at <= now,
        )
        .order_by(Delivery.next_attempt_at, Delivery.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    claimed: list[ClaimedDelivery] = []
    for row in rows:
        for open_attempt in session.scalars(
            select(DeliveryAttempt).where(
                DeliveryAttempt.delivery_id == row.id,
                DeliveryAttempt.outcome == AttemptOutcome.IN_PROGRESS,
            )
        ):
            open_attempt.outcome = AttemptOutcome.INTERRUPTED
            open_attempt.finished_at = now
            open_attempt.reason = "the dispatcher stopped before recording an outcome; resending"
        if row.attempts >= max_attempts:
            row.state = DeliveryState.GAVE_UP
            row.last_reason = (
                f"gave up after {row.attempts} attempts; the last was interrupted. "
                f"Earlier: {row.last_reason}"
            )
            row.updated_at = now
            continue
        row.attempts += 1
        row.next_attempt_at = now + timedelta(seconds=lease_s)
        row.updated_at = now
        attempt = DeliveryAttempt(delivery_id=row.id, started_at=now)
        session.add(attempt)
        session.flush()
        claimed.append(
            ClaimedDelivery(
                row.id,
                attempt.id,
                row.attempts,
                row.path,
                row.destination,
                row.sop_instance_uid,
                row.sop_class_uid,
                row.job_id,
            )
        )
    return claimed


_ATTEMPT_OUTCOME = {
    Outcome.SUCCESS: AttemptOutcome.SUCCESS,
    Outcome.WARNING: AttemptOutcome.WARNING,
    Outcome.TRANSIENT: AttemptOutcome.TRANSIENT,
    Outcome.PERMANENT: AttemptOutcome.PERMANENT,
}


def record_result(
    session: Session,
    claimed: ClaimedDelivery,
    outcome: Outcome,
    status: int | None,
    reason: str,
    *,
    now: datetime,
    policy: DeliveryConfig,
) -> DeliveryState:
    """Close the attempt and move the delivery on (the caller commits)."""
    row = session.get_one(Delivery, claimed.delivery_id)
    attempt = session.get_one(DeliveryAttempt, claimed.attempt_id)
    attempt.finished_at = now
    attempt.outcome = _ATTEMPT_OUTCOME[outcome]
    attempt.status = status
    attempt.reason = reason
    if row.state != DeliveryState.PENDING or row.attempts != claimed.attempts:
        return row.state  # re-queued or changed meanwhile; the attempt stays on record
    row.last_status = status
    row.updated_at = now
    if outcome in (Outcome.SUCCESS, Outcome.WARNING):
        row.state = DeliveryState.SENT
        row.sent_at = now
        row.last_reason = reason
    elif outcome == Outcome.PERMANENT:
        row.state = DeliveryState.FAILED_PERMANENT
        row.last_reason = reason
    elif row.attempts >= policy.max_attempts:
        row.state = DeliveryState.GAVE_UP
        row.last_reason = f"gave up after {row.attempts} attempts: {reason}"
    else:
        delay_s = backoff_delay_s(policy, row.attempts)
        row.next_attempt_at = now + timedelta(seconds=delay_s)
        row.last_reason = f"{reason} (attempt {row.attempts}, next try in {delay_s:g} s)"
    return row.state


def list_deliveries(
    session: Session,
    *,
    destination: str | None = None,
    states: Collection[DeliveryState] | None = None,
    job_id: int | None = None,
    sop_instance_uid: str | None = None,
) -> list[Delivery]:
    """Deliveries with their state and last reason (attempts via `.attempt_log`), oldest first."""
    query = select(Delivery).order_by(Delivery.id)
    if destination is not None:
        query = query.where(Delivery.destination == destination)
    if states is not None:
        query = query.where(Delivery.state.in_(list(states)))
    if job_id is not None:
        query = query.where(Delivery.job_id == job_id)
    if sop_instance_uid is not None:
        query = query.where(Delivery.sop_instance_uid == sop_instance_uid)
    return list(session.scalars(query))
