"""The search for a study's prior exam: one row per current study, a small state machine.

    searching --(local hit)-----------------------------> found
    searching --(C-FIND hit)--> retrieving --(stored)---> found
    searching --(nothing usable)------------------------> none
    searching / retrieving --(error, attempts left)-----> same state, next_attempt_at later
    searching / retrieving --(attempts used up / deadline)-> failed

`next_attempt_at` doubles as the claim: a searcher moves it forward before talking to the
PACS, so another process (or this one after a crash) takes the row only once it lapses.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .models import Base, Study, UTCDateTime, _enum, utcnow

__all__ = ["PriorSearch", "PriorSearchState", "PriorSource"]


class PriorSearchState(enum.StrEnum):
    SEARCHING = "searching"  # local lookup, then C-FIND (study and series level)
    RETRIEVING = "retrieving"  # C-MOVE/C-GET of the chosen prior's series under way
    FOUND = "found"  # prior_study_id is local and usable
    NONE = "none"  # no usable prior exists; `reason` says what was looked at
    FAILED = "failed"  # the search could not be completed; `reason` says why

    @property
    def terminal(self) -> bool:
        return self in (PriorSearchState.FOUND, PriorSearchState.NONE, PriorSearchState.FAILED)


class PriorSource(enum.StrEnum):
    LOCAL = "local"  # LesionWatch had received it itself
    PACS = "pacs"  # retrieved from the query PACS


class PriorSearch(Base):
    __tablename__ = "prior_search"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(
        ForeignKey("study.id", ondelete="CASCADE"), unique=True, index=True
    )
    state: Mapped[PriorSearchState] = mapped_column(
        _enum(PriorSearchState), default=PriorSearchState.SEARCHING, index=True
    )
    reason: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    # The current study waits for the search until then, and is processed without a prior after.
    deadline_at: Mapped[datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    source: Mapped[str] = mapped_column(String(16), default="")
    # The chosen prior: known by UID before it is retrieved (its instances arrive through the
    # listener and must be recognised as a prior, not taken for a new study to process).
    prior_study_instance_uid: Mapped[str | None] = mapped_column(
        String(64), nullable=True, index=True
    )
    prior_series_instance_uids: Mapped[str] = mapped_column(Text, default="")  # space-separated
    prior_study_id: Mapped[int | None] = mapped_column(
        ForeignKey("study.id", ondelete="SET NULL"), nullable=True
    )

    study: Mapped[Study] = relationship(foreign_keys=[study_id])
    prior_study: Mapped[Study | None] = relationship(foreign_keys=[prior_study_id])
