"""Archive reconciliation: re-index archive files that have no (or a stale) database row.

The archive is the durable record of what was acknowledged. A C-STORE success is returned
only after the instance file was fsynced, renamed into place and its directory fsynced, and
then its row committed. With SQLite in WAL mode and ``synchronous=NORMAL`` a commit survives a
process crash but an OS crash or power loss can drop the newest commits (the WAL is fsynced
at checkpoints, not at each commit); the files of those instances are on disk regardless.
:func:`reconcile_archive`, run when the listener starts, records them again, so the index is
recoverable from the archive and no acknowledged instance is ever lost from it.

Commits are lost only as a suffix (the WAL is replayed in order up to its first missing frame),
so every file whose row was lost is younger than the newest row that survived: by default only
files modified since that row's ``received_at`` minus :data:`SAFETY_MARGIN` are examined (the
whole archive when the database has no instance), and only series directories modified since
then are listed. ``archive/.incoming`` holds unacknowledged partial writes and is skipped.

An instance re-sent under other study or series UIDs lands at another path. The listener
removes the older copy once the new one is recorded; a copy left behind (a crash in between,
or a database outage) is resolved here: the file written last (newest mtime; an identical
re-send refreshes it) is the last acknowledged copy and wins, whatever the directory order,
and the other copy is deleted once the winner's row is committed.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath

from pydicom import dcmread
from sqlalchemy import func, select

from lesionwatch.dicom_io.archive import ArchivedInstance, StoreOutcome

from .db.models import Instance
from .ingest import InstanceRecorder

__all__ = ["SAFETY_MARGIN", "ReconcileReport", "reconcile_archive"]

LOGGER = logging.getLogger(__name__)

# Longer than any delay between a file's rename and its row's commit, and than clock jitter.
SAFETY_MARGIN = timedelta(minutes=10)
_INCOMING = ".incoming"
_SUFFIX = ".dcm"
_LOOKUP_BATCH = 500  # rows fetched per IN (...) query


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What one reconciliation pass found and did."""

    since: datetime | None  # files modified before this were not examined; None: all of them
    examined: int = 0  # archive files in the window
    recorded: int = 0  # files without a row, now recorded
    updated: int = 0  # files whose row named other content (a lost replacement), now updated
    invalid: tuple[str, ...] = field(default=())  # relative paths that are no usable instance
    # Older copies of instances re-sent under other study/series UIDs (removed).
    superseded: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        window = (
            "whole archive" if self.since is None else f"files since {self.since:%Y-%m-%d %H:%M}"
        )
        return (
            f"archive reconciliation ({window}): {self.examined} examined, {self.recorded} "
            f"recorded, {self.updated} updated, {len(self.invalid)} invalid, "
            f"{len(self.superseded)} superseded"
        )


def reconcile_archive(
    archive_root: Path, recorder: InstanceRecorder, since: datetime | None = None
) -> ReconcileReport:
    """Record archive files under ``archive_root`` that the database lacks or has stale.

    ``since`` limits the scan to files modified at or after it; by default it is the newest
    recorded instance's ``received_at`` minus :data:`SAFETY_MARGIN`, or the whole archive
    when no instance is recorded. Files that cannot be read as the instance their path names
    are logged and reported in :attr:`ReconcileReport.invalid`, never deleted.
    """
    root = Path(archive_root)
    if since is None:
        since = _default_since(recorder)
    since_epoch_s = since.timestamp() if since is not None else None
    # Newest first: of two copies of one instance, the last acknowledged is recorded first.
    candidates = sorted(
        _candidate_files(root, since_epoch_s), key=lambda item: item[2], reverse=True
    )
    known = _recorded_digests(recorder, [relative for relative, _, _ in candidates])
    recorded = updated = 0
    invalid: list[str] = []
    superseded: list[str] = []
    for relative, path, _mtime in candidates:
        row = known.get(str(relative))
        try:
            with path.open("rb") as handle:  # streamed: instances may be large
                sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
                size_bytes = handle.tell()
        except OSError as exc:
            LOGGER.warning("archive reconciliation cannot read %s: %s", path, exc)
            invalid.append(str(relative))
            continue
        if row is not None and row == (sha256, size_bytes):
            continue
        outcome = _record_file(recorder, relative, path, size_bytes, sha256)
        if outcome is _Outcome.INVALID:
            invalid.append(str(relative))
        elif outcome is _Outcome.SUPERSEDED:
            superseded.append(str(relative))
        elif row is None:
            recorded += 1
        else:
            updated += 1
    report = ReconcileReport(
        since=since,
        examined=len(candidates),
        recorded=recorded,
        updated=updated,
        invalid=tuple(invalid),
        superseded=tuple(superseded),
    )
    log = LOGGER.warning if recorded or updated or invalid else LOGGER.info
    log("%s", report)
    return report


