"""The audit trail: one row per job transition and per object sent, in the same transaction.

Who (`actor`: a worker id, "assembler", "dispatcher", "cli:<user>"), what (`action`, the job
or SOP instance), where (`destination`: name and AE@host:port) and when. Rows carry UIDs, never
patient names or IDs.
"""

from __future__ import annotations

import getpass
import os
import socket
from datetime import datetime

from sqlalchemy.orm import Session

from .db.models import Job, JobState, utcnow
from .db.work_models import AuditEvent

__all__ = ["cli_actor", "record_event", "record_job_transition"]


def cli_actor() -> str:
    """The operator running a command: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"[:128]


def record_event(
    session: Session,
    actor: str,
    action: str,
    *,
    job_id: int | None = None,
    study_instance_uid: str = "",
    from_state: str = "",
    to_state: str = "",
    sop_instance_uid: str = "",
    sop_class_uid: str = "",
    destination: str = "",
    detail: str = "",
    at: datetime | None = None,
) -> AuditEvent:
    event = AuditEvent(
        at=at or utcnow(),
        actor=actor[:128],
        action=action[:64],
        job_id=job_id,
        study_instance_uid=study_instance_uid[:64],
        from_state=from_state[:32],
        to_state=to_state[:32],
        sop_instance_uid=sop_instance_uid[:64],
        sop_class_uid=sop_class_uid[:64],
        destination=destination[:255],
        detail=detail[:4000],
    )
    session.add(event)
    return event


def record_job_transition(
    session: Session,
    actor: str,
    job: Job,
    from_state: JobState | None,
    *,
    study_instance_uid: str,
    detail: str = "",
    at: datetime | None = None,
) -> AuditEvent:
    """`job` moved from `from_state` (None: created) to its current state."""
    return record_event(
        session,
        actor,
        f"job.{job.state.value}",
        job_id=job.id,
        study_instance_uid=study_instance_uid,
        from_state=from_state.value if from_state is not None else "",
        to_state=job.state.value,
        detail=detail or f"{job.pipeline} generation {job.generation} attempt {job.attempt}",
        at=at,
    )
