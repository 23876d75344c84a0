"""Archive reconciliation restores the index from the archive after lost commits or a lost DB."""

from __future__ import annotations

import os
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import free_port, require_executable
from scp_harness import RunningListener, gunzip_series, run_storescu, running_listener
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from lesionwatch.config.schema import ClassificationConfig
from lesionwatch.service.db.engine import create_db_engine, migrate, session_factory
from lesionwatch.service.db.models import Instance, Series, Study
from lesionwatch.service.ingest import InstanceRecorder
from lesionwatch.service.reconcile import reconcile_archive

pytestmark = pytest.mark.integration

_GE_FILES = 12
_SIEMENS_FILES = 8


@pytest.fixture(scope="module")
def sent_files(
    tmp_path_factory: pytest.TempPathFactory, siemens_t1_dir: Path, ge_t1_dir: Path
) -> Path:
    """A few instances of two real series (two studies), as storescu reads them."""
    target = tmp_path_factory.mktemp("send")
    siemens = gunzip_series(siemens_t1_dir, tmp_path_factory.mktemp("siemens"))
    for path in sorted(siemens.iterdir())[:_SIEMENS_FILES]:
        shutil.copyfile(path, target / f"siemens-{path.name}")
    for path in sorted(ge_t1_dir.iterdir())[:_GE_FILES]:
        shutil.copyfile(path, target / f"ge-{path.name}")
    return target


def _snapshot(sessions: sessionmaker[Session]) -> list[tuple[Any, ...]]:
    """Every recorded column that comes from the received data (no ids, no receive times)."""
    query = (
        select(
            Study.study_instance_uid,
            Study.patient_id,
            Study.patient_name,
            Study.study_date,
            Study.accession_number,
            Study.study_description,
            Series.series_instance_uid,
            Series.modality,
            Series.series_number,
            Series.series_description,
            Series.manufacturer,
            Series.series_class,
            Series.classification_reason,
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Instance.transfer_syntax_uid,
            Instance.instance_number,
            Instance.path,
            Instance.size_bytes,
            Instance.sha256,
            Instance.calling_ae_title,
        )
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .order_by(Instance.sop_instance_uid)
    )
    with sessions() as session:
        return [tuple(row) for row in session.execute(query)]


def _recorder(listener: RunningListener) -> InstanceRecorder:
    return InstanceRecorder(listener.sessions, ClassificationConfig())


def _received(tmp_path: Path, database_url: str) -> Any:
    require_executable("storescu")
    return running_listener(tmp_path / "lw", database_url, free_port())


def test_deleted_rows_are_restored_exactly(
    tmp_path: Path, database_url: str, sent_files: Path
) -> None:
    with _received(tmp_path, database_url) as listener:
        result = run_storescu(listener.port, sent_files, calling_ae="PACS1")
        assert result.returncode == 0, result.stderr
        before = _snapshot(listener.sessions)
        assert len(before) == _GE_FILES + _SIEMENS_FILES
        assert {row[-1] for row in before} == {"PACS1"}

        # The newest commits lost (as after a power loss with synchronous=NORMAL).
        lost = [row[13] for row in before[::3]]
        with listener.engine.begin() as connection:
            connection.execute(delete(Instance).where(Instance.sop_instance_uid.in_(lost)))
        assert len(_snapshot(listener.sessions)) == len(before) - len(lost)

        report = reconcile_archive(listener.archive_root, _recorder(listener))

        assert report.since is not None  # rows remain: only recent files are examined
        assert report.examined == len(before)
        assert (report.recorded, report.updated, report.invalid) == (len(lost), 0, ())
        assert _snapshot(listener.sessions) == before
        again = reconcile_archive(listener.archive_root, _recorder(listener))
        assert (again.recorded, again.updated) == (0, 0)  # idempotent


def test_a_lost_database_is_rebuilt_from_the_archive(
    tmp_path: Path, database_url: str, sent_files: Path
) -> None:
    with _received(tmp_path, database_url) as listener:
        assert run_storescu(listener.port, sent_files).returncode == 0
        before = _snapshot(listener.sessions)
        archive_root = listener.archive_root
        # Unacknowledged partial writes are no instances.
        (archive_root / ".incoming" / "123-abc-0.tmp").write_bytes(b"partial")
        if database_url.startswith("sqlite"):
            # The database file is gone: a new one, migrated from scratch.
            listener.engine.dispose()
            database_file = Path(database_url.split("///", 1)[1])
            for leftover in database_file.parent.glob(database_file.name + "*"):
                leftover.unlink()
            engine = create_db_engine(database_url)
        else:
            engine = listener.engine
            with engine.begin() as connection:
                for table in (Instance, Series, Study):
                    connection.execute(delete(table))
        migrate(engine)
        sessions = session_factory(engine)
        assert _snapshot(sessions) == []

        report = reconcile_archive(archive_root, InstanceRecorder(sessions, ClassificationConfig()))

        assert report.since is None  # an empty database: the whole archive is examined
        assert (report.examined, report.recorded, report.invalid) == (len(before), len(before), ())
        assert _snapshot(sessions) == before
        engine.dispose()


