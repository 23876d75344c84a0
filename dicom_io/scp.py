"""The DICOM listener: C-ECHO and C-STORE SCP that archives durably and records every instance.

A C-STORE success is returned only after the instance file is fsynced and renamed into the
archive and its database row is committed. Anything wrong with one request becomes a failure
status with an Error Comment for the sender; the listener itself keeps serving.
"""

from __future__ import annotations

import enum
import logging
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, cast

from pydicom import Dataset, dcmread, uid
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import SequenceDelimiterTag
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import GENERAL_STATUS, STATUS_FAILURE, STORAGE_SERVICE_CLASS_STATUS, Status
from pynetdicom.transport import ThreadedAssociationServer

from lesionwatch.config.schema import ListenerConfig, StorageConfig, TlsConfig

from .access_control import CallerPolicy
from .archive import Archive, ArchiveError, OutOfSpaceError

if TYPE_CHECKING:
    from lesionwatch.service.ingest import InstanceRecorder, RecordResult

__all__ = [
    "STORAGE_SOP_CLASSES",
    "StoreSCP",
    "StoreStatus",
    "TRANSFER_SYNTAXES",
    "build_ssl_context",
]

LOGGER = logging.getLogger(__name__)


def _failure_code(table: dict[int, tuple[str, str]], description: str) -> int:
    """The first failure code pynetdicom's status table gives ``description``."""
    return min(
        code
        for code, (category, text) in table.items()
        if category == STATUS_FAILURE and text == description
    )


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses, named after pynetdicom's status tables (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = Status.SUCCESS
    OUT_OF_RESOURCES = _failure_code(STORAGE_SERVICE_CLASS_STATUS, "Refused: Out of Resources")
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = _failure_code(
        STORAGE_SERVICE_CLASS_STATUS, "Data Set Does Not Match SOP Class"
    )
    CANNOT_UNDERSTAND = _failure_code(STORAGE_SERVICE_CLASS_STATUS, "Cannot Understand")
    PROCESSING_FAILURE = _failure_code(GENERAL_STATUS, "Processing Failure")


# What a PACS forwards with an MR study: images, our own kinds of results, and companions.
STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    uid.MRImageStorage,
    uid.EnhancedMRImageStorage,
    uid.EnhancedMRColorImageStorage,
    uid.LegacyConvertedEnhancedMRImageStorage,
    uid.MRSpectroscopyStorage,
    uid.SegmentationStorage,
    uid.ParametricMapStorage,
    uid.BasicTextSRStorage,
    uid.EnhancedSRStorage,
    uid.ComprehensiveSRStorage,
    uid.Comprehensive3DSRStorage,
    uid.KeyObjectSelectionDocumentStorage,
    uid.SecondaryCaptureImageStorage,
    uid.MultiFrameSingleBitSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
    uid.GrayscaleSoftcopyPresentationStateStorage,
    uid.SpatialRegistrationStorage,
    uid.DeformableSpatialRegistrationStorage,
    uid.EncapsulatedPDFStorage,
    uid.RawDataStorage,
)

# Every transfer syntax pydicom knows (native, deflated, big endian, JPEG family, JPEG-LS,
# JPEG 2000, HTJ2K, RLE, ...): instances are stored as received, never transcoded.
TRANSFER_SYNTAXES: tuple[str, ...] = tuple(ALL_TRANSFER_SYNTAXES)

