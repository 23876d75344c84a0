"""Received C-STORE data sets stream to a file as they arrive, never into memory.

pynetdicom's ``STORE_RECV_CHUNKED_DATASET`` writes each received data set, fragment by
fragment, to a ``NamedTemporaryFile`` (preamble, its File Meta Information, then the data set
bytes) and hands the handler its path. For associations of an AE that carries
:class:`SpoolSettings` (the listener's), that temporary file is a :class:`ReceiveSpool`
instead:

- it lies in the archive's ``.incoming`` folder, so the finished file is renamed into the
  archive (same file system) rather than copied;
- it hashes the bytes as they are written, so the archive never reads them back;
- it stops writing once the data set exceeds the size limit or the disk is below its
  watermark (the rest of the transfer is read off the socket and dropped), so a sender can
  neither fill the memory nor the disk; the handler then refuses the request;
- it adds the calling AE title to the File Meta Information (Source Application Entity Title).

Memory per association is bounded by :data:`BUFFER_BYTES`, whatever the sender sends. The
File Meta Information is encoded here directly, as the listener did before streaming: building
it as a pydicom Dataset (pynetdicom's way) cost ~0.7 ms per instance.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
)
from pynetdicom import dimse_messages as pynetdicom_messages

__all__ = ["ReceiveSpool", "SpoolRefusal", "SpoolSettings", "abandon", "install", "take"]

BUFFER_BYTES = 1 << 20  # written to the file in pieces of about this size
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_GROUP_LENGTH_ELEMENT = struct.pack("<HH2sH", 0x0002, 0x0000, b"UL", 4)


class SpoolRefusal(Exception):
    """Why a spooled data set was not kept (the handler answers with a failure status)."""


class TooLargeError(SpoolRefusal):
    pass


class NoSpaceError(SpoolRefusal):
    pass


@dataclass(frozen=True)
class SpoolSettings:
    """Where and how much an AE's associations may spool."""

    directory: Path
    max_data_set_bytes: int
    check_space: Callable[[], None]  # raises when the disk is below its watermark
    new_name: Callable[[], str]  # a temporary file name unique to this process


