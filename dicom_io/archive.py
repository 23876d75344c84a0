"""The durable instance archive: one file per SOP instance, exactly as it was received.

Layout: ``<data_dir>/archive/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
A file is written to a temporary name in ``archive/.incoming`` (same file system), fsynced,
renamed over its final name and that directory fsynced, so once :meth:`PendingInstance.finish`
(or :meth:`Archive.store`) returns the instance survives a crash, and a crash mid-write leaves
at most a temporary file, never a half-written instance.

The archive is the durable record of what the listener acknowledged: a file is durable before
its database row commits, and the listener answers success only after both. The index may lose
its newest commits to an OS crash (SQLite WAL with ``synchronous=NORMAL``); the service then
re-indexes those files from here at start (:mod:`lesionwatch.service.reconcile`).

The two flushes per instance (file, then directory) are this path's floor: on the development
VM's disk ~2-3 ms each, more than the rest of a C-STORE. They run in the association's own
thread (fsync releases the GIL, so parallel associations overlap their flushes).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import itertools
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

__all__ = [
    "Archive",
    "ArchiveError",
    "ArchivedFile",
    "ArchivedInstance",
    "InvalidUidError",
    "OutOfSpaceError",
    "PendingInstance",
    "SpooledFile",
    "StoreOutcome",
]

LOGGER = logging.getLogger(__name__)

# DICOM UIDs are digits and dots; a few letters and dashes are tolerated because real devices
# send them, but nothing that could climb out of the archive directory ("/", "..", NUL).
_UID_PATTERN = re.compile(r"[0-9A-Za-z._-]{1,64}")
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_BYTES_PER_MB = 1024 * 1024
_TEMP_SUFFIX = ".tmp"
# Files are written here, named by no UID yet, while the header is checked; a rename on the
# same file system then moves them into place. Leftovers are unacknowledged partial writes.
_INCOMING = ".incoming"
_STALE_INCOMING_S = 3600.0  # older temporary files are crash leftovers, not writes in progress
# Temporary names start with "<pid>.<process start time>-": a file whose process is gone is a
# crash leftover at once (a restarted container reuses its pid, not its start time).
_TEMP_OWNER = re.compile(r"(\d+)\.(\d+)-")


class ArchiveError(Exception):
    """An instance could not be archived (the sender may retry)."""


class OutOfSpaceError(ArchiveError):
    """Free disk space is below the watermark, or the disk filled up during the write."""


class InvalidUidError(ArchiveError):
    """A UID cannot be used as an archive path component."""


class StoreOutcome(enum.StrEnum):
    STORED = "stored"  # a new instance
    DUPLICATE = "duplicate"  # the same bytes were already archived; nothing written
    REPLACED = "replaced"  # the instance existed with other content; replaced atomically


class ArchivedFile(Protocol):
    """Where an instance is (or is about to be) archived, and what its bytes are."""

    relative_path: PurePosixPath
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ArchivedInstance:
    relative_path: PurePosixPath  # relative to the archive root, with "/" separators
    size_bytes: int
    sha256: str
    outcome: StoreOutcome
    previous_sha256: str | None = None  # set when outcome is REPLACED


def _check_uid(name: str, uid: str) -> str:
    if not _UID_PATTERN.fullmatch(uid) or set(uid) == {"."}:
        raise InvalidUidError(f"{name} {uid!r} is not a valid UID (digits and dots, at most 64)")
    return uid


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_of_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class Archive:
    """Stores received instances durably under ``<data_dir>/archive``.

    Parameters
    ----------
    data_dir:
        The service's data directory (``storage.data_dir``).
    fsync:
        fsync each file and its directory before :meth:`store` returns (``storage.fsync``).
    min_free_disk_mb:
        :meth:`store` refuses new instances while less space is free (``storage.min_free_disk_mb``).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        fsync: bool = True,
        min_free_disk_mb: int = 0,
    ) -> None:
        self.root = Path(data_dir) / "archive"
        self.fsync = fsync
        self.min_free_disk_mb = min_free_disk_mb
        self.incoming = self.root / _INCOMING
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._remove_stale_incoming()
        # Temporary names unique to this process: its identity, a random tag and a counter
        # (next() on itertools.count is atomic, so parallel associations never collide).
        self._temp_prefix = f"{os.getpid()}.{_process_start(os.getpid())}-{os.urandom(4).hex()}"
        self._temp_counter = itertools.count()

    def relative_path(
        self, study_uid: str, series_uid: str, sop_instance_uid: str
    ) -> PurePosixPath:
        return PurePosixPath(
            _check_uid("StudyInstanceUID", study_uid),
            _check_uid("SeriesInstanceUID", series_uid),
            _check_uid("SOPInstanceUID", sop_instance_uid) + ".dcm",
        )

    def path_of(self, relative_path: PurePosixPath | str) -> Path:
        return self.root / PurePosixPath(relative_path)

    def free_disk_mb(self) -> float:
        return shutil.disk_usage(self.root).free / _BYTES_PER_MB

    def check_free_space(self) -> None:
        """Raise :class:`OutOfSpaceError` when free space is below the watermark."""
        free_mb = self.free_disk_mb()
        if free_mb < self.min_free_disk_mb:
            raise OutOfSpaceError(
                f"{free_mb:.0f} MB free < storage.min_free_disk_mb={self.min_free_disk_mb} "
                f"at {self.root}; free disk space or lower the watermark"
            )

    def store(
        self, study_uid: str, series_uid: str, sop_instance_uid: str, parts: Sequence[bytes]
    ) -> ArchivedInstance:
        """Archive one instance whose file content is the concatenation of ``parts``.

        Idempotent: identical content already archived is left alone (``DUPLICATE``); other
        content replaces the old file atomically (``REPLACED``).
        """
        pending = self.begin(parts)
        try:
            return pending.place(study_uid, series_uid, sop_instance_uid).finish()
        except BaseException:
            pending.discard()
            raise

    def begin(self, parts: Sequence[bytes]) -> PendingInstance:
        """Prepare an instance for archiving; see :class:`PendingInstance`.

        Refuses (:class:`OutOfSpaceError`) below the disk watermark, before writing anything.
        """
        self.check_free_space()
        return PendingInstance(self, parts)

    def adopt(self, spooled: SpooledFile) -> PendingInstance:
        """Archive a file already written in :attr:`incoming` (a received data set)."""
        return PendingInstance(self, (), spooled)

    def new_temp_name(self) -> str:
        """A file name in :attr:`incoming`, unique to this process, removed if it crashes."""
        return f"{self._temp_prefix}-{next(self._temp_counter)}{_TEMP_SUFFIX}"

    def remove_superseded(
        self, relative_path: PurePosixPath | str, current: ArchivedInstance
    ) -> None:
        """Delete an instance's older copy once ``current`` (its new place) is recorded.

        A re-send under other study or series UIDs leaves the old file at the old path; left
        there it could be taken for the instance when the index is rebuilt.
        """
        old = self.root / PurePosixPath(relative_path)
        if PurePosixPath(relative_path) == current.relative_path:
            return
        try:
            old.unlink()
            if self.fsync:
                _fsync_directory(old.parent)
        except FileNotFoundError:
            return
        except OSError as exc:  # harmless to keep: the index and the newer mtime name the new one
            LOGGER.warning("cannot remove the superseded copy %s: %s", old, exc)
            return
        LOGGER.info("removed %s: the instance is now %s", relative_path, current.relative_path)

    def _remove_stale_incoming(self) -> None:
        # Leftovers of a crash: never acknowledged, so the sender has (or will) send them again.
        stale_before = time.time() - _STALE_INCOMING_S
        for temp in self.incoming.iterdir():
            with contextlib.suppress(OSError):
                owner = _TEMP_OWNER.match(temp.name)
                orphan = owner is not None and not _process_alive(int(owner[1]), int(owner[2]))
                if orphan or temp.stat().st_mtime < stale_before:
                    temp.unlink()

    def _make_directories(self, directory: Path) -> None:
        # A directory created here is durable only once its parent's entry is fsynced too.
        missing: list[Path] = []
        probe = directory
        while not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue  # another association created it at the same time
            except OSError as exc:
                raise self._error_for(exc, path) from exc
            if self.fsync:
                _fsync_directory(path.parent)

    @staticmethod
    def _error_for(exc: OSError, path: Path) -> ArchiveError:
        if exc.errno in _NO_SPACE_ERRNOS:
            return OutOfSpaceError(f"disk full while writing {path}: {exc.strerror}")
        return ArchiveError(f"cannot write {path}: {exc}")


