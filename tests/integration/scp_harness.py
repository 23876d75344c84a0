"""Helpers for the listener tests: a running LesionWatch SCP with its database, and test files."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import Engine, event, func, select
from sqlalchemy.orm import Session, sessionmaker

from lesionwatch.config.schema import ClassificationConfig, ListenerConfig, StorageConfig
from lesionwatch.dicom_io.scp import StoreSCP
from lesionwatch.service.db.engine import create_db_engine, migrate, session_factory
from lesionwatch.service.db.models import Instance
from lesionwatch.service.ingest import InstanceRecorder, RecordResult

__all__ = [
    "RunningListener",
    "count_instances",
    "gunzip_series",
    "run_storescu",
    "running_listener",
    "sop_instance_uids",
]

LISTENER_AE = "LESIONWATCH"


@dataclass
class RunningListener:
    scp: StoreSCP
    engine: Engine
    sessions: sessionmaker[Session]
    data_dir: Path

    @property
    def port(self) -> int:
        return self.scp.port

    @property
    def archive_root(self) -> Path:
        return self.scp.archive.root

    def archived_files(self) -> list[Path]:
        return sorted(p for p in self.archive_root.rglob("*") if p.is_file())


@contextmanager
def running_listener(
    data_dir: Path,
    database_url: str,
    port: int,
    *,
    storage: dict[str, Any] | None = None,
    sqlite_synchronous: str | None = None,
    on_recorded: Callable[[RecordResult], None] | None = None,
    **listener: Any,
) -> Iterator[RunningListener]:
    """A started StoreSCP on 127.0.0.1:``port`` recording into a freshly migrated database.

    ``sqlite_synchronous`` overrides the engine's SQLite ``PRAGMA synchronous`` (benchmarks
    use it to compare at another durability level).
    """
    engine = create_db_engine(database_url)
    if sqlite_synchronous is not None:

        @event.listens_for(engine, "connect")
        def _synchronous(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.execute(f"PRAGMA synchronous={sqlite_synchronous}")

    migrate(engine)
    sessions = session_factory(engine)
    listener_config = ListenerConfig(ae_title=LISTENER_AE, host="127.0.0.1", port=port, **listener)
    storage_config = StorageConfig(
        data_dir=data_dir, **({"min_free_disk_mb": 16} | (storage or {}))
    )
    scp = StoreSCP(
        listener_config,
        storage_config,
        InstanceRecorder(sessions, ClassificationConfig()),
        on_recorded=on_recorded,
    )
    scp.start()
    try:
        yield RunningListener(scp, engine, sessions, data_dir)
    finally:
        scp.stop()
        engine.dispose()


def gunzip_series(source: Path, target: Path) -> Path:
    """Copy a series, unpacking ``.dcm.gz`` files (dcmtk reads no gzip)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.name.endswith(".gz"):
            with gzip.open(path) as packed, (target / path.name[:-3]).open("wb") as out:
                shutil.copyfileobj(packed, out)
        else:
            shutil.copyfile(path, target / path.name)
    return target


def sop_instance_uids(directory: Path) -> set[str]:
    return {
        str(pydicom.dcmread(path, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        for path in directory.iterdir()
    }


def count_instances(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def run_storescu(
    port: int,
    *paths: Path,
    calling_ae: str = "STORESCU",
    called_ae: str = LISTENER_AE,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu: one association sending every file (directories scanned recursively)."""
    storescu = shutil.which("storescu")
    assert storescu is not None
    command = [storescu, "-aet", calling_ae, "-aec", called_ae, "+sd", "+r", *extra]
    command += ["127.0.0.1", str(port), *map(str, paths)]
    # This dcmtk build keeps Nagle's algorithm on unless asked: ~40 ms lost per instance.
    env = os.environ | {"TCP_NODELAY": "1"}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, env=env
    )
