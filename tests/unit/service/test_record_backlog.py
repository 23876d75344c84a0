"""The record backlog: what is archived while the database is away is recorded when it returns."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import psycopg
import psycopg.errors
import pydicom
import pytest
from conftest import free_port
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from lesionwatch.config.schema import ClassificationConfig
from lesionwatch.dicom_io.archive import Archive, ArchivedFile, ArchivedInstance
from lesionwatch.service import ingest
from lesionwatch.service.db.engine import create_db_engine, migrate, session_factory
from lesionwatch.service.db.models import Instance, Series, Study
from lesionwatch.service.ingest import InstanceRecorder, RecordError, RecordResult
from lesionwatch.service.reconcile import reconcile_archive
from lesionwatch.service.record_backlog import BufferedRecorder, database_unavailable

FAST = {"initial_backoff_s": 0.01, "max_backoff_s": 0.05}
TS = str(ExplicitVRLittleEndian)


# -- errors ------------------------------------------------------------------------------------


def _wrapped(orig: Exception, *, invalidated: bool = False) -> DBAPIError:
    """``orig`` as SQLAlchemy raises it (OperationalError, IntegrityError, ...)."""
    error = DBAPIError.instance(
        "SELECT 1", {}, orig, type(orig), connection_invalidated=invalidated
    )
    assert isinstance(error, DBAPIError)
    return error


def _in_record_error(exc: Exception) -> RecordError:
    try:
        raise RecordError("cannot record instance 1.2.3") from exc
    except RecordError as error:
        return error


def _sqlite_cantopen() -> sqlite3.Error:
    try:
        sqlite3.connect("/nonexistent-directory/lesionwatch.db")
    except sqlite3.Error as exc:
        return exc
    raise AssertionError("connected to a file in a missing directory")


def _psycopg_refused() -> psycopg.Error:
    try:
        psycopg.connect(f"host=127.0.0.1 port={free_port()} dbname=x user=x connect_timeout=2")
    except psycopg.Error as exc:
        return exc
    raise AssertionError("connected to a port nothing listens on")


def _sqlite_integrity() -> sqlite3.Error:
    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE TABLE t (x INTEGER UNIQUE)")
    connection.execute("INSERT INTO t VALUES (1)")
    try:
        connection.execute("INSERT INTO t VALUES (1)")
    except sqlite3.Error as exc:
        return exc
    finally:
        connection.close()
    raise AssertionError("duplicate accepted")


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        pytest.param(lambda: _wrapped(_psycopg_refused()), True, id="pg-connection-refused"),
        pytest.param(
            lambda: _in_record_error(_wrapped(_psycopg_refused())), True, id="pg-in-RecordError"
        ),
        pytest.param(
            lambda: _wrapped(psycopg.errors.lookup("57P01")("terminating connection")),
            True,
            id="pg-admin-shutdown",
        ),
        pytest.param(
            lambda: _wrapped(psycopg.errors.lookup("57P03")("the database system is starting")),
            True,
            id="pg-cannot-connect-now",
        ),
        pytest.param(
            lambda: _wrapped(psycopg.errors.lookup("08006")("connection failure")),
            True,
            id="pg-connection-failure",
        ),
        pytest.param(
            lambda: _wrapped(psycopg.InterfaceError("the connection is closed"), invalidated=True),
            True,
            id="disconnect-detected-by-dialect",
        ),
        pytest.param(lambda: _wrapped(_sqlite_cantopen()), True, id="sqlite-cantopen"),
        pytest.param(
            lambda: _in_record_error(_wrapped(_sqlite_cantopen())), True, id="sqlite-RecordError"
        ),
        pytest.param(
            lambda: _wrapped(psycopg.errors.lookup("22003")("value out of range")),
            False,
            id="pg-data-error",
        ),
        pytest.param(
            lambda: _wrapped(psycopg.errors.lookup("23505")("duplicate key")),
            False,
            id="pg-unique-violation",
        ),
        pytest.param(
            lambda: _wrapped(psycopg.errors.lookup("42P01")("relation does not exist")),
            False,
            id="pg-undefined-table",
        ),
        pytest.param(
            lambda: _in_record_error(_wrapped(_sqlite_integrity())), False, id="sqlite-integrity"
        ),
        pytest.param(lambda: ValueError("not a database error"), False, id="not-a-db-error"),
        pytest.param(lambda: OSError("disk"), False, id="os-error"),
    ],
)
def test_database_unavailable_tells_outages_from_other_errors(error: object, outage: bool) -> None:
    assert callable(error)
    assert database_unavailable(error()) is outage


def test_wrapped_errors_keep_their_sqlalchemy_type() -> None:
    # The classification rests on SQLAlchemy's mapping of DB-API exception classes.
    assert isinstance(_wrapped(_psycopg_refused()), OperationalError)
    assert isinstance(_wrapped(_sqlite_integrity()), IntegrityError)


# -- the backlog with a fake recorder ----------------------------------------------------------


def _outage() -> RecordError:
    """What InstanceRecorder raises when PostgreSQL refuses connections."""
    refused = psycopg.OperationalError("connection failed: Connection refused")
    return _in_record_error(_wrapped(refused))


def _instance(
    study_uid: str | None = None, series_uid: str | None = None, number: int = 1
) -> Dataset:
    dataset = Dataset()
    dataset.SOPClassUID = MRImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = study_uid or generate_uid()
    dataset.SeriesInstanceUID = series_uid or generate_uid()
    dataset.Modality = "MR"
    dataset.InstanceNumber = number
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.SourceApplicationEntityTitle = "SCANNER"
    return dataset


def _archive(archive: Archive, dataset: Dataset) -> ArchivedInstance:
    """Archive ``dataset`` as the listener does (durably, before it is recorded)."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return archive.store(
        str(dataset.StudyInstanceUID),
        str(dataset.SeriesInstanceUID),
        str(dataset.SOPInstanceUID),
        (buffer.getvalue(),),
    )