_PREAMBLE = b"\x00" * 128 + b"DICM"
_MAX_ERROR_COMMENT = 64  # Error Comment (0000,0902) is LO
_UNDEFINED_LENGTH = 0xFFFF_FFFF  # PS3.5 7.1.1: value length of an undefined-length element
_IMAGE_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class _InvalidInstanceError(Exception):
    """The received data set cannot be accepted; carries the status to answer with."""

    def __init__(self, status: StoreStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class _AssociationTally:
    stored: int = 0
    failed: int = 0


def build_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """Server-side TLS context; ``require_client_cert`` demands a client cert signed by ca_file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        raise ValueError("listener.tls.require_client_cert needs listener.tls.ca_file to verify")
    return context


class _PolicyAE(AE):
    """An AE whose calling-AE allow-list depends on the requesting host.

    pynetdicom checks ``require_calling_aet`` while negotiating, in the association's own
    thread, and rejects with "calling AE title not recognised"; answering per host here gives
    that standard A-ASSOCIATE-RJ for AE/host pairs not on the allow-list.
    """

    # Longer than any AE title (16), so it matches no caller: the host admits nobody.
    _NOBODY = ["<no AE admitted from this host>"]

    def __init__(self, ae_title: str, policy: CallerPolicy) -> None:
        super().__init__(ae_title=ae_title)
        self._policy = policy

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        assoc = threading.current_thread()
        if not isinstance(assoc, Association):
            return []
        allowed = self._policy.allowed_ae_titles(str(assoc.requestor.address))
        if allowed is None:
            return []
        return sorted(allowed) or self._NOBODY

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        raise AttributeError("the calling AE allow-list comes from listener.allowed_callers")


class StoreSCP:
    """LesionWatch's C-STORE/C-ECHO listener.

    Parameters
    ----------
    listener, storage:
        Configuration sections.
    recorder:
        Records each archived instance in the database (:class:`InstanceRecorder`).
    on_recorded:
        Called after an instance is archived and recorded (e.g. to start a prior lookup on a
        new study); its exceptions are logged and never change the C-STORE status.
    """

    def __init__(
        self,
        listener: ListenerConfig,
        storage: StorageConfig,
        recorder: InstanceRecorder,
        on_recorded: Callable[[RecordResult], None] | None = None,
    ) -> None:
        self.listener = listener
        self.archive = Archive(
            storage.data_dir,
            fsync=storage.fsync,
            min_free_disk_mb=storage.min_free_disk_mb,
            max_parallel_writes=listener.max_associations,
        )
        self.recorder = recorder
        self.on_recorded = on_recorded
        self.policy = CallerPolicy.from_config(listener)
        self._server: ThreadedAssociationServer | None = None
        self._tallies: dict[int, _AssociationTally] = {}
        self._tally_lock = threading.Lock()
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        listener = self.listener
        ae = _PolicyAE(listener.ae_title, self.policy)
        ae.require_called_aet = listener.require_called_ae_title
        ae.maximum_associations = listener.max_associations
        ae.acse_timeout = listener.acse_timeout_s
        ae.dimse_timeout = listener.dimse_timeout_s
        ae.network_timeout = listener.network_timeout_s
        ae.maximum_pdu_size = listener.maximum_pdu_size
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            return self.listener.port
        return int(self._server.server_address[1])

    def start(self) -> ThreadedAssociationServer:
        """Listen in background threads and return the server."""
        if self._server is not None:
            raise RuntimeError("the listener is already running")
        ssl_context = build_ssl_context(self.listener.tls) if self.listener.tls else None
        handlers = [
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        server = self.ae.start_server(
            (self.listener.host, self.listener.port),
            block=False,
            evt_handlers=handlers,  # type: ignore[arg-type]
            ssl_context=ssl_context,
        )
        assert server is not None  # block=False always returns the server
        self._server = server
        LOGGER.info(
            "DICOM listener %s on %s:%d%s",
            self.listener.ae_title,
            self.listener.host,
            self.port,
            " (TLS)" if ssl_context else "",
        )
        return server

    def stop(self) -> None:
        """Stop accepting, end open associations and close the socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        LOGGER.info("DICOM listener %s stopped", self.listener.ae_title)

    # -- association logging -------------------------------------------------------------

    @staticmethod
    def _peer(event: Event) -> str:
        requestor = event.assoc.requestor
        return f"{requestor.ae_title!r} from {requestor.address}:{requestor.port}"

    def _on_accepted(self, event: Event) -> None:
        with self._tally_lock:
            self._tallies[id(event.assoc)] = _AssociationTally()
        LOGGER.info(
            "association accepted: %s calling %r (%d presentation contexts accepted)",
            self._peer(event),
            event.assoc.acceptor.ae_title,
            len(event.assoc.accepted_contexts),
        )

    def _on_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        primitive = requestor.primitive
        called = primitive.called_ae_title if primitive is not None else ""
        reason = self.policy.rejection(requestor.ae_title, called, str(requestor.address))
        if reason is None:
            active = sum(1 for assoc in self.ae.active_associations if assoc.is_acceptor)
            limit = self.ae.maximum_associations
            reason = f"{active} associations open, listener.max_associations is {limit}"
        LOGGER.warning("association rejected: %s calling %r: %s", self._peer(event), called, reason)

    def _on_closed(self, event: Event) -> None:
        with self._tally_lock:
            tally = self._tallies.pop(id(event.assoc), None)
        if tally is None:
            return  # rejected before it was established; already logged
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        LOGGER.info(
            "association %s: %s; %d instances stored, %d failed",
            how,
            self._peer(event),
            tally.stored,
            tally.failed,
        )

    def _count(self, event: Event, stored: bool) -> None:
        with self._tally_lock:
            tally = self._tallies.get(id(event.assoc))
            if tally is not None:
                if stored:
                    tally.stored += 1
                else:
                    tally.failed += 1

    # -- DIMSE handlers ------------------------------------------------------------------

    @staticmethod
    def _handle_echo(event: Event) -> int:
        return int(Status.SUCCESS)

    def _handle_store(self, event: Event) -> Dataset:
        try:
            self._store(event)
        except _InvalidInstanceError as exc:
            return self._failure(event, exc.status, str(exc))
        except OutOfSpaceError as exc:
            return self._failure(event, StoreStatus.OUT_OF_RESOURCES, str(exc))
        except ArchiveError as exc:
            return self._failure(event, StoreStatus.PROCESSING_FAILURE, str(exc))
        except Exception as exc:  # a handler bug must fail one request, not the listener
            LOGGER.exception("C-STORE from %s failed unexpectedly", self._peer(event))
            return self._failure(event, StoreStatus.PROCESSING_FAILURE, f"internal error: {exc}")
        self._count(event, stored=True)
        return self._status(StoreStatus.SUCCESS)

    @staticmethod
    def _status(status: StoreStatus, comment: str = "") -> Dataset:
        response = Dataset()
        response.Status = int(status)
        if comment:
            response.ErrorComment = comment[:_MAX_ERROR_COMMENT]
        return response

    def _failure(self, event: Event, status: StoreStatus, reason: str) -> Dataset:
        self._count(event, stored=False)
        request = cast(C_STORE, event.request)
        LOGGER.warning(
            "C-STORE of %s from %s refused with %s: %s",
            request.AffectedSOPInstanceUID,
            self._peer(event),
            status.name,
            reason,
        )
        return self._status(status, reason)

    def _store(self, event: Event) -> None:
        request = cast(C_STORE, event.request)
        file_meta = event.file_meta
        file_meta.SourceApplicationEntityTitle = event.assoc.requestor.ae_title
        meta_buffer = DicomBytesIO()
        meta_buffer.write(_PREAMBLE)
        write_file_meta_info(meta_buffer, file_meta, enforce_standard=True)
        if request.DataSet is None:
            raise _InvalidInstanceError(StoreStatus.CANNOT_UNDERSTAND, "request has no data set")
        # The data set bytes exactly as the peer sent them: never decoded and re-encoded.
        parts = (meta_buffer.getvalue(), request.DataSet.getvalue())

        # Writing and fsyncing start now, in the background, while the header is checked and
        # the rows are prepared; the file is renamed into place only once it passed, and the
        # transaction commits only after that (a row never names a file that is not durable).
        pending = self.archive.begin(parts)  # refuses below the disk watermark
        try:
            dataset = _parse_header(parts, str(file_meta.TransferSyntaxUID))
            _check_identity(
                dataset, str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)
            )
            pending.place(
                str(dataset.StudyInstanceUID),
                str(dataset.SeriesInstanceUID),
                str(dataset.SOPInstanceUID),
            )
            result = self.recorder.record(
                dataset,
                pending,
                transfer_syntax_uid=str(file_meta.TransferSyntaxUID),
                calling_ae_title=event.assoc.requestor.ae_title,
                before_commit=pending.finish,
            )
        finally:
            pending.discard()  # no-op once finished
        if self.on_recorded is not None:
            try:
                self.on_recorded(result)
            except Exception:
                LOGGER.exception("on_recorded hook failed for %s", dataset.SOPInstanceUID)


