"""ORM models of the result outbox: one row per (result instance, destination), one per attempt.

A delivery is keyed by (SOP Instance UID, destination). Result UIDs derive deterministically
from the job, so re-sending a regenerated result resets the existing row instead of adding a
duplicate, and the PACS replaces the instance it already holds.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .models import Base, UTCDateTime, _enum, utcnow

__all__ = ["AttemptOutcome", "Delivery", "DeliveryAttempt", "DeliveryState"]


class DeliveryState(enum.StrEnum):
    PENDING = "pending"  # waiting for its next attempt (first one or a retry after backoff)
    SENT = "sent"  # the destination answered success (or a warning) for this instance
    FAILED_PERMANENT = "failed_permanent"  # the destination refused in a way a retry cannot fix
    GAVE_UP = "gave_up"  # transient failures until max_attempts was reached


class AttemptOutcome(enum.StrEnum):
    IN_PROGRESS = "in_progress"  # committed before sending; stays so only if the process died
    SUCCESS = "success"
    WARNING = "warning"  # stored, with a warning status (e.g. coercion of data elements)
    TRANSIENT = "transient"  # worth retrying: refused/aborted/timeout/out of resources
    PERMANENT = "permanent"  # not worth retrying: rejected AE, SOP class not supported, ...
    INTERRUPTED = "interrupted"  # the dispatcher stopped mid-attempt (crash); counted, resent


class Delivery(Base):
    __tablename__ = "delivery"
    __table_args__ = (
        UniqueConstraint(
            "sop_instance_uid", "destination", name="uq_delivery_instance_destination"
        ),
        Index("ix_delivery_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("job.id", ondelete="SET NULL"), nullable=True, index=True
    )
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    # Result file; a relative path resolves against the dispatcher's base directory.
    path: Mapped[str] = mapped_column(Text)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True, doc="last DIMSE status")
    last_reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    attempt_log: Mapped[list[DeliveryAttempt]] = relationship(
        back_populates="delivery", order_by="DeliveryAttempt.id", cascade="all, delete-orphan"
    )


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempt"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("delivery.id", ondelete="CASCADE"), index=True
    )
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    outcome: Mapped[AttemptOutcome] = mapped_column(
        _enum(AttemptOutcome), default=AttemptOutcome.IN_PROGRESS
    )
    status: Mapped[int | None] = mapped_column(Integer, nullable=True, doc="DIMSE status, if any")
    reason: Mapped[str] = mapped_column(Text, default="")

    delivery: Mapped[Delivery] = relationship(back_populates="attempt_log")
