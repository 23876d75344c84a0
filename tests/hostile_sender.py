"""Puts hostile cases (``hostile_corpus.py``) on the wire and checks the archive after them.

:class:`RawSender` sends each case's ``payload`` unchanged: pynetdicom sends the bytes after a
Part 10 file's meta header as they are when ``STORE_SEND_CHUNKED_DATASET`` is on
(:func:`raw_sending` sets it, and lets invalid UIDs through pynetdicom's own checks).
:class:`ArchiveWatch` finds what a batch lost, replaced or left unreadable for dcmtk.
"""

from __future__ import annotations

import hashlib
import subprocess
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hostile_corpus import DROPPED, SUCCESS, HostileCase, batches
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import MaximumLengthNotification
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

__all__ = [
    "ArchiveWatch",
    "RawAssociation",
    "RawSender",
    "SendResult",
    "raw_sending",
    "unreadable",
    "write_part10",
]

_INCOMING = ".incoming"  # the listener's temporary files (archive/.incoming)


@contextmanager
def raw_sending() -> Iterator[None]:
    """pynetdicom sends files' data set bytes unchanged and lets invalid UIDs through.

    Only this thread's UIDs (and its own associations' responses) skip pynetdicom's check: a
    listener running in this process (``scp_harness.running_listener``) decodes requests in
    its own threads, where its own rules apply as in production.
    """
    chunked, ui_validator = _config.STORE_SEND_CHUNKED_DATASET, _config.VALIDATORS["UI"]
    sender = threading.current_thread()

    def validate_ui(value: str) -> tuple[bool, str]:
        thread = threading.current_thread()
        # The sending thread, and its associations' reactors (they decode the responses,
        # which echo the request's UIDs).
        association = getattr(thread, "assoc", None)
        if thread is sender or getattr(association, "is_requestor", False):
            return True, ""
        return ui_validator(value)

    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.VALIDATORS["UI"] = validate_ui
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        _config.VALIDATORS["UI"] = ui_validator


@dataclass(frozen=True, slots=True)
class SendResult:
    case: HostileCase
    status: int
    comment: str

    @property
    def ok(self) -> bool:
        return self.case.allows(self.status)


def write_part10(path: Path, case: HostileCase, chunks: Iterable[bytes] | None = None) -> Path:
    """Preamble and File Meta naming the request's UIDs and transfer syntax, then the payload."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(case.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(case.sop_instance_uid)
    meta.TransferSyntaxUID = UID(case.transfer_syntax)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    with path.open("wb") as handle:
        handle.write(buffer.getvalue())
        for chunk in [case.payload] if chunks is None else chunks:
            handle.write(chunk)
    return path


class RawSender:
    """C-STORE of hostile cases over real associations (inside :func:`raw_sending`).

    ``send_pdu_bytes`` caps the P-DATA PDUs we send (16 KiB, as storescu); ``None`` sends
    what the listener allows (with ``listener.maximum_pdu_size`` 0: a whole data set in one).
    """

    def __init__(
        self,
        port: int,
        workdir: Path,
        *,
        called_ae_title: str = "LESIONWATCH",
        send_pdu_bytes: int | None = 16384,
        dimse_timeout_s: float = 120.0,
    ) -> None:
        self.port = port
        self.workdir = workdir
        self.called_ae_title = called_ae_title
        self.send_pdu_bytes = send_pdu_bytes
        self.dimse_timeout_s = dimse_timeout_s
        workdir.mkdir(parents=True, exist_ok=True)

    def associate(self, cases: Sequence[HostileCase]) -> RawAssociation:
        ae = AE(ae_title="HOSTILE")
        ae.dimse_timeout = self.dimse_timeout_s
        ae.add_requested_context(Verification)
        contexts = {(case.sop_class_uid, case.transfer_syntax) for case in cases}
        contexts.add((str(MRImageStorage), str(ExplicitVRLittleEndian)))
        for sop_class, transfer_syntax in sorted(contexts):
            ae.add_requested_context(sop_class, transfer_syntax)
        return RawAssociation(self, ae)


class RawAssociation:
    """One association; re-established (and counted) if the listener drops it."""

    def __init__(self, sender: RawSender, ae: AE) -> None:
        self.sender = sender
        self.ae = ae
        self.drops = 0
        self._broken = False
        self._assoc = self._open()

    def _open(self) -> Association:
        assoc = self.ae.associate(
            "127.0.0.1", self.sender.port, ae_title=self.sender.called_ae_title
        )
        if not assoc.is_established:
            raise ConnectionError(f"association to 127.0.0.1:{self.sender.port} not established")
        limit = self.sender.send_pdu_bytes
        for item in assoc.acceptor.user_information:
            if isinstance(item, MaximumLengthNotification) and limit is not None:
                peer = item.maximum_length_received
                item.maximum_length_received = min(peer, limit) if peer else limit
        return assoc

    def _max_length_items(self) -> list[MaximumLengthNotification]:
        return [
            item
            for item in self._assoc.acceptor.user_information
            if isinstance(item, MaximumLengthNotification)
        ]

    def max_pdu_from_listener(self) -> int:
        """The maximum PDU length the listener advertised (0: unlimited)."""
        return int(self._max_length_items()[0].maximum_length_received or 0)

    def override_max_pdu(self, length: int) -> None:
        """Send PDUs of up to ``length`` bytes whatever the listener advertised."""
        for item in self._max_length_items():
            item.maximum_length_received = length

    def _ready(self) -> Association:
        if self._broken or not self._assoc.is_established:
            self.drops += 1
            self._assoc.abort()  # a no-op if the peer already did
            self._assoc = self._open()
            self._broken = False
        return self._assoc

    def store(self, case: HostileCase, chunks: Iterable[bytes] | None = None) -> SendResult:
        path = write_part10(self.sender.workdir / "request.dcm", case, chunks)
        try:
            response = self._ready().send_c_store(path)
        except (RuntimeError, OSError) as exc:
            self._broken = True
            return SendResult(case, DROPPED, f"{type(exc).__name__}: {exc}")
        finally:
            path.unlink()
        if "Status" not in response:
            self._broken = True  # the next request goes on a new association
            return SendResult(case, DROPPED, "no response (association aborted or timed out)")
        return SendResult(case, int(response.Status), str(response.get("ErrorComment", "")))

    def echo(self) -> int:
        response = self._ready().send_c_echo()
        if "Status" not in response:
            self._broken = True
            return DROPPED
        return int(response.Status)

    def release(self) -> None:
        if self._assoc.is_established:
            self._assoc.release()

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


# -- checking the archive ----------------------------------------------------------------------


def unreadable(dcmdump: str, paths: Sequence[Path], *, chunk: int = 200) -> dict[Path, str]:
    """Files dcmtk cannot read (non-zero exit or an error line), with dcmdump's complaint."""
    failed: dict[Path, str] = {}
    for group in batches(paths, chunk):
        run = subprocess.run(
            [dcmdump, *map(str, group)], capture_output=True, text=True, errors="replace"
        )
        errors = [line for line in run.stderr.splitlines() if line.startswith(("E:", "F:"))]
        if run.returncode == 0 and not errors:
            continue
        if len(group) == 1:
            failed[group[0]] = "; ".join(errors) or f"dcmdump exit status {run.returncode}"
        else:  # find which ones
            failed |= unreadable(dcmdump, group, chunk=1)
    return failed