def _result(instance_id: int) -> RecordResult:
    return RecordResult(
        study_id=1,
        series_id=1,
        instance_id=instance_id,
        new_study=False,
        new_series=False,
        new_instance=True,
        content_changed=False,
        new_series_after_assembly=False,
        series_class=None,
    )


@dataclass
class FakeRecorder:
    """Raises an outage for the first ``failures`` calls (and ``errors`` for chosen UIDs)."""

    failures: int = 0
    errors: dict[str, Exception] = field(default_factory=dict)
    calls: list[tuple[str, float]] = field(default_factory=list)
    recorded: list[tuple[str, str, str, datetime | None]] = field(default_factory=list)

    def record(
        self,
        dataset: Dataset,
        archived: ArchivedFile,
        *,
        transfer_syntax_uid: str,
        calling_ae_title: str = "",
        received_at: datetime | None = None,
    ) -> RecordResult:
        uid = str(dataset.SOPInstanceUID)
        self.calls.append((uid, time.monotonic()))
        if len(self.calls) <= self.failures:
            raise _outage()
        if uid in self.errors:
            raise self.errors[uid]
        assert str(archived.relative_path).endswith(f"{uid}.dcm")
        self.recorded.append((uid, transfer_syntax_uid, calling_ae_title, received_at))
        return _result(len(self.recorded))


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    return Archive(tmp_path / "data", fsync=False)


@pytest.fixture
def hook_results() -> list[RecordResult]:
    return []


def _buffered(
    fake: FakeRecorder, archive: Archive, hook_results: list[RecordResult], **kwargs: float
) -> BufferedRecorder:
    return BufferedRecorder(
        fake,  # type: ignore[arg-type]  # the InstanceRecorder interface, duck-typed
        archive.root,
        on_recorded=hook_results.append,
        **(FAST | kwargs),
    )


@pytest.fixture
def running() -> Iterator[list[BufferedRecorder]]:
    """Started recorders, stopped after the test."""
    started: list[BufferedRecorder] = []
    yield started
    for buffered in started:
        buffered.stop()


def _send(buffered: BufferedRecorder, archive: Archive, dataset: Dataset) -> RecordResult | None:
    archived = _archive(archive, dataset)
    return buffered.record(dataset, archived, transfer_syntax_uid=TS, calling_ae_title="SCANNER")


def test_live_records_pass_through_when_the_database_answers(
    archive: Archive, hook_results: list[RecordResult]
) -> None:
    fake = FakeRecorder()
    buffered = _buffered(fake, archive, hook_results)
    dataset = _instance()
    result = _send(buffered, archive, dataset)
    assert result is not None and result.instance_id == 1
    assert fake.recorded == [(str(dataset.SOPInstanceUID), TS, "SCANNER", None)]
    assert buffered.pending == 0
    assert hook_results == []  # the listener calls its hook with the returned result


