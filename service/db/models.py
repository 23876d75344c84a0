"""SQLAlchemy 2.0 models: what was received (studies, series, instances) and the work it caused."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from lesionwatch.config.schema import SeriesClass

__all__ = [
    "UTCDateTime",
    "Base",
    "Instance",
    "Job",
    "JobState",
    "REPORT_PIPELINE",
    "Series",
    "URGENT_PRIORITY",
    "Study",
    "StudyState",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite would hand back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


def _enum(cls: type[enum.Enum]) -> Enum:
    # The enum's value as plain text (no database ENUM type): a new state needs no migration.
    return Enum(cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"  # instances are arriving; not yet stable
    READY = "ready"  # assembled: job rows exist for every pipeline that can run
    INCOMPLETE = "incomplete"  # deadline passed and no pipeline's required series arrived
    # Retrieved from PACS as another study's prior (service.prior_search): never processed.
    PRIOR = "prior"


class JobState(enum.StrEnum):
    PENDING = "pending"  # committed, its message queued; waiting for a worker
    RUNNING = "running"  # a worker holds its lease
    RETRYING = "retrying"  # an attempt failed; the next one is scheduled (next_attempt_at)
    SUCCEEDED = "succeeded"  # results written and their deliveries queued
    FAILED = "failed"  # dead-lettered: attempts used up; `reason` says why
    CANCELLED = "cancelled"  # stopped by an operator (`lesionwatch jobs cancel`)
    SKIPPED = "skipped"  # could not run for this study (no prior, series missing); `reason`
    SUPERSEDED = "superseded"  # a later generation of the same study replaced it

    @property
    def terminal(self) -> bool:
        """No worker will touch the job again unless an operator retries it."""
        return self not in (JobState.PENDING, JobState.RUNNING, JobState.RETRYING)


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[StudyState] = mapped_column(
        _enum(StudyState), default=StudyState.RECEIVING, index=True
    )
    state_reason: Mapped[str] = mapped_column(Text, default="")
    # Incremented when late series reopen a processed study; jobs belong to one generation.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    # Start of the current generation's receiving window (the forced deadline counts from here).
    receiving_since: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    assembled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Queue priority of the study's jobs: 0 routine, URGENT_PRIORITY urgent (see priority config).
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # Versions of the study report sent so far; the next SR says it replaces this one.
    report_version: Mapped[int] = mapped_column(Integer, default=0)
    # Series first received after this instant are "late" and not yet handled by the policy.
    late_checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    series: Mapped[list[Series]] = relationship(
        back_populates="study", order_by="Series.series_number"
    )
    jobs: Mapped[list[Job]] = relationship(
        back_populates="study", order_by="Job.id", foreign_keys="Job.study_id"
    )


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    manufacturer: Mapped[str] = mapped_column(String(64), default="")
    series_class: Mapped[SeriesClass] = mapped_column(_enum(SeriesClass), default=SeriesClass.OTHER)
    classification_reason: Mapped[str] = mapped_column(Text, default="")
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(Text, doc="relative to the archive root")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


REPORT_PIPELINE = "report"  # the job that gathers a study's findings into one SR
URGENT_PRIORITY = 8


class Job(Base):
    __tablename__ = "job"
    __table_args__ = (
        UniqueConstraint("study_id", "pipeline", "generation", name="uq_job_study_pipeline_gen"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    pipeline: Mapped[str] = mapped_column(String(32))
    generation: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.PENDING, index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    queue: Mapped[str] = mapped_column(String(64), default="jobs")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # The prior exam a comparison (new lesions) runs against, chosen at assembly.
    prior_study_id: Mapped[int | None] = mapped_column(
        ForeignKey("study.id", ondelete="SET NULL"), nullable=True
    )
    # The worker running it and until when its claim holds (renewed by heartbeats).
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    failure_kind: Mapped[str] = mapped_column(String(16), default="")
    # What the job found (JSON: lesion table, SEG reference, algorithm), read by the report.
    result_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Seconds per step of the last successful run (JSON object).
    timings_json: Mapped[str | None] = mapped_column(Text, nullable=True)

    study: Mapped[Study] = relationship(back_populates="jobs", foreign_keys=[study_id])
    prior_study: Mapped[Study | None] = relationship(foreign_keys=[prior_study_id])