class ArchiveWatch:
    """What the archive held after the last batch, to find what a batch lost or replaced."""

    def __init__(self, root: Path, dcmdump: str | None) -> None:
        self.root = root
        self.dcmdump = dcmdump
        self._hashes: dict[tuple[int, int, int], str] = {}  # (inode, size, mtime) -> sha256
        self.files = self._scan()

    def _sha256(self, path: Path) -> str:
        stat = path.stat()
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            with path.open("rb") as handle:
                self._hashes[key] = hashlib.file_digest(handle, "sha256").hexdigest()
        return self._hashes[key]

    def _scan(self) -> dict[Path, str]:
        return {
            path.relative_to(self.root): self._sha256(path)
            for path in self.root.rglob("*")
            if path.is_file() and _INCOMING not in path.relative_to(self.root).parts
        }

    def check_batch(self, results: Sequence[SendResult]) -> list[str]:
        """Problems after a batch; the files it accepted are dcmdump-checked if dcmdump is set."""
        problems: list[str] = []
        accepted = [result for result in results if result.status == SUCCESS]
        resent = {r.case.sop_instance_uid for r in accepted if r.case.valid_resend}
        now = self._scan()
        for path, sha256 in self.files.items():
            if path.stem in resent:
                continue  # validly re-sent: may be replaced or moved
            if path not in now:
                problems.append(f"archive file lost: {path}")
            elif now[path] != sha256:
                problems.append(f"archive file replaced: {path}")
        new = [path for path in now if path not in self.files]
        if len(new) > len(accepted):
            problems.append(f"{len(new)} new archive files for {len(accepted)} accepted instances")
        latest = {result.case.sop_instance_uid: result for result in accepted}
        for result in latest.values():  # the last accepted copy of each instance is there
            if result.case.location is not None:
                study, series, instance = result.case.location
                if Path(study, series, f"{instance}.dcm") not in now:
                    problems.append(f"{result.case.name}: accepted but not in the archive")
        leftovers = sorted((self.root / _INCOMING).glob("*"))
        if leftovers:
            problems.append(f"{len(leftovers)} temporary files left in {_INCOMING}")
        if self.dcmdump is not None:  # every file this batch wrote: new or replaced
            written = [self.root / path for path, sha in now.items() if self.files.get(path) != sha]
            for path, reason in unreadable(self.dcmdump, written).items():
                problems.append(f"dcmdump cannot read {path.relative_to(self.root)}: {reason}")
        self.files = now
        return problems