def _parse_header(parts: tuple[bytes, bytes], transfer_syntax_uid: str) -> Dataset:
    """Parse the received file far enough to check it; pixel values are never decoded."""
    if not parts[1]:
        raise _InvalidInstanceError(StoreStatus.CANNOT_UNDERSTAND, "the data set is empty")
    try:
        dataset = dcmread(BytesIO(b"".join(parts)))
    except Exception as exc:
        raise _InvalidInstanceError(
            StoreStatus.CANNOT_UNDERSTAND, f"data set cannot be parsed: {exc}"
        ) from exc
    _check_complete(dataset, parts[1], UID(transfer_syntax_uid))
    return dataset


def _check_complete(dataset: Dataset, encoded: bytes, transfer_syntax: UID) -> None:
    """Catch truncated data sets: pydicom reads a short last element without complaint."""
    for element in dataset._dict.values():
        if (
            isinstance(element, RawDataElement)
            and element.length != _UNDEFINED_LENGTH
            and isinstance(element.value, bytes)
            and len(element.value) != element.length
        ):
            raise _InvalidInstanceError(
                StoreStatus.CANNOT_UNDERSTAND,
                f"data set truncated in {element.tag} ({len(element.value)} of "
                f"{element.length} bytes)",
            )
    if "Rows" not in dataset or "Columns" not in dataset:
        return
    present = [keyword for keyword in _IMAGE_PIXEL_KEYWORDS if keyword in dataset]
    if not present:
        raise _InvalidInstanceError(
            StoreStatus.CANNOT_UNDERSTAND, "image has Rows/Columns but no pixel data"
        )
    pixel_element = dataset._dict[tag_for_keyword(present[0])]  # type: ignore[index]
    if (
        isinstance(pixel_element, RawDataElement)
        and pixel_element.length == _UNDEFINED_LENGTH
        and transfer_syntax.is_encapsulated
        and not transfer_syntax.is_deflated
        and list(dataset.keys())[-1] == pixel_element.tag
    ):
        # Encapsulated pixel data that ends the data set must end with its delimiter item.
        delimiter = struct.pack("<HHL", SequenceDelimiterTag.group, SequenceDelimiterTag.element, 0)
        if not encoded.endswith(delimiter):
            raise _InvalidInstanceError(
                StoreStatus.CANNOT_UNDERSTAND,
                "encapsulated pixel data truncated (no sequence delimiter)",
            )


def _check_identity(dataset: Dataset, sop_class_uid: str, sop_instance_uid: str) -> None:
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(dataset.get(keyword, "")).strip():
            raise _InvalidInstanceError(StoreStatus.CANNOT_UNDERSTAND, f"data set has no {keyword}")
    if str(dataset.SOPInstanceUID) != sop_instance_uid:
        raise _InvalidInstanceError(
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOPInstanceUID {dataset.SOPInstanceUID} differs from the request's "
            f"{sop_instance_uid}",
        )
    if str(dataset.SOPClassUID) != sop_class_uid:
        raise _InvalidInstanceError(
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOPClassUID {dataset.SOPClassUID} differs from the request's {sop_class_uid}",
        )
