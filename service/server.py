"""`lesionwatch serve`: the DICOM listener plus the study assembler in one process."""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from lesionwatch.config.schema import LesionWatchConfig

from .assembler import StudyAssembler
from .db.engine import create_db_engine, migrate, session_factory

__all__ = ["ListenerService", "open_database"]

log = logging.getLogger(__name__)


def open_database(config: LesionWatchConfig) -> tuple[Engine, sessionmaker[Session]]:
    """Engine at the configured URL with the schema migrated to the newest revision."""
    engine = create_db_engine(
        config.database_url(), echo=config.database.echo, pool_size=config.database.pool_size
    )
    migrate(engine)
    return engine, session_factory(engine)


class ListenerService:
    """Runs the C-STORE listener and, on a timer, the study assembler until stopped."""

    def __init__(self, config: LesionWatchConfig) -> None:
        from lesionwatch.dicom_io.scp import StoreSCP

        from .ingest import InstanceRecorder

        self.config = config
        self.engine, self.sessions = open_database(config)
        self.recorder = InstanceRecorder(self.sessions, config.classification)
        self.scp = StoreSCP(config.listener, config.storage, self.recorder)
        self.assembler = StudyAssembler(self.sessions, config.assembly, config.pipelines)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from .reconcile import reconcile_archive

        # Before accepting: re-index archive files whose rows an OS crash lost (WAL, NORMAL).
        reconcile_archive(self.scp.archive.root, self.recorder)
        self.scp.start()
        self._thread = threading.Thread(target=self._assemble_loop, name="assembler", daemon=True)
        self._thread.start()
        listener = self.config.listener
        log.info(
            "LesionWatch listening as %s on %s:%d%s, archive in %s",
            listener.ae_title,
            listener.host,
            listener.port,
            " (TLS)" if listener.tls else "",
            self.config.storage.data_dir.resolve(),
        )

    def _assemble_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.assembler.run_once()
            except Exception:  # one bad pass must not end assembly for good
                log.exception(
                    "study assembly pass failed; retrying in %.0f s",
                    self.config.assembly.poll_interval_s,
                )
            self._stop.wait(self.config.assembly.poll_interval_s)

    def wait(self) -> None:
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
        self.scp.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.engine.dispose()
