"""Engine and session factory; SQLite gets WAL and a busy timeout, every backend gets migrations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["create_db_engine", "migrate", "session_factory", "write_session"]

_MIGRATIONS = Path(__file__).with_name("migrations")


def create_db_engine(url: str, *, echo: bool = False, pool_size: int = 5) -> Engine:
    if url.startswith("sqlite"):
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, echo=echo, connect_args={"timeout": 30, "check_same_thread": False}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives a process crash without an fsync per commit;
            # an OS crash can drop the newest commits, and service.reconcile re-indexes
            # their instances from the archive, whose files are fsynced before any commit.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        # A server that silently drops packets must fail fast (the listener then backlogs),
        # not hang each attempt for the operating system's TCP timeout.
        connect_args["connect_timeout"] = 10
    return create_engine(
        url, echo=echo, pool_size=pool_size, pool_pre_ping=True, connect_args=connect_args
    )


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def write_session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction reads then writes without losing a race; commits on exit.

    On SQLite it starts with ``BEGIN IMMEDIATE``: the write lock is taken before the first
    read, so a read-check-update (claim a job, decide a report) cannot be overtaken by another
    writer between its read and its write (a deferred transaction would fail with "database is
    locked" at the write instead). PostgreSQL uses row locks (``FOR UPDATE``) in the queries.
    """
    with sessions() as session:
        if session.get_bind().dialect.name == "sqlite":
            session.connection().exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
