"""Database: models, engine/session factory, Alembic migrations."""

from .engine import create_db_engine, migrate, session_factory
from .models import Base, Instance, Job, JobState, Series, Study, StudyState

__all__ = [
    "Base",
    "Instance",
    "Job",
    "JobState",
    "Series",
    "Study",
    "StudyState",
    "create_db_engine",
    "migrate",
    "session_factory",
]

# Registers the delivery and work tables on Base.metadata (Alembic's env imports this package).
from . import delivery_models as delivery_models  # noqa: E402,F401
from . import prior_models as prior_models  # noqa: E402,F401
from . import work_models as work_models  # noqa: E402,F401