class SpooledFile(Protocol):
    """A received data set already written to a file in the archive's ``.incoming``."""

    @property
    def path(self) -> Path: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def sha256(self) -> str: ...

    def fsync(self) -> None: ...


def _process_start(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 where /proc cannot tell)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command name


def _process_alive(pid: int, start: int) -> bool:
    if start == 0:
        return True  # no /proc: the age rule decides
    return _process_start(pid) == start


class PendingInstance:
    """An instance about to be archived: its digest and size are known, nothing is written yet.

    The caller checks the header meanwhile, then :meth:`place` names its final path and
    :meth:`finish` writes and fsyncs a temporary file, renames it into place and fsyncs the
    directory. Until then nothing is visible in the archive; :meth:`discard` drops it.

    Everything runs in the caller's thread: a background writer thread only adds hand-off
    latency on a small machine, and fsync releases the GIL, so parallel associations still
    overlap their disk waits.
    """

    def __init__(
        self, archive: Archive, parts: Sequence[bytes], spooled: SpooledFile | None = None
    ) -> None:
        self._archive = archive
        self._parts = tuple(parts)
        self._spooled = spooled
        if spooled is not None:
            self.sha256, self.size_bytes = spooled.sha256, spooled.size_bytes
        else:
            digest = hashlib.sha256()
            size_bytes = 0
            for part in self._parts:
                digest.update(part)
                size_bytes += len(part)
            self.sha256 = digest.hexdigest()
            self.size_bytes = size_bytes
        self.relative_path = PurePosixPath()
        self._sop_instance_uid = ""
        self._result: ArchivedInstance | None = None

    def place(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> PendingInstance:
        self.relative_path = self._archive.relative_path(study_uid, series_uid, sop_instance_uid)
        self._sop_instance_uid = sop_instance_uid
        return self

    def finish(self) -> ArchivedInstance:
        """Make the instance durable at its place (idempotent); raises :class:`ArchiveError`."""
        if self._result is not None:
            return self._result
        if not self.relative_path.parts:
            raise ArchiveError("place() the instance before finishing it")
        archive = self._archive
        target = archive.root / self.relative_path
        relative, size_bytes, sha256 = self.relative_path, self.size_bytes, self.sha256
        previous_sha256: str | None = None
        try:
            if target.exists():
                previous_sha256 = _sha256_of_file(target)
                if previous_sha256 == sha256:  # an identical re-send: nothing to write
                    # ...but its mtime says when it was last acknowledged (index rebuilds).
                    os.utime(target)
                    self._result = ArchivedInstance(
                        relative, size_bytes, sha256, StoreOutcome.DUPLICATE
                    )
                    self._parts = ()
                    return self._result
        except OSError as exc:
            raise archive._error_for(exc, target) from exc
        temp = self._spooled_temp() if self._spooled is not None else self._write_temp()
        try:
            archive._make_directories(target.parent)
            os.replace(temp, target)
            if archive.fsync:
                _fsync_directory(target.parent)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise archive._error_for(exc, target) from exc
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self._parts = ()
        if previous_sha256 is None:
            self._result = ArchivedInstance(relative, size_bytes, sha256, StoreOutcome.STORED)
        else:
            LOGGER.warning(
                "instance %s re-sent with different content: replaced %s (sha256 %s -> %s)",
                self._sop_instance_uid,
                relative,
                previous_sha256,
                sha256,
            )
            self._result = ArchivedInstance(
                relative, size_bytes, sha256, StoreOutcome.REPLACED, previous_sha256
            )
        return self._result

    def discard(self) -> None:
        """Drop the unfinished instance (a refused instance leaves nothing behind)."""
        self._parts = ()

    def _spooled_temp(self) -> Path:
        assert self._spooled is not None
        try:
            if self._archive.fsync:
                self._spooled.fsync()
        except OSError as exc:
            raise self._archive._error_for(exc, self._spooled.path) from exc
        return self._spooled.path

    def _write_temp(self) -> Path:
        archive = self._archive
        temp = archive.incoming / archive.new_temp_name()
        try:
            # O_EXCL on a name unique to this process: cheaper than mkstemp's random probing.
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise archive._error_for(exc, temp) from exc
        try:
            try:
                os.fchmod(fd, 0o644)  # whatever the umask: archive files are read by workers
                for part in self._parts:
                    view = memoryview(part)
                    while view:  # a write may be short
                        view = view[os.write(fd, view) :]
                if archive.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise archive._error_for(exc, temp) from exc
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp
