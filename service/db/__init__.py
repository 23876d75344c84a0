"""Database: models, engine/session factory, Alembic migrations."""

from .engine import create_db_engine, migrate, session_factory
from .models import Base, Instance, Job, JobState, Series, Study, StudyState

__all__ = [
    "Base", "Instance", "Job", "JobState", "Series", "Study", "StudyState",
    "create_db_engine", "migrate", "session_factory",
]