def _default_since(recorder: InstanceRecorder) -> datetime | None:
    with recorder.engine.connect() as connection:
        newest = connection.execute(select(func.max(Instance.received_at))).scalar()
    if newest is None:
        return None
    if isinstance(newest, str):  # SQLite hands aggregates back untyped
        newest = datetime.fromisoformat(newest)
    if newest.tzinfo is None:
        newest = newest.replace(tzinfo=UTC)
    return newest - SAFETY_MARGIN


def _candidate_files(
    root: Path, since_epoch_s: float | None
) -> Iterator[tuple[PurePosixPath, Path, int]]:
    """``(relative path, path, mtime ns)`` of instance files modified since ``since_epoch_s``.

    Adding or renaming a file updates its series directory's mtime, so series directories
    older than the window are not listed at all.
    """
    for study in _subdirectories(root):
        if study.name == _INCOMING:
            continue
        for series in _subdirectories(Path(study.path)):
            if since_epoch_s is not None and series.stat().st_mtime < since_epoch_s:
                continue
            with os.scandir(series.path) as entries:
                for entry in entries:
                    if not entry.name.endswith(_SUFFIX) or not entry.is_file(follow_symlinks=False):
                        continue
                    mtime_ns = entry.stat().st_mtime_ns
                    if since_epoch_s is not None and mtime_ns < since_epoch_s * 1e9:
                        continue
                    relative = PurePosixPath(study.name, series.name, entry.name)
                    yield relative, Path(entry.path), mtime_ns


def _subdirectories(path: Path) -> list[os.DirEntry[str]]:
    with os.scandir(path) as entries:
        return sorted(
            (entry for entry in entries if entry.is_dir(follow_symlinks=False)),
            key=lambda entry: entry.name,
        )


def _recorded_digests(
    recorder: InstanceRecorder, relatives: list[PurePosixPath]
) -> dict[str, tuple[str, int]]:
    """``path -> (sha256, size_bytes)`` of the rows naming these archive paths."""
    found: dict[str, tuple[str, int]] = {}
    paths = [str(relative) for relative in relatives]
    with recorder.engine.connect() as connection:
        for start in range(0, len(paths), _LOOKUP_BATCH):
            batch = paths[start : start + _LOOKUP_BATCH]
            query = select(Instance.path, Instance.sha256, Instance.size_bytes).where(
                Instance.path.in_(batch)
            )
            for path, sha256, size_bytes in connection.execute(query):
                found[path] = (sha256, size_bytes)
    return found


class _Outcome(enum.Enum):
    RECORDED = enum.auto()
    INVALID = enum.auto()  # not the instance its path names
    SUPERSEDED = enum.auto()  # an older copy of an instance recorded at another path


def _record_file(
    recorder: InstanceRecorder, relative: PurePosixPath, path: Path, size_bytes: int, sha256: str
) -> _Outcome:
    """Record one archive file, unless it is invalid or superseded (both logged)."""
    try:
        dataset = dcmread(path, stop_before_pixels=True)
        transfer_syntax_uid = str(dataset.file_meta.TransferSyntaxUID)
        identity = (
            str(dataset.StudyInstanceUID),
            str(dataset.SeriesInstanceUID),
            str(dataset.SOPInstanceUID) + _SUFFIX,
        )
    except Exception as exc:
        LOGGER.warning("archive reconciliation skips %s: not a readable instance (%s)", path, exc)
        return _Outcome.INVALID
    if identity != relative.parts:
        LOGGER.warning(
            "archive reconciliation skips %s: its UIDs name %s", path, "/".join(identity)
        )
        return _Outcome.INVALID
    # A re-send under other study/series UIDs may have left another copy behind: the copy
    # written last is the instance, the other one goes once that is recorded.
    with recorder.engine.connect() as connection:
        recorded_path = connection.execute(
            select(Instance.path).where(Instance.sop_instance_uid == str(dataset.SOPInstanceUID))
        ).scalar()
    archive_root = path.parents[2]
    if recorded_path not in (None, str(relative)):
        recorded_file = archive_root / recorded_path
        if recorded_file.is_file() and recorded_file.stat().st_mtime_ns >= path.stat().st_mtime_ns:
            _remove_copy(path, f"an older copy of the instance recorded at {recorded_path}")
            return _Outcome.SUPERSEDED
    calling_ae_title = str(dataset.file_meta.get("SourceApplicationEntityTitle", "")).strip()
    archived = ArchivedInstance(relative, size_bytes, sha256, StoreOutcome.STORED)
    result = recorder.record(
        dataset,
        archived,
        transfer_syntax_uid=transfer_syntax_uid,
        calling_ae_title=calling_ae_title,
    )
    LOGGER.info("archive reconciliation recorded %s", relative)
    if result.superseded_path is not None:
        _remove_copy(archive_root / result.superseded_path, f"superseded by {relative}")
    return _Outcome.RECORDED


def _remove_copy(path: Path, why: str) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        LOGGER.warning("archive reconciliation cannot remove %s (%s): %s", path, why, exc)
        return
    LOGGER.warning("archive reconciliation removed %s: %s", path, why)