class ReceiveSpool:
    """The file pynetdicom writes one received data set to (its ``NamedTemporaryFile``)."""

    def __init__(self, settings: SpoolSettings, calling_ae_title: str, owner: int) -> None:
        self.path = settings.directory / settings.new_name()
        self.name = str(self.path)  # what pynetdicom opens and unlinks
        self.file = self  # pynetdicom flushes ``.file``
        self.owner = owner  # the association's id, to clean up after an abort
        self.refusal: SpoolRefusal | None = None
        self.data_offset = 0  # where the data set starts in the file
        self.data_set_bytes = 0
        self.size_bytes = 0
        self._limit = settings.max_data_set_bytes
        self._calling_ae_title = calling_ae_title
        self._digest = hashlib.sha256()
        self._buffer = bytearray()
        self._fd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
        )
        os.fchmod(self._fd, 0o644)  # whatever the umask: archive files are read by workers
        try:
            settings.check_space()
        except Exception as exc:  # below the watermark: take nothing
            self._refuse(NoSpaceError(str(exc)))

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def write_header(self, meta: RequestMeta) -> None:
        """Preamble and File Meta Information, encoded directly (see :func:`_file_meta`)."""
        header = _file_meta(meta, self._calling_ae_title)
        self.data_offset = len(header)
        self._append(header)

    def write(self, data: bytes) -> int:
        """pynetdicom writes the preamble and "DICM" (both part of :meth:`write_header`), its
        File Meta Information (routed to :meth:`write_header`), then the data set fragments."""
        if self.data_offset == 0:
            return len(data)
        self.data_set_bytes += len(data)
        if self.data_set_bytes > self._limit and self.refusal is None:
            self._refuse(
                TooLargeError(f"data set larger than {self._limit / 2**20:.0f} MB, the limit")
            )
        self._append(data)
        return len(data)

    def flush(self) -> None:
        """Writes go straight to the file descriptor: nothing is buffered."""

    def close(self) -> None:
        if self._fd is not None:
            try:
                self._drain()
            finally:
                os.close(self._fd)
                self._fd = None

    def fsync(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _append(self, data: bytes) -> None:
        if self.refusal is not None or self._fd is None:
            return  # read off the socket, dropped
        self._digest.update(data)
        self.size_bytes += len(data)
        self._buffer += data
        if len(self._buffer) >= BUFFER_BYTES:
            self._drain()

    def _drain(self) -> None:
        if self.refusal is not None or self._fd is None or not self._buffer:
            return
        try:
            view = memoryview(self._buffer)
            while view:  # a write may be short
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            if exc.errno not in _NO_SPACE_ERRNOS:
                raise
            self._refuse(NoSpaceError(f"disk full while receiving: {exc.strerror}"))
        finally:
            del view
            self._buffer.clear()

    def _refuse(self, refusal: SpoolRefusal) -> None:
        self.refusal = refusal
        self._buffer = bytearray()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # give the space back now


@dataclass(frozen=True)
class RequestMeta:
    """What the File Meta Information of a received data set says (from the C-STORE request)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def _file_meta(meta: RequestMeta, calling_ae_title: str) -> bytes:
    """Preamble and File Meta Information (PS3.10 7.1), explicit VR little endian."""
    elements = b"".join(
        (
            _META_VERSION,
            _meta_element(0x0002, b"UI", _uid_value(meta.sop_class_uid)),
            _meta_element(0x0003, b"UI", _uid_value(meta.sop_instance_uid)),
            _meta_element(0x0010, b"UI", _uid_value(meta.transfer_syntax)),
            _META_IMPLEMENTATION,
        )
    )
    title = calling_ae_title.strip().encode("ascii", "replace")[:16]
    if title:
        elements += _meta_element(0x0016, b"AE", title + b" " * (len(title) % 2))
    return (
        b"\x00" * 128
        + b"DICM"
        + _GROUP_LENGTH_ELEMENT
        + struct.pack("<L", len(elements))
        + elements
    )


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element with a 2-byte length (every VR used here but OB)."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid_value(value: object) -> bytes:
    encoded = str(value).encode("ascii", "replace")
    return encoded + b"\x00" if len(encoded) % 2 else encoded


# (0002,0001) File Meta Information Version 00\01 (OB: reserved bytes, 4-byte length).
_META_VERSION = struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
_META_IMPLEMENTATION = _meta_element(
    0x0012, b"UI", _uid_value(PYNETDICOM_IMPLEMENTATION_UID)
) + _meta_element(
    0x0013,
    b"SH",
    PYNETDICOM_IMPLEMENTATION_VERSION.encode()
    + b" " * (len(PYNETDICOM_IMPLEMENTATION_VERSION) % 2),
)


# -- the registry pynetdicom's handler thread takes spools from -------------------------------

_spools: dict[str, ReceiveSpool] = {}
_lock = threading.Lock()
_original_factory: Callable[..., Any] = tempfile.NamedTemporaryFile
_original_create_meta: Callable[..., Any] = pynetdicom_messages.create_file_meta
_original_write_meta: Callable[..., Any] = pynetdicom_messages.write_file_meta_info


def take(path: os.PathLike[str] | str) -> ReceiveSpool | None:
    """The spool pynetdicom wrote the request's data set to, now the caller's to finish."""
    with _lock:
        spool = _spools.pop(os.fspath(path), None)
    if spool is not None:
        spool.close()
    return spool


def abandon(owner: int) -> None:
    """Delete the spools of an association that ended mid-transfer (pynetdicom leaves them)."""
    with _lock:
        mine = [key for key, spool in _spools.items() if spool.owner == owner]
        spools = [_spools.pop(key) for key in mine]
    for spool in spools:
        spool.close()
        spool.path.unlink(missing_ok=True)


def _spooling_association() -> tuple[Any, SpoolSettings] | None:
    """The association whose DUL thread this is, if its AE spools (runs in that thread)."""
    association = getattr(threading.current_thread(), "assoc", None)
    settings = getattr(getattr(association, "ae", None), "receive_spool", None)
    if association is None or not isinstance(settings, SpoolSettings):
        return None  # another AE of this process: pynetdicom's way
    return association, settings


def _spool_factory(*args: Any, **kwargs: Any) -> Any:
    """Stands in for ``NamedTemporaryFile`` inside ``pynetdicom.dimse_messages``.

    Runs in the association's DUL thread when a C-STORE request's data set begins.
    """
    spooling = _spooling_association()
    if spooling is None:
        return _original_factory(*args, **kwargs)
    association, settings = spooling
    spool = ReceiveSpool(settings, association.requestor.ae_title, id(association))
    with _lock:
        _spools[spool.name] = spool
    return spool


def _create_file_meta(**kwargs: Any) -> Any:
    """Stands in for pynetdicom's ``create_file_meta``: no pydicom Dataset for our spools."""
    if _spooling_association() is None:
        return _original_create_meta(**kwargs)
    return RequestMeta(
        str(kwargs["sop_class_uid"]),
        str(kwargs["sop_instance_uid"]),
        str(kwargs["transfer_syntax"]),
    )


def _write_file_meta_info(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(fp, ReceiveSpool) and isinstance(file_meta, RequestMeta):
        fp.write_header(file_meta)
        return
    if isinstance(file_meta, RequestMeta):  # defensive: never hand pydicom our stand-in
        file_meta = _original_create_meta(
            sop_class_uid=file_meta.sop_class_uid,
            sop_instance_uid=file_meta.sop_instance_uid,
            transfer_syntax=file_meta.transfer_syntax,
        )
    _original_write_meta(fp, file_meta, *args, **kwargs)


def install() -> None:
    """Make pynetdicom stream received data sets to files (idempotent, process-wide).

    Other AEs of the process keep working: their handlers read ``event.dataset`` from
    pynetdicom's own temporary file instead of memory.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    pynetdicom_messages.NamedTemporaryFile = _spool_factory  # type: ignore[assignment]
    pynetdicom_messages.create_file_meta = _create_file_meta
    pynetdicom_messages.write_file_meta_info = _write_file_meta_info