def test_an_outage_queues_instances_and_records_them_in_order_when_it_ends(
    archive: Archive,
    hook_results: list[RecordResult],
    running: list[BufferedRecorder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeRecorder(failures=4)  # the live attempt, then three backlog attempts
    buffered = _buffered(fake, archive, hook_results)
    study, series = generate_uid(), generate_uid()
    datasets = [_instance(study, series, number) for number in range(1, 6)]
    caplog.set_level(logging.INFO, logger="lesionwatch.service.record_backlog")

    assert [_send(buffered, archive, dataset) for dataset in datasets] == [None] * 5
    # Only the first instance tried the database; the others joined the backlog directly.
    assert len(fake.calls) == 1
    assert buffered.pending == 5
    before = time.monotonic()
    buffered.start()
    running.append(buffered)
    assert buffered.wait_drained(10)

    sent = [str(dataset.SOPInstanceUID) for dataset in datasets]
    assert [uid for uid, *_ in fake.recorded] == sent  # in arrival order, each once
    assert all(ts == TS and aet == "SCANNER" for _, ts, aet, _ in fake.recorded)
    stamps = [received_at for *_, received_at in fake.recorded if received_at is not None]
    assert len(stamps) == 5 and stamps == sorted(stamps)  # rows keep their receive time
    assert [r.instance_id for r in hook_results] == [1, 2, 3, 4, 5]
    # Three failed attempts waited 0.01 (new backlog), then 0.02, 0.04 and 0.05 (capped).
    assert time.monotonic() - before >= 0.01 + 0.02 + 0.04 + 0.05
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("database unavailable (OperationalError: connection failed")
    assert "1 instances archived, to be recorded when it returns" in warnings[0]
    assert warnings[1].startswith("database available again: 5 backlog instances recorded")

    # Back to live recording once drained.
    result = _send(buffered, archive, _instance(study, series, 6))
    assert result is not None and result.instance_id == 6
    assert buffered.pending == 0


def test_backoff_doubles_up_to_its_cap(
    archive: Archive, hook_results: list[RecordResult], running: list[BufferedRecorder]
) -> None:
    fake = FakeRecorder(failures=7)
    buffered = _buffered(fake, archive, hook_results, initial_backoff_s=0.02, max_backoff_s=0.1)
    assert _send(buffered, archive, _instance()) is None
    buffered.start()
    running.append(buffered)
    assert buffered.wait_drained(10)
    times = [called for _, called in fake.calls]
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    # The first backlog attempt after the live failure waits 0.02 s; then 0.04, 0.08, 0.1, ...
    expected = [0.02, 0.04, 0.08, 0.1, 0.1, 0.1, 0.1]
    assert len(gaps) == len(expected)
    for gap, wait in zip(gaps, expected, strict=True):
        assert wait <= gap < wait + 0.5


def test_other_errors_are_raised_live_and_skipped_in_the_backlog(
    archive: Archive,
    hook_results: list[RecordResult],
    running: list[BufferedRecorder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad, good = _instance(), _instance()
    data_error = _in_record_error(_wrapped(psycopg.errors.lookup("22001")("value too long")))
    fake = FakeRecorder(errors={str(bad.SOPInstanceUID): data_error})
    buffered = _buffered(fake, archive, hook_results)

    # Live: today's behaviour, the listener refuses the instance.
    with pytest.raises(RecordError):
        _send(buffered, archive, bad)
    assert buffered.pending == 0

    # From the backlog (already acknowledged): logged, skipped, the rest still recorded.
    fake.failures = len(fake.calls) + 1
    assert _send(buffered, archive, _instance()) is None
    assert _send(buffered, archive, bad) is None
    assert _send(buffered, archive, good) is None
    buffered.start()
    running.append(buffered)
    assert buffered.wait_drained(10)
    assert str(bad.SOPInstanceUID) not in [uid for uid, *_ in fake.recorded]
    assert str(good.SOPInstanceUID) == fake.recorded[-1][0]
    assert len(hook_results) == 2
    assert any(
        r.levelno == logging.ERROR and "cannot record archived instance" in r.getMessage()
        for r in caplog.records
    )


def test_a_missing_archive_file_is_logged_and_skipped(
    archive: Archive, hook_results: list[RecordResult], running: list[BufferedRecorder]
) -> None:
    fake = FakeRecorder(failures=1)
    buffered = _buffered(fake, archive, hook_results)
    gone, kept = _instance(), _instance()
    archived = _archive(archive, gone)
    assert buffered.record(gone, archived, transfer_syntax_uid=TS) is None
    assert _send(buffered, archive, kept) is None
    archive.path_of(archived.relative_path).unlink()
    buffered.start()
    running.append(buffered)
    assert buffered.wait_drained(10)
    assert [uid for uid, *_ in fake.recorded] == [str(kept.SOPInstanceUID)]


def test_non_outage_errors_from_the_wrapped_recorder_propagate_unchanged(
    archive: Archive, hook_results: list[RecordResult]
) -> None:
    dataset = _instance()
    fake = FakeRecorder(errors={str(dataset.SOPInstanceUID): ValueError("bug")})
    buffered = _buffered(fake, archive, hook_results)
    with pytest.raises(ValueError, match="bug"):
        _send(buffered, archive, dataset)
    assert buffered.pending == 0


def test_stop_leaves_the_backlog_and_start_twice_is_refused(
    archive: Archive, hook_results: list[RecordResult], caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeRecorder(failures=10**6)
    buffered = _buffered(fake, archive, hook_results)
    assert _send(buffered, archive, _instance()) is None
    buffered.start()
    with pytest.raises(RuntimeError):
        buffered.start()
    started = time.monotonic()
    buffered.stop(timeout_s=5)
    assert time.monotonic() - started < 2  # the back-off wait is interrupted
    assert buffered.pending == 1
    assert not buffered.wait_drained(0.01)
    assert "stopping with 1 archived instances not recorded" in caplog.text
    assert not [t for t in threading.enumerate() if t.name == "record-backlog"]


# -- a real recorder on a SQLite file that goes away ------------------------------------------


class SqliteSite:
    """An InstanceRecorder on a SQLite file whose directory can be taken away and back."""

    def __init__(self, tmp_path: Path) -> None:
        self.db_dir = tmp_path / "db"
        self.away = tmp_path / "db-away"
        self.engine: Engine = create_db_engine(f"sqlite:///{self.db_dir / 'lesionwatch.db'}")
        migrate(self.engine)
        self.sessions = session_factory(self.engine)
        self.recorder = InstanceRecorder(self.sessions, ClassificationConfig())

    def take_away(self) -> None:
        self.engine.dispose()  # pooled connections would keep the renamed file open
        self.db_dir.rename(self.away)

    def bring_back(self) -> None:
        self.away.rename(self.db_dir)

    def rows(self) -> list[tuple[str, str, str, int, datetime]]:
        with self.sessions() as session:
            query = select(
                Instance.sop_instance_uid,
                Instance.path,
                Instance.sha256,
                Instance.size_bytes,
                Instance.received_at,
            ).order_by(Instance.id)
            return [tuple(row) for row in session.execute(query)]  # type: ignore[misc]

    def count(self, model: type[Study] | type[Series]) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[SqliteSite]:
    site = SqliteSite(tmp_path)
    yield site
    site.engine.dispose()


@pytest.fixture
def ge_files(ge_t1_dir: Path) -> list[Path]:
    return sorted(ge_t1_dir.iterdir())[:8]


def _store_file(archive: Archive, path: Path) -> tuple[Dataset, ArchivedInstance]:
    """Archive a real file as received and return its header, as the listener has them."""
    data = path.read_bytes()
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    archived = archive.store(
        str(dataset.StudyInstanceUID),
        str(dataset.SeriesInstanceUID),
        str(dataset.SOPInstanceUID),
        (data,),
    )
    return dataset, archived


def _send_file(buffered: BufferedRecorder, archive: Archive, path: Path) -> RecordResult | None:
    dataset, archived = _store_file(archive, path)
    return buffered.record(
        dataset,
        archived,
        transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
        calling_ae_title="GE_MR",
    )


def test_sqlite_outage_is_bridged_and_every_instance_recorded_once(
    site: SqliteSite,
    archive: Archive,
    ge_files: list[Path],
    hook_results: list[RecordResult],
    running: list[BufferedRecorder],
) -> None:
    buffered = BufferedRecorder(
        site.recorder, archive.root, on_recorded=hook_results.append, **FAST
    )
    buffered.start()
    running.append(buffered)
    live = [_send_file(buffered, archive, path) for path in ge_files[:2]]
    assert all(result is not None for result in live)

    site.take_away()
    try:
        queued = [_send_file(buffered, archive, path) for path in ge_files[2:]]
        assert queued == [None] * 6
        time.sleep(0.2)  # a few failed backlog attempts
        assert buffered.pending == 6
    finally:
        site.bring_back()
    assert buffered.wait_drained(30)

    rows = site.rows()
    sent = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ge_files]
    assert [uid for uid, *_ in rows] == sent  # in order, each exactly once
    for _, path, sha256, size_bytes, _ in rows:
        archived = archive.path_of(path)
        assert archived.stat().st_size == size_bytes
        assert hashlib.sha256(archived.read_bytes()).hexdigest() == sha256
    assert site.count(Study) == 1 and site.count(Series) == 1
    assert [r.new_instance for r in hook_results] == [True] * 6  # backlog results only
    with site.sessions() as session:
        series = session.scalars(select(Series)).one()
        assert series.classification_reason  # classified as a live first instance would be


def _mtime(archive: Archive, relative: str) -> datetime:
    return datetime.fromtimestamp(os.stat(archive.path_of(relative)).st_mtime, UTC)


def test_reconciliation_records_a_backlog_left_by_a_crash_during_the_outage(
    site: SqliteSite, archive: Archive, ge_files: list[Path]
) -> None:
    buffered = BufferedRecorder(site.recorder, archive.root, **FAST)  # never started
    assert _send_file(buffered, archive, ge_files[0]) is not None
    site.take_away()
    assert [_send_file(buffered, archive, path) for path in ge_files[1:]] == [None] * 7
    buffered.stop()  # the process dies with the backlog
    site.bring_back()

    report = reconcile_archive(archive.root, site.recorder)  # what the next start runs
    assert report.recorded == 7
    assert len({uid for uid, *_ in site.rows()}) == len(site.rows()) == 8


def test_reconciliation_covers_a_backlog_left_by_a_crash_mid_drain_after_a_long_outage(
    site: SqliteSite, archive: Archive, ge_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database returns an hour after the outage began and the process dies mid-drain.

    Reconciliation examines files modified since the newest row's ``received_at`` minus ten
    minutes. Backlog rows keep their receive time, so the newest row stays older than the
    files still on the backlog; were it the recording time (an hour later), those files would
    fall outside the window and never be recorded.
    """
    buffered = BufferedRecorder(site.recorder, archive.root, **FAST)
    assert _send_file(buffered, archive, ge_files[0]) is not None
    site.take_away()
    assert [_send_file(buffered, archive, path) for path in ge_files[1:]] == [None] * 7
    site.bring_back()

    an_hour_later = ingest.utcnow() + timedelta(hours=1)
    monkeypatch.setattr(ingest, "utcnow", lambda: an_hour_later)
    drained = 0
    real_record = site.recorder.record

    def record_three_then_die(*args: object, **kwargs: object) -> RecordResult:
        nonlocal drained
        if drained == 3:
            raise _outage()  # keeps the rest on the backlog until stop()
        drained += 1
        return real_record(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(site.recorder, "record", record_three_then_die)
    buffered.start()
    deadline = time.monotonic() + 10
    while buffered.pending > 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    buffered.stop()  # the process dies
    assert buffered.pending == 4
    monkeypatch.undo()

    rows = site.rows()
    assert len(rows) == 4  # one live, three from the backlog
    recorded_paths = {path for _, path, *_ in rows}
    archived = [str(p.relative_to(archive.root)) for p in archive.root.rglob("*.dcm")]
    unrecorded = [relative for relative in archived if relative not in recorded_paths]
    assert len(unrecorded) == 4
    with site.sessions() as session:  # the study's timestamps are the recording time
        study = session.scalars(select(Study)).one()
        assert study.last_received_at >= an_hour_later - timedelta(seconds=1)

    report = reconcile_archive(archive.root, site.recorder)  # the next start, default window
    assert report.since is not None
    assert all(_mtime(archive, relative) >= report.since for relative in unrecorded)
    assert report.recorded == 4
    assert len({uid for uid, *_ in site.rows()}) == len(site.rows()) == 8
