"""A PostgreSQL restart under a running listener: every instance acknowledged, none lost.

The listener records through :class:`BufferedRecorder`. PostgreSQL is stopped with
``pg_ctlcluster`` while associations send instances (one association opened before the
outage, one during it); every C-STORE must succeed and be archived, and once PostgreSQL is
started again every instance must be recorded exactly once. PostgreSQL is always started again
(and waited for) in a ``finally`` block: other tests share it.
"""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pydicom
import pytest
import sqlalchemy
from conftest import (
    free_port,
    fresh_postgres_schema,
    require_executable,
    require_postgres,
    require_service,
)
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.association import Association
from scp_harness import count_instances, gunzip_series, running_listener
from sqlalchemy import select

from lesionwatch.service.db.models import Instance, Series, Study
from lesionwatch.service.ingest import RecordResult
from lesionwatch.service.record_backlog import BufferedRecorder

pytestmark = pytest.mark.integration

_POSTGRES_CONFIG = Path("/etc/postgresql")
_READY_TIMEOUT_S = 60.0
_DRAIN_TIMEOUT_S = 30.0


def _cluster_version() -> str:
    """The version of the local ``main`` cluster (``ls /etc/postgresql``)."""
    versions = (
        sorted(
            (p.name for p in _POSTGRES_CONFIG.iterdir() if (p / "main").is_dir()),
            key=lambda name: [int(part) for part in name.split(".") if part.isdigit()],
        )
        if _POSTGRES_CONFIG.is_dir()
        else []
    )
    require_service(bool(versions), f"no PostgreSQL 'main' cluster under {_POSTGRES_CONFIG}")
    return versions[-1]


def _pg_ctlcluster(version: str, action: str, *, check: bool = True) -> None:
    command = [
        require_executable("pg_ctlcluster"),
        "--skip-systemctl-redirect",
        version,
        "main",
        action,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if check:
        assert result.returncode == 0, f"pg_ctlcluster {action}: {result.stderr}"


def _postgres_ready() -> bool:
    command = [require_executable("pg_isready"), "-h", "127.0.0.1", "-q"]
    return subprocess.run(command, timeout=10, check=False).returncode == 0


@contextmanager
def _postgres_stopped(version: str) -> Iterator[None]:
    """PostgreSQL stopped for the block, then started and ready whatever happened."""
    try:
        _pg_ctlcluster(version, "stop")
        assert not _postgres_ready()
        yield
    finally:
        _pg_ctlcluster(version, "start", check=False)  # fails harmlessly when running
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not _postgres_ready():
            assert time.monotonic() < deadline, "PostgreSQL did not come back"
            time.sleep(0.2)


@contextmanager
def _schema_surviving_restart(name: str) -> Iterator[str]:
    """``conftest.fresh_postgres_schema``, whose admin engine pings pooled connections.

    The helper drops its schema at the end through a pooled connection that the restart has
    closed; with ``pool_pre_ping`` the pool replaces it instead of failing the teardown.
    """
    with ExitStack() as stack:
        with pytest.MonkeyPatch.context() as patch:
            create_engine = functools.partial(sqlalchemy.create_engine, pool_pre_ping=True)
            patch.setattr(sqlalchemy, "create_engine", create_engine)
            url = stack.enter_context(fresh_postgres_schema(name))
        yield url


def _associate(port: int) -> Association:
    ae = AE(ae_title="OUTAGESCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="LESIONWATCH")
    assert assoc.is_established
    return assoc


def _send(assoc: Association, paths: list[Path]) -> list[int]:
    return [int(assoc.send_c_store(pydicom.dcmread(path)).Status) for path in paths]


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_instances_sent_while_postgresql_restarts_are_all_recorded_once(
    tmp_path: Path, request: pytest.FixtureRequest, ge_t1_dir: Path, siemens_t1_dir: Path
) -> None:
    require_executable("pg_ctlcluster")
    require_postgres()
    version = _cluster_version()
    ge = sorted(ge_t1_dir.iterdir())[:14]
    siemens = sorted(gunzip_series(siemens_t1_dir, tmp_path / "siemens").iterdir())[:6]
    # A study that was being received when the outage began, and one that arrives during it.
    before, during_open, during_new, after = ge[:4], ge[4:10], ge[10:12] + siemens, ge[12:]
    during = during_open + during_new
    sent = [_uid(path) for path in before + during + after]
    hooked: list[RecordResult] = []

    with (
        _schema_surviving_restart(request.node.nodeid) as url,
        running_listener(tmp_path / "lw", url, free_port(), on_recorded=hooked.append) as lw,
    ):
        buffered = BufferedRecorder(
            lw.scp.recorder,  # type: ignore[arg-type]  # the harness's InstanceRecorder
            lw.archive_root,
            on_recorded=hooked.append,
            max_backoff_s=4.0,  # the default 15 s would only make the test slower
        )
        lw.scp.recorder = buffered
        buffered.start()
        try:
            assoc = _associate(lw.port)  # stays open across the restart
            try:
                assert _send(assoc, before) == [0] * len(before)
                assert buffered.pending == 0
                assert count_instances(lw.sessions) == len(before)

                with _postgres_stopped(version):
                    statuses = _send(assoc, during_open)
                    late = _associate(lw.port)
                    try:
                        statuses += _send(late, during_new)
                    finally:
                        late.release()
                    assert statuses == [0] * len(during)  # success while the DB is down
                    archived = {path.stem for path in lw.archived_files()}
                    assert {_uid(path) for path in during} <= archived
                    assert buffered.pending == len(during)

                assert buffered.wait_drained(_DRAIN_TIMEOUT_S), f"{buffered.pending} left"
                assert _send(assoc, after) == [0] * len(after)  # live again
            finally:
                assoc.release()
            assert buffered.pending == 0
        finally:
            buffered.stop()

        with lw.sessions() as session:
            rows = session.execute(select(Instance.id, Instance.sop_instance_uid, Instance.path))
            recorded = [tuple(row) for row in rows]
            assert len(session.scalars(select(Study)).all()) == 2
            assert len(session.scalars(select(Series)).all()) == 2
        assert sorted(uid for _, uid, _ in recorded) == sorted(sent)  # each exactly once
        assert all((lw.archive_root / path).is_file() for *_, path in recorded)
        # The on_recorded hook saw every instance once: live ones from the listener, backlog
        # ones from the BufferedRecorder.
        assert sorted(result.instance_id for result in hooked) == sorted(i for i, *_ in recorded)
        assert sum(result.new_study for result in hooked) == 2
