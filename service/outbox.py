"""The transactional outbox: messages committed with the state that caused them, published after.

Producers (the assembler creating jobs, a worker queueing deliveries or a study report, an
operator retrying a job) call `add_message` inside their own transaction. Once that commits,
`OutboxRelay.publish_pending` hands the rows to the broker and deletes each one the broker
confirmed. A crash between commit and publish leaves the row, which the next pass (in any
process) publishes: the message is late, never lost. A crash between publish and delete
publishes it twice; consumers are idempotent (the job state machine skips finished work).

Rows are claimed for `claim_s` before publishing (PostgreSQL: FOR UPDATE SKIP LOCKED), so
several relays (one per process) do not publish the same row at the same time, and no
transaction stays open while the broker is called.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lesionwatch.service.broker import Broker, BrokerError

from .db.models import utcnow
from .db.work_models import OutboxMessage
from .messages import DeliveryMessage, JobMessage

__all__ = ["OutboxRelay", "add_message"]

LOG = logging.getLogger(__name__)


def add_message(
    session: Session, queue: str, message: JobMessage | DeliveryMessage, *, priority: int = 0
) -> OutboxMessage:
    """Queue `message` for publishing once the caller's transaction commits."""
    row = OutboxMessage(
        queue=queue,
        body=message.encode().decode(),
        priority=priority,
        created_at=utcnow(),
        publish_attempts=0,
        last_error="",
    )
    session.add(row)
    return row


class OutboxRelay:
    """Publishes committed outbox rows. Call `publish_pending` after a commit, and on a timer."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        broker: Broker,
        *,
        batch_size: int = 100,
        claim_s: float = 30.0,
    ) -> None:
        self._sessions = sessions
        self._broker = broker
        self._batch_size = batch_size
        self._claim_s = claim_s
        self._lock = threading.Lock()  # one pass at a time per process

    def _claim(self) -> list[tuple[int, str, str, int]]:
        now = utcnow()
        with self._sessions.begin() as session:
            rows = session.scalars(
                select(OutboxMessage)
                .where(OutboxMessage.claimed_until.is_(None) | (OutboxMessage.claimed_until < now))
                .order_by(OutboxMessage.id)
                .limit(self._batch_size)
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                row.claimed_until = now + timedelta(seconds=self._claim_s)
                row.publish_attempts += 1
            return [(row.id, row.queue, row.body, row.priority) for row in rows]

    def publish_pending(self) -> int:
        """Publish every committed, unclaimed row; the number published. Never raises."""
        with self._lock:
            published = 0
            while True:
                try:
                    claimed = self._claim()
                except SQLAlchemyError as exc:
                    LOG.warning(
                        "outbox: database unavailable (%s); will retry", exc.__class__.__name__
                    )
                    return published
                if not claimed:
                    return published
                done: list[int] = []
                failure = ""
                for row_id, queue, body, priority in claimed:
                    try:
                        self._broker.publish(
                            queue, body.encode(), priority=priority, message_id=f"outbox-{row_id}"
                        )
                    except BrokerError as exc:
                        failure = str(exc)
                        break
                    done.append(row_id)
                self._settle(done, claimed, failure)
                published += len(done)
                if failure:
                    LOG.warning(
                        "outbox: broker unavailable, %d message(s) wait: %s",
                        len(claimed) - len(done),
                        failure,
                    )
                    return published
                if len(claimed) < self._batch_size:
                    return published

    def _settle(
        self, done: list[int], claimed: list[tuple[int, str, str, int]], failure: str
    ) -> None:
        try:
            with self._sessions.begin() as session:
                if done:
                    session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(done)))
                undone = [row[0] for row in claimed if row[0] not in set(done)]
                if undone:
                    # Free the claim so the next pass (here or elsewhere) tries again.
                    session.execute(
                        update(OutboxMessage)
                        .where(OutboxMessage.id.in_(undone))
                        .values(claimed_until=None, last_error=failure[:2000])
                    )
        except SQLAlchemyError as exc:
            # The rows stay claimed until claim_s passes, then are published again: a duplicate
            # message, which consumers handle.
            LOG.warning("outbox: could not record published rows (%s)", exc.__class__.__name__)

    def pending(self) -> int:
        with self._sessions() as session:
            return len(session.scalars(select(OutboxMessage.id)).all())
