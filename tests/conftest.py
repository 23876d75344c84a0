"""Shared fixtures: data locations, free ports, and the rule for missing services.

Integration tests need real servers (PostgreSQL, RabbitMQ, Orthanc, dcmtk). On a developer
machine a missing one skips the test with the reason; in CI (LESIONWATCH_REQUIRE_SERVICES=1,
set by .ci/run) it fails the test, so CI can never pass by skipping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = REPO_ROOT / "tests" / "data"
POSTGRES_URL = os.environ.get(
    "LESIONWATCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
RABBITMQ_URL = os.environ.get(
    "LESIONWATCH_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"
)


def services_required() -> bool:
    return os.environ.get("LESIONWATCH_REQUIRE_SERVICES", "") == "1"


def require_service(available: bool, reason: str) -> None:
    """Skip (developer machine) or fail (CI) when a real service the test needs is missing."""
    if available:
        return
    if services_required():
        pytest.fail(f"required service missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_executable(name: str) -> str:
    path = shutil.which(name)
    require_service(path is not None, f"{name} is not installed (Debian package; see .ci/run)")
    assert path is not None
    return path


def tcp_port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def test_data() -> Path:
    return TEST_DATA


@pytest.fixture(scope="session")
def siemens_t1_dir() -> Path:
    return TEST_DATA / "dicom_t1" / "siemens_xa30_t1_tfl3d"


@pytest.fixture(scope="session")
def ge_t1_dir() -> Path:
    return TEST_DATA / "dicom_t1" / "ge_signa_t1_mprage"


def _postgres_available() -> bool:
    return tcp_port_open("127.0.0.1", 5432)


def _rabbitmq_available() -> bool:
    return tcp_port_open("127.0.0.1", 5672)


def require_postgres() -> None:
    require_service(_postgres_available(), "PostgreSQL is not reachable on 127.0.0.1:5432")


def require_rabbitmq() -> None:
    require_service(_rabbitmq_available(), "RabbitMQ is not reachable on 127.0.0.1:5672")


@contextlib.contextmanager
def fresh_postgres_schema(name: str) -> Iterator[str]:
    """A SQLAlchemy URL whose search_path is a new, empty schema; dropped afterwards."""
    require_postgres()
    import sqlalchemy

    schema = f"lw_test_{os.getpid()}_{abs(hash(name)) % 10**8}"
    # pre-ping: a test may restart PostgreSQL between setup and teardown.
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each database test runs on embedded SQLite and on a real PostgreSQL (fresh schema)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lesionwatch.db'}"
        return
    with fresh_postgres_schema(request.node.nodeid) as url:
        yield url


@pytest.fixture
def sessions(database_url: str) -> Iterator[Any]:
    """Sessions on a freshly migrated database (each database test: SQLite and PostgreSQL)."""
    from lesionwatch.service.db.engine import create_db_engine, migrate, session_factory

    engine = create_db_engine(database_url)
    migrate(engine)
    yield session_factory(engine)
    engine.dispose()


# Broker fixtures (embedded on SQLite and PostgreSQL, RabbitMQ) live in broker_fixtures.py.
from broker_fixtures import broker, broker_factory  # noqa: E402,F401