def test_a_lost_replacement_is_updated_and_old_files_are_outside_the_window(
    tmp_path: Path, database_url: str, sent_files: Path
) -> None:
    with _received(tmp_path, database_url) as listener:
        assert run_storescu(listener.port, sent_files).returncode == 0
        before = _snapshot(listener.sessions)
        stale = before[0]
        old = next(row for row in before if row[6] != stale[6])  # in another series
        stale_uid, old_uid = stale[13], old[13]
        with listener.engine.begin() as connection:
            # A re-send with other content whose row update was lost.
            connection.execute(
                update(Instance)
                .where(Instance.sop_instance_uid == stale_uid)
                .values(sha256="0" * 64, size_bytes=1)
            )
            connection.execute(delete(Instance).where(Instance.sop_instance_uid == old_uid))
        # A file (and its directory) from long before the newest surviving row is not examined.
        old_file = listener.archive_root / old[17]
        long_ago = time.time() - 86400
        for path in (old_file, old_file.parent):
            os.utime(path, (long_ago, long_ago))
        # A file that is no instance is reported, never deleted.
        garbage = old_file.parent.parent / "9.9.9" / "9.9.9.9.dcm"
        garbage.parent.mkdir()
        garbage.write_bytes(b"not DICOM")

        # An older copy of an instance later re-sent under another series UID (written before
        # the recorded copy) stays unrecorded and is removed.
        resent = before[-1]
        recorded_copy = listener.archive_root / resent[17]
        copy = pydicom.dcmread(recorded_copy)
        copy.SeriesInstanceUID = "1.2.3.999"
        older = listener.archive_root / resent[0] / "1.2.3.999" / f"{resent[13]}.dcm"
        older.parent.mkdir()
        copy.save_as(older)
        written = recorded_copy.stat().st_mtime - 1
        os.utime(older, (written, written))

        report = reconcile_archive(listener.archive_root, _recorder(listener))

        assert (report.recorded, report.updated) == (0, 1)
        assert report.invalid == ("/".join(garbage.parts[-3:]),)
        assert report.superseded == ("/".join(older.parts[-3:]),)
        assert garbage.exists()
        assert not older.exists() and recorded_copy.exists()
        after = _snapshot(listener.sessions)
        assert after == [row for row in before if row[13] != old_uid]

        # An explicit window reaching back far enough finds the old file too.
        since = datetime.now(UTC) - timedelta(days=2)
        report = reconcile_archive(listener.archive_root, _recorder(listener), since=since)
        assert report.recorded == 1
        assert _snapshot(listener.sessions) == before


def _resend_under_other_uids(listener: RunningListener, files: list[Path], folder: Path) -> None:
    """Re-send ``files`` by C-STORE with new Series (even) or Study (odd) Instance UIDs."""
    folder.mkdir()
    for index, path in enumerate(files):
        dataset = pydicom.dcmread(path)
        if index % 2:
            dataset.StudyInstanceUID = f"1.2.826.0.1.3680043.10.1.{index}"
        dataset.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.2.{index}"
        dataset.save_as(folder / path.name)
    assert run_storescu(listener.port, folder).returncode == 0


def test_an_index_rebuild_keeps_the_last_copy_of_instances_resent_under_other_uids(
    tmp_path: Path, database_url: str, sent_files: Path
) -> None:
    with _received(tmp_path, database_url) as listener:
        assert run_storescu(listener.port, sent_files).returncode == 0
        first = {row[13]: row[17] for row in _snapshot(listener.sessions)}
        resent = sorted(sent_files.iterdir())[::2]
        _resend_under_other_uids(listener, resent, tmp_path / "resent")
        after_resend = _snapshot(listener.sessions)
        latest = {row[13]: row[17] for row in after_resend}
        moved = {uid for uid in first if first[uid] != latest[uid]}
        assert len(moved) == len(resent)
        # The listener removed each superseded copy once the new one was recorded.
        for uid in moved:
            assert not (listener.archive_root / first[uid]).exists()
            assert (listener.archive_root / latest[uid]).exists()

        # Older copies left behind (a crash between the new row's commit and the removal), in
        # directories that sort both before and after the new ones; their mtimes are older.
        for uid in moved:
            old_copy = listener.archive_root / first[uid]
            old_copy.parent.mkdir(parents=True, exist_ok=True)
            dataset = pydicom.dcmread(listener.archive_root / latest[uid])
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID = first[uid].split("/")[:2]
            dataset.save_as(old_copy)
            written = (listener.archive_root / latest[uid]).stat().st_mtime - 5
            os.utime(old_copy, (written, written))

        # The index is lost and rebuilt from the archive.
        with listener.engine.begin() as connection:
            for table in (Instance, Series, Study):
                connection.execute(delete(table))
        report = reconcile_archive(listener.archive_root, _recorder(listener))

        rebuilt = {row[13]: row[17] for row in _snapshot(listener.sessions)}
        assert rebuilt == latest
        assert len(report.superseded) == len(moved)
        for uid in moved:
            assert not (listener.archive_root / first[uid]).exists()
        # The rebuilt rows equal what the listener recorded (contents, paths, digests).
        assert _snapshot(listener.sessions) == after_resend
