"""The archive writes instances atomically, idempotently and refuses below the disk watermark."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pydicom
import pytest

from lesionwatch.dicom_io.archive import (
    Archive,
    ArchiveError,
    InvalidUidError,
    OutOfSpaceError,
    StoreOutcome,
)

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


@pytest.fixture
def ge_file_bytes(ge_t1_dir: Path) -> bytes:
    return sorted(ge_t1_dir.iterdir())[0].read_bytes()


def _leftover_temp_files(archive: Archive) -> list[Path]:
    return [path for path in archive.root.rglob("*") if path.name.endswith(".tmp")]


def test_store_writes_exact_bytes_at_uid_layout(tmp_path: Path, ge_file_bytes: bytes) -> None:
    archive = Archive(tmp_path, fsync=True)
    head, tail = ge_file_bytes[:1000], ge_file_bytes[1000:]

    stored = archive.store(STUDY, SERIES, SOP, (head, tail))

    assert stored.outcome is StoreOutcome.STORED
    assert str(stored.relative_path) == f"{STUDY}/{SERIES}/{SOP}.dcm"
    path = tmp_path / "archive" / STUDY / SERIES / f"{SOP}.dcm"
    assert path.read_bytes() == ge_file_bytes
    assert stored.sha256 == hashlib.sha256(ge_file_bytes).hexdigest()
    assert stored.size_bytes == len(ge_file_bytes)
    assert pydicom.dcmread(path).Rows > 0
    assert not _leftover_temp_files(archive)


def test_identical_resend_is_a_duplicate_and_changed_content_replaces(
    tmp_path: Path, ge_file_bytes: bytes
) -> None:
    archive = Archive(tmp_path, fsync=False)
    first = archive.store(STUDY, SERIES, SOP, (ge_file_bytes,))
    path = archive.path_of(first.relative_path)
    mtime_ns = path.stat().st_mtime_ns

    os.utime(path, ns=(mtime_ns - 10**9, mtime_ns - 10**9))
    again = archive.store(STUDY, SERIES, SOP, (ge_file_bytes,))
    assert again.outcome is StoreOutcome.DUPLICATE
    assert path.read_bytes() == ge_file_bytes
    # Not rewritten, but its mtime says when it was last acknowledged (index rebuilds).
    assert path.stat().st_mtime_ns >= mtime_ns

    changed = ge_file_bytes[:-2] + b"\x01\x02"
    replaced = archive.store(STUDY, SERIES, SOP, (changed,))
    assert replaced.outcome is StoreOutcome.REPLACED
    assert replaced.previous_sha256 == first.sha256
    assert path.read_bytes() == changed
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_watermark_refuses_before_writing(tmp_path: Path, ge_file_bytes: bytes) -> None:
    archive = Archive(tmp_path, min_free_disk_mb=10**9)
    with pytest.raises(OutOfSpaceError, match="min_free_disk_mb"):
        archive.store(STUDY, SERIES, SOP, (ge_file_bytes,))
    assert not [path for path in archive.root.rglob("*") if path.is_file()]


def test_disk_full_during_write_removes_temp_and_keeps_accepted_file(
    tmp_path: Path, ge_file_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = Archive(tmp_path)
    accepted = archive.store(STUDY, SERIES, SOP, (ge_file_bytes,))

    real_fsync = os.fsync

    def full_disk_fsync(fd: int) -> None:
        # The kernel reports ENOSPC for delayed allocation at fsync time; simulate exactly that.
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_fsync)
    with pytest.raises(OutOfSpaceError, match="disk full"):
        archive.store(STUDY, SERIES, "1.2.3.4.6", (ge_file_bytes,))
    with pytest.raises(OutOfSpaceError):
        archive.store(STUDY, SERIES, SOP, (b"other content",))

    assert not _leftover_temp_files(archive)
    assert not archive.path_of(f"{STUDY}/{SERIES}/1.2.3.4.6.dcm").exists()
    assert archive.path_of(accepted.relative_path).read_bytes() == ge_file_bytes


def test_other_write_errors_are_archive_errors(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    (archive.root / STUDY).write_bytes(b"a file where the study directory belongs")
    with pytest.raises(ArchiveError, match="cannot write"):
        archive.store(STUDY, SERIES, SOP, (b"data",))


@pytest.mark.parametrize("uid", ["..", "1.2/../3", "", "1.2.3\x00", "a" * 65])
def test_uids_that_could_escape_the_archive_are_refused(tmp_path: Path, uid: str) -> None:
    archive = Archive(tmp_path)
    with pytest.raises(InvalidUidError, match="not a valid UID"):
        archive.store(uid, SERIES, SOP, (b"data",))


def test_pending_instance_is_invisible_until_finished_and_discard_leaves_nothing(
    tmp_path: Path, ge_file_bytes: bytes
) -> None:
    archive = Archive(tmp_path)
    kept = archive.store(STUDY, SERIES, SOP, (ge_file_bytes,))

    # A re-send that fails its checks must not touch the archived file.
    refused = archive.begin((b"garbage that will be refused",)).place(STUDY, SERIES, SOP)
    refused.discard()
    assert archive.path_of(kept.relative_path).read_bytes() == ge_file_bytes

    pending = archive.begin((ge_file_bytes[:500], ge_file_bytes[500:]))
    pending.place(STUDY, SERIES, "1.2.3.4.7")
    assert pending.sha256 == hashlib.sha256(ge_file_bytes).hexdigest()
    assert not archive.path_of(pending.relative_path).exists()
    first = pending.finish()
    assert pending.finish() is first  # idempotent: a retried transaction may call it again
    pending.discard()  # no-op once finished
    assert archive.path_of(first.relative_path).read_bytes() == ge_file_bytes
    assert not _leftover_temp_files(archive)


def test_partial_files_of_a_process_that_is_gone_are_removed_at_start(tmp_path: Path) -> None:
    archive = Archive(tmp_path, fsync=False)
    mine = archive.incoming / archive.new_temp_name()
    mine.write_bytes(b"in progress")
    dead = archive.incoming / "999999999.12345-abcd-0.tmp"  # no such process
    dead.write_bytes(b"partial")
    reused_pid = archive.incoming / f"{os.getpid()}.1-abcd-0.tmp"  # this pid, another start
    reused_pid.write_bytes(b"partial")
    Archive(tmp_path, fsync=False)
    assert mine.exists()  # a live process's write in progress is left alone
    assert not dead.exists() and not reused_pid.exists()
