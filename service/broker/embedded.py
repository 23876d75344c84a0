"""The embedded broker: a durable queue in the project's own database (SQLite or PostgreSQL).

A message is a `queue_message` row. A consumer claims the best deliverable row in one
statement, ``UPDATE ... WHERE id = (SELECT ... LIMIT 1) RETURNING``, which sets a lease (a
random owner token and an expiry) and counts the delivery. On PostgreSQL the sub-select takes
``FOR UPDATE SKIP LOCKED``, so concurrent consumers never wait on each other's rows; on SQLite
the claim runs in ``BEGIN IMMEDIATE``, which serialises claimers on the database's one write
lock. Ack deletes the row, retry and release put it back, dead-letter keeps it with a reason:
all fenced by the owner token, so a consumer whose lease ran out (it stalled, it was killed)
cannot settle a message that was meanwhile handed to someone else. Nothing is deleted when a
message is taken, only when it is acked (huey's SQLite queue deletes on dequeue and loses the
message when the consumer dies).

Waiting consumers poll with a growing interval (50 ms up to `poll_interval_s`); a publish in
the same process wakes them at once, and on PostgreSQL a NOTIFY wakes consumers in other
processes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, case, delete, func, insert, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError

from lesionwatch.service.db.models import utcnow
from lesionwatch.service.db.work_models import MessageState, QueueMessage

from .base import Broker, BrokerUnavailableError, DeadLetter, QueueDepth, ReceivedMessage

__all__ = ["EmbeddedBroker"]

LOG = logging.getLogger(__name__)

_NOTIFY_CHANNEL = "lesionwatch_queue"
_FIRST_POLL_S = 0.05
_COMMIT_CHECK_S = 0.05  # SQLite: how often a waiting consumer looks for other processes' commits
_QM = QueueMessage


def _unavailable(exc: Exception, doing: str) -> BrokerUnavailableError:
    orig = getattr(exc, "orig", exc)
    return BrokerUnavailableError(f"embedded queue: cannot {doing}: {orig}")


class _CommitWatch:
    """Tells when another connection (another process) committed to the SQLite database.

    ``PRAGMA data_version`` changes on a connection whenever another connection commits; one
    cheap read every 50 ms lets a consumer in `lesionwatch work` see a job published by
    `lesionwatch listen` at once instead of at its next poll (up to `poll_interval_s`).
    """

    def __init__(self, engine: Engine) -> None:
        self._conn = engine.connect()
        self._version = self._read()

    def _read(self) -> int:
        try:
            value = self._conn.exec_driver_sql("PRAGMA data_version").scalar()
        finally:
            self._conn.rollback()
        return int(value or 0)

    def changed(self) -> bool:
        try:
            version = self._read()
        except (OperationalError, DBAPIError):
            return True  # let the caller look (and report the database problem)
        changed = version != self._version
        self._version = version
        return changed

    def close(self) -> None:
        self._conn.close()


class _EmbeddedMessage(ReceivedMessage):
    def __init__(
        self,
        broker: EmbeddedBroker,
        row_id: int,
        token: str,
        queue: str,
        body: bytes,
        delivery_count: int,
        priority: int,
    ) -> None:
        super().__init__(queue, body, delivery_count, priority)
        self._broker = broker
        self.row_id = row_id
        self.token = token

    def _fenced(self, statement: Any, doing: str) -> bool:
        """Run `statement` (already restricted to this delivery); False if the lease was lost."""
        try:
            with self._broker._engine.begin() as conn:
                changed = conn.execute(statement).rowcount
        except (OperationalError, DBAPIError) as exc:
            raise _unavailable(exc, doing) from exc
        if changed != 1:
            LOG.warning(
                "message %d of %s: lease lost before %s (another consumer has it now)",
                self.row_id,
                self.queue,
                doing,
            )
        return changed == 1

    def _mine(self) -> Any:
        return (
            (_QM.id == self.row_id)
            & (_QM.lease_owner == self.token)
            & (_QM.state == MessageState.LEASED)
        )

    def ack(self) -> None:
        self._settle()
        self._fenced(delete(_QM).where(self._mine()), "ack")

    def retry(self, delay_s: float, reason: str) -> None:
        self._settle()
        available = utcnow() + timedelta(seconds=max(0.0, delay_s))
        self._fenced(
            update(_QM)
            .where(self._mine())
            .values(
                state=MessageState.READY,
                available_at=available,
                lease_owner=None,
                lease_expires_at=None,
                dead_reason=reason[:2000],
            ),
            "retry",
        )
        self._broker._wake(self.queue)

    def release(self) -> None:
        self._settle()
        self._fenced(
            update(_QM)
            .where(self._mine())
            .values(
                state=MessageState.READY,
                available_at=utcnow(),
                lease_owner=None,
                lease_expires_at=None,
                delivery_count=_QM.delivery_count - 1,
            ),
            "release",
        )
        self._broker._wake(self.queue)

    def dead_letter(self, reason: str) -> None:
        self._settle()
        self._fenced(
            update(_QM)
            .where(self._mine())
            .values(
                state=MessageState.DEAD,
                lease_owner=None,
                lease_expires_at=None,
                dead_reason=reason[:4000] or "dead-lettered",
            ),
            "dead-letter",
        )

    def heartbeat(self) -> bool:
        if self.settled:
            return False
        expires = utcnow() + timedelta(seconds=self._broker.lease_s)
        try:
            with self._broker._engine.begin() as conn:
                changed = conn.execute(
                    update(_QM).where(self._mine()).values(lease_expires_at=expires)
                ).rowcount
        except (OperationalError, DBAPIError) as exc:
            # The database is away: keep working; the lease may still hold when it returns.
            LOG.warning("message %d: lease not renewed: %s", self.row_id, getattr(exc, "orig", exc))
            return True
        return changed == 1


class EmbeddedBroker(Broker):
    """Queues as rows of `queue_message` in the database behind `engine`."""

    def __init__(
        self,
        engine: Engine,
        *,
        lease_s: float = 60.0,
        poll_interval_s: float = 1.0,
        listen_for_notifications: bool = True,
    ) -> None:
        self._engine = engine
        self.lease_s = lease_s
        self._poll_interval_s = poll_interval_s
        self._is_sqlite = engine.dialect.name == "sqlite"
        self._label = f"{socket.gethostname()}:{os.getpid()}"[:90]
        self._condition = threading.Condition()
        self._generation = 0  # bumped by every publish seen (this process or NOTIFY)
        self._closed = threading.Event()
        self._listener: threading.Thread | None = None
        if not self._is_sqlite and listen_for_notifications:
            self._listener = threading.Thread(
                target=self._listen_loop, name="embedded-queue-listen", daemon=True
            )
            self._listener.start()

    @property
    def description(self) -> str:
        url = self._engine.url
        where = url.database if self._is_sqlite else f"{url.host}:{url.port}/{url.database}"
        return f"embedded queue in {url.get_backend_name()} ({where})"

    # -- publishing ----------------------------------------------------------------------------

    def declare(self, queues: Sequence[str]) -> None:
        """Nothing to create: a queue exists as soon as it holds a row."""

    def publish(self, queue: str, body: bytes, *, priority: int = 0, message_id: str = "") -> None:
        now = utcnow()
        values = {
            "queue": queue,
            "message_id": message_id or uuid.uuid4().hex,
            "body": body.decode(),
            "priority": int(priority),
            "state": MessageState.READY,
            "enqueued_at": now,
            "available_at": now,
            "delivery_count": 0,
            "dead_reason": "",
        }
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(_QM).values(**values))
                if not self._is_sqlite:
                    conn.execute(text(f"NOTIFY {_NOTIFY_CHANNEL}"))
        except (OperationalError, DBAPIError) as exc:
            raise _unavailable(exc, f"publish to {queue}") from exc
        self._wake(queue)

    def _wake(self, _queue: str) -> None:
        with self._condition:
            self._generation += 1
            self._condition.notify_all()

    # -- consuming -----------------------------------------------------------------------------

    def _deliverable(self, queues: Sequence[str], now: Any) -> Any:
        ready = (_QM.state == MessageState.READY) & (_QM.available_at <= now)
        expired = (_QM.state == MessageState.LEASED) & (_QM.lease_expires_at < now)
        return _QM.queue.in_(list(queues)) & (ready | expired)

    def _claim(self, conn: Connection, queues: Sequence[str]) -> _EmbeddedMessage | None:
        now = utcnow()
        candidate = (
            select(_QM.id)
            .where(self._deliverable(queues, now))
            .order_by(_QM.priority.desc(), _QM.available_at, _QM.id)
            .limit(1)
        )
        if not self._is_sqlite:
            candidate = candidate.with_for_update(skip_locked=True)
        token = f"{self._label}:{uuid.uuid4().hex[:16]}"
        row = conn.execute(
            update(_QM)
            .where(_QM.id == candidate.scalar_subquery())
            .values(
                state=MessageState.LEASED,
                lease_owner=token,
                lease_expires_at=now + timedelta(seconds=self.lease_s),
                delivery_count=_QM.delivery_count + 1,
            )
            .returning(_QM.id, _QM.queue, _QM.body, _QM.delivery_count, _QM.priority)
        ).first()
        if row is None:
            return None
        row_id, queue, body, count, priority = row
        return _EmbeddedMessage(self, row_id, token, queue, body.encode(), count, priority)

    def _try_receive(self, queues: Sequence[str]) -> _EmbeddedMessage | None:
        try:
            with self._engine.connect() as conn:
                # A read first: an empty queue never takes the write lock (the listener
                # records instances in the same SQLite database).
                if (
                    conn.execute(
                        select(_QM.id).where(self._deliverable(queues, utcnow())).limit(1)
                    ).first()
                    is None
                ):
                    conn.rollback()
                    return None
                conn.rollback()
                if self._is_sqlite:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                message = self._claim(conn, queues)
                conn.commit()
                return message
        except (OperationalError, DBAPIError) as exc:
            raise _unavailable(exc, f"receive from {', '.join(queues)}") from exc

    def receive(self, queues: Sequence[str], timeout_s: float) -> ReceivedMessage | None:
        deadline = time.monotonic() + max(0.0, timeout_s)
        pause = _FIRST_POLL_S
        watch: _CommitWatch | None = None
        try:
            while True:
                with self._condition:
                    seen = self._generation
                message = self._try_receive(queues)
                if message is not None:
                    return message
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed.is_set():
                    return None
                if watch is None and self._is_sqlite:
                    watch = _CommitWatch(self._engine)  # only once there is a wait
                self._wait(seen, min(pause, remaining), watch)
                pause = min(pause * 2, self._poll_interval_s)
        finally:
            if watch is not None:
                watch.close()

    def _wait(self, seen: int, seconds: float, watch: _CommitWatch | None) -> None:
        """Until a publish in this process, a commit by another process (SQLite), or
        `seconds`; on PostgreSQL other processes' publishes arrive as NOTIFY wake-ups."""
        until = time.monotonic() + seconds
        while True:
            left = until - time.monotonic()
            with self._condition:
                if self._generation != seen or left <= 0:
                    return
                self._condition.wait(min(left, _COMMIT_CHECK_S) if watch else left)
            if watch is not None and watch.changed():
                return

    # -- inspection ----------------------------------------------------------------------------

    def depth(self, queue: str) -> QueueDepth:
        now = utcnow()
        state = case(
            (
                (_QM.state == MessageState.LEASED) & (_QM.lease_expires_at >= now),
                "in_flight",
            ),
            ((_QM.state == MessageState.DEAD), "dead"),
            ((_QM.state == MessageState.READY) & (_QM.available_at > now), "delayed"),
            else_="ready",
        )
        try:
            with self._engine.connect() as conn:
                counts: dict[str, int] = dict(
                    conn.execute(
                        select(state, func.count()).where(_QM.queue == queue).group_by(state)
                    ).all()
                )
        except (OperationalError, DBAPIError) as exc:
            raise _unavailable(exc, f"count {queue}") from exc
        return QueueDepth(
            queue,
            ready=counts.get("ready", 0),
            in_flight=counts.get("in_flight", 0),
            delayed=counts.get("delayed", 0),
            dead=counts.get("dead", 0),
        )

    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(_QM.body, _QM.dead_reason)
                .where(_QM.queue == queue, _QM.state == MessageState.DEAD)
                .order_by(_QM.id)
                .limit(limit)
            ).all()
        return [DeadLetter(queue, body.encode(), reason) for body, reason in rows]

    def ping(self) -> None:
        try:
            with self._engine.connect() as conn:
                conn.execute(select(1))
        except (OperationalError, DBAPIError) as exc:
            raise _unavailable(exc, "reach the database") from exc

    def close(self) -> None:
        self._closed.set()
        self._wake("")

    # -- PostgreSQL notifications --------------------------------------------------------------

    def _listen_loop(self) -> None:
        """LISTEN on a dedicated connection; each NOTIFY wakes this process's consumers."""
        import psycopg

        conninfo = self._engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        while not self._closed.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {_NOTIFY_CHANNEL}")
                    while not self._closed.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self._wake("")
            except psycopg.Error as exc:
                LOG.debug("queue notifications paused (%s); polling meanwhile", exc)
                self._closed.wait(5.0)
