"""ORM models of the work machinery: the outbox, the embedded queue, workers, the audit trail.

- `OutboxMessage`: a message committed in the same transaction as the state that caused it
  (a job row, a delivery); the relay publishes it to the broker after the commit and deletes
  it, so a crash between commit and publish delays the message and never loses it.
- `QueueMessage`: the embedded broker's queue. A consumer claims a row with a lease (owner and
  expiry), renews the lease while it works, and deletes the row on ack; a row whose lease ran
  out is claimed again. Nothing is deleted on dequeue.
- `WorkerRecord`: one row per worker process, with its last heartbeat (`lesionwatch status`).
- `AuditEvent`: every job transition and every object sent: who, what, where, when.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from .models import Base, UTCDateTime, _enum, utcnow

__all__ = ["AuditEvent", "MessageState", "OutboxMessage", "QueueMessage", "WorkerRecord"]

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
_BigId = BigInteger().with_variant(Integer(), "sqlite")


class MessageState(enum.StrEnum):
    READY = "ready"  # deliverable from available_at on
    LEASED = "leased"  # handed to a consumer until lease_expires_at
    DEAD = "dead"  # dead-lettered; kept with its reason until an operator acts


class OutboxMessage(Base):
    __tablename__ = "outbox_message"
    __table_args__ = (Index("ix_outbox_due", "claimed_until", "id"),)

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    queue: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # A relay's claim: others skip the row until then (a relay that died mid-publish).
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    publish_attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")


class QueueMessage(Base):
    __tablename__ = "queue_message"
    __table_args__ = (
        Index("ix_queue_message_take", "queue", "state", "priority", "available_at"),
        Index("ix_queue_message_lease", "state", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    queue: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[MessageState] = mapped_column(_enum(MessageState), default=MessageState.READY)
    enqueued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    available_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivery_count: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    dead_reason: Mapped[str] = mapped_column(Text, default="")


class WorkerRecord(Base):
    __tablename__ = "worker"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # host:pid:n
    hostname: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    queues: Mapped[str] = mapped_column(Text, default="")  # comma-separated
    device: Mapped[str] = mapped_column(String(32), default="")
    state: Mapped[str] = mapped_column(String(16), default="idle")  # idle|busy|stopping|stopped
    current_job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    jobs_done: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AuditEvent(Base):
    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))  # worker id, "assembler", "cli", ...
    action: Mapped[str] = mapped_column(String(64))  # "job.succeeded", "object.sent", ...
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    from_state: Mapped[str] = mapped_column(String(32), default="")
    to_state: Mapped[str] = mapped_column(String(32), default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    destination: Mapped[str] = mapped_column(String(255), default="")  # name AE@host:port
    detail: Mapped[str] = mapped_column(Text, default="")
