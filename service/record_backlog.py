"""Keep accepting instances while the database is unavailable: record them when it returns.

The listener answers a C-STORE only after the instance file is durable in the archive; the
database row is the index. :class:`BufferedRecorder` wraps :class:`InstanceRecorder`: when
recording fails because the database is unavailable (connection refused or lost, server
restarting or shutting down, SQLite file unopenable or locked: :func:`database_unavailable`),
the instance goes on an in-memory backlog and the listener answers success. A background thread
records the backlog in arrival order through the same :meth:`InstanceRecorder.record` (so
classification, study/series rows and the ``on_recorded`` hook behave as for a live instance)
once the database answers again, retrying with a doubling back-off.

While a backlog exists every new instance joins its end without trying the database: the order
is kept (a re-send recorded live cannot overtake its earlier version still waiting) and an
outage costs the listener one failed attempt, not one per instance.

A backlog entry is what re-recording needs and no data set: the archive path, size and sha256,
the transfer syntax, the calling AE title and the receive time (~300 bytes); the header is
re-read from the archived file (``stop_before_pixels``) when it is recorded. If the process
ends with a backlog, the start-up :func:`~lesionwatch.service.reconcile.reconcile_archive`
records the files: it examines files modified since the newest row's ``received_at`` minus
its safety margin, and backlog rows keep their receive time (not the time they were recorded),
so every file still on the backlog is newer than the newest row, even after a partial drain
following a long outage.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath

from pydicom import Dataset, dcmread
from sqlalchemy.exc import DBAPIError, OperationalError

from lesionwatch.dicom_io.archive import ArchivedFile, ArchivedInstance, StoreOutcome

from .db.models import utcnow
from .ingest import InstanceRecorder, RecordResult

__all__ = ["BufferedRecorder", "database_unavailable"]

LOGGER = logging.getLogger(__name__)

# PostgreSQL SQLSTATEs meaning "no server to talk to right now": class 08 (connection
# exception), admin/crash shutdown, "the database system is starting up / shutting down", and
# too many connections. Data, constraint and syntax errors are not outages.
_UNAVAILABLE_SQLSTATE_CLASS = "08"
_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})
# SQLite: the file cannot be opened (file system gone), I/O errors, or locked beyond the
# busy timeout. Full, read-only or corrupt databases need an operator: not waited out.
_UNAVAILABLE_SQLITE_PREFIXES = ("SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_BUSY")


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it wraps, e.g. in ``RecordError``) is a DB outage."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError) and _is_outage(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _is_outage(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:  # the dialect recognised a lost connection
        return True
    orig = exc.orig
    if type(orig).__module__.partition(".")[0] == "sqlite3":
        name = getattr(orig, "sqlite_errorname", None)
        return isinstance(name, str) and name.startswith(_UNAVAILABLE_SQLITE_PREFIXES)
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)  # psycopg 3, 2
    if isinstance(sqlstate, str):
        return (
            sqlstate.startswith(_UNAVAILABLE_SQLSTATE_CLASS) or sqlstate in _UNAVAILABLE_SQLSTATES
        )
    # No SQLSTATE: a client-side failure. psycopg raises OperationalError without one when it
    # cannot connect (refused, timed out, no server), and its SQLAlchemy dialect reports no
    # disconnect for failures while connecting.
    return isinstance(exc, OperationalError)


@dataclass(frozen=True, slots=True)
class _Entry:
    """An archived, unrecorded instance: enough to record it again from its file."""

    relative_path: PurePosixPath
    size_bytes: int
    sha256: str
    transfer_syntax_uid: str
    calling_ae_title: str
    received_at: datetime


class BufferedRecorder:
    """An :class:`InstanceRecorder` that defers recording while the database is unavailable.

    Parameters
    ----------
    recorder:
        Records live and backlog instances.
    archive_root:
        The archive's root (``StoreSCP.archive.root``, i.e. ``<storage.data_dir>/archive``):
        backlog headers are re-read from there.
    on_recorded:
        Called with the result of each *backlog* instance once it is recorded (live results
        are returned by :meth:`record`; hand the listener the same hook); its exceptions are
        logged.
    initial_backoff_s, max_backoff_s:
        Waits between attempts to record the backlog's head: doubling from the first to the
        second.
    """

    def __init__(
        self,
        recorder: InstanceRecorder,
        archive_root: Path,
        *,
        on_recorded: Callable[[RecordResult], None] | None = None,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 15.0,
    ) -> None:
        self.recorder = recorder
        self.archive_root = Path(archive_root)
        self.on_recorded = on_recorded
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self._backlog: collections.deque[_Entry] = collections.deque()
        self._changed = threading.Condition()  # guards _backlog, _stopping, _outage_*
        self._stopping = False
        self._outage_started: float | None = None  # monotonic; set while a backlog exists
        self._outage_recorded = 0
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Instances archived and not yet recorded (including one being recorded now)."""
        with self._changed:
            return len(self._backlog)

    def record(
        self,
        dataset: Dataset,
        archived: ArchivedFile,
        *,
        transfer_syntax_uid: str,
        calling_ae_title: str = "",
    ) -> RecordResult | None:
        """Record now, or return ``None`` when the instance went on the backlog.

        Raises what :meth:`InstanceRecorder.record` raises for anything but an outage, so the
        listener refuses the instance as before. Call only after ``archived`` is durable.
        """
        entry = _Entry(
            relative_path=PurePosixPath(archived.relative_path),
            size_bytes=archived.size_bytes,
            sha256=archived.sha256,
            transfer_syntax_uid=transfer_syntax_uid,
            calling_ae_title=calling_ae_title,
            received_at=utcnow(),  # ~ the file's mtime: reconciliation compares the two
        )
        with self._changed:
            if self._backlog:
                self._enqueue(entry, None)
                return None
        try:
            return self.recorder.record(
                dataset,
                archived,
                transfer_syntax_uid=transfer_syntax_uid,
                calling_ae_title=calling_ae_title,
            )
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            with self._changed:
                self._enqueue(entry, exc)
            return None

    def _enqueue(self, entry: _Entry, error: Exception | None) -> None:
        """Append ``entry``; called holding the lock."""
        self._backlog.append(entry)
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            self._outage_recorded = 0
            LOGGER.warning(
                "database unavailable (%s): %d instances archived, to be recorded when it returns",
                _describe(error),
                len(self._backlog),
            )
        self._changed.notify_all()

    # -- the backlog thread ---------------------------------------------------------------

    def start(self) -> None:
        """Start recording the backlog in a background thread."""
        with self._changed:
            if self._thread is not None:
                raise RuntimeError("the record backlog is already running")
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="record-backlog", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (after the record in progress); what is left stays in the archive.

        Stop the listener first. Instances still on the backlog are recorded by the start-up
        reconciliation of the next run.
        """
        with self._changed:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._changed.notify_all()
        if thread is not None:
            thread.join(timeout_s)
        left = self.pending
        if left:
            LOGGER.warning(
                "stopping with %d archived instances not recorded; the archive reconciliation "
                "at the next start records them",
                left,
            )

    def wait_drained(self, timeout_s: float | None = None) -> bool:
        """Wait until the backlog is empty; ``False`` if ``timeout_s`` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._backlog, timeout_s)

    def _run(self) -> None:
        backoff_s = self.initial_backoff_s
        idle = True
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._stopping or bool(self._backlog))
                if self._stopping:
                    return
                if idle:  # a new backlog: the failure that started it was just now
                    idle = False
                    if self._changed.wait_for(lambda: self._stopping, backoff_s):
                        return
                entry = self._backlog[0]  # stays queued while it is recorded: order is kept
            try:
                result = self._record_entry(entry)
            except Exception as exc:
                if database_unavailable(exc):
                    LOGGER.debug("database still unavailable (%s)", _describe(exc))
                    backoff_s = min(backoff_s * 2, self.max_backoff_s)
                    with self._changed:
                        if self._changed.wait_for(lambda: self._stopping, backoff_s):
                            return
                    continue
                # Acknowledged, archived, and not recordable: an operator must look at it.
                LOGGER.exception(
                    "cannot record archived instance %s from the backlog; it stays in the "
                    "archive unrecorded",
                    entry.relative_path,
                )
                result = None
            backoff_s = self.initial_backoff_s
            idle = self._done(entry, recorded=result is not None)
            if result is not None and self.on_recorded is not None:
                try:
                    self.on_recorded(result)
                except Exception:
                    LOGGER.exception("on_recorded hook failed for %s", entry.relative_path)

    def _record_entry(self, entry: _Entry) -> RecordResult:
        dataset = dcmread(self.archive_root / entry.relative_path, stop_before_pixels=True)
        archived = ArchivedInstance(
            entry.relative_path, entry.size_bytes, entry.sha256, StoreOutcome.STORED
        )
        # The instance row keeps its receive time (reconciliation relies on it, see the module
        # docstring); the study and series rows get the recording time. So the assembler's
        # quiet period (Study.last_received_at) for a study received during the outage starts
        # once the database is back, which is acceptable. A study partly recorded before a
        # long outage can look quiet meanwhile; its later series then arrive as late series.
        return self.recorder.record(
            dataset,
            archived,
            transfer_syntax_uid=entry.transfer_syntax_uid,
            calling_ae_title=entry.calling_ae_title,
            received_at=entry.received_at,
        )

    def _done(self, entry: _Entry, *, recorded: bool) -> bool:
        """Take the head off the backlog; ``True`` when that emptied it."""
        with self._changed:
            head = self._backlog.popleft()
            assert head is entry
            self._outage_recorded += recorded
            if not self._backlog and self._outage_started is not None:
                LOGGER.warning(
                    "database available again: %d backlog instances recorded, %.0f s after the "
                    "outage began",
                    self._outage_recorded,
                    time.monotonic() - self._outage_started,
                )
                self._outage_started = None
            self._changed.notify_all()
            return not self._backlog


def _describe(exc: BaseException | None) -> str:
    """The driver's error and the first line of its message, for one log line."""
    if exc is None:
        return "no error"
    cause: BaseException | None = exc
    for _ in range(8):  # RecordError -> OperationalError -> the driver's error
        if cause is None or isinstance(cause, DBAPIError):
            break
        cause = cause.__cause__ or cause.__context__
    error = cause.orig if isinstance(cause, DBAPIError) else exc
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
