"""The DICOM listener: C-ECHO and C-STORE SCP that archives durably and records every instance.

A C-STORE success is returned only after the instance file is fsynced and renamed into the
archive (and its directory fsynced) and then its database row is committed; with SQLite the
commit is a WAL commit without fsync, and the archive makes the index recoverable after an OS
crash or power loss (:mod:`lesionwatch.service.reconcile`). A :class:`Recorder` may defer the
row while the database is unavailable: the durable file is then answered with success.
Anything wrong with one request becomes a failure status with an Error Comment for the sender;
the listener keeps serving.

The per-instance path is kept lean (it runs for every image of every study): the header is
parsed from the received bytes in place, the File Meta Information is encoded directly, the
row is written with cached Core statements, and pynetdicom's DUL reactor polls its socket
faster while PDUs flow (:class:`_BusyPollingDUL`).
"""

from __future__ import annotations

import enum
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from pydicom import Dataset, uid
from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    evt,
)
from pynetdicom import association as pynetdicom_association
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import GENERAL_STATUS, STATUS_FAILURE, STORAGE_SERVICE_CLASS_STATUS, Status
from pynetdicom.timer import Timer
from pynetdicom.transport import ThreadedAssociationServer

from lesionwatch.config.schema import ListenerConfig, StorageConfig, TlsConfig

from . import listener_guards, receive_spool
from .access_control import CallerPolicy
from .archive import (
    Archive,
    ArchivedInstance,
    ArchiveError,
    InvalidUidError,
    OutOfSpaceError,
)
from .received_header import DataSetTooLargeError, UnreadableDataSetError, read_received_header

if TYPE_CHECKING:
    from lesionwatch.service.ingest import RecordResult

__all__ = [
    "Recorder",
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

_BUSY_POLL_S = 0.0002
_IDLE_POLL_S = 0.001  # pynetdicom's own delay
_BUSY_WINDOW_S = 0.5
_SUCCESS = int(StoreStatus.SUCCESS)  # a bare status: no response Dataset to build per instance
_MAX_ERROR_COMMENT = 64  # Error Comment (0000,0902) is LO


class _InvalidInstanceError(Exception):
    """The received data set cannot be accepted; carries the status to answer with."""

    def __init__(self, status: StoreStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _TooLargeError(Exception):
    """The data set exceeds listener.max_instance_mb (after inflation)."""


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


class _BusyPollingDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, polling its socket every 0.2 ms while PDUs flow.

    The reactor sleeps ``_run_loop_delay`` (1 ms) whenever a loop found nothing to do, twice
    per C-STORE (waiting for the request, then for our response to send), and the association
    reactor sleeps 1 ms before looking for the decoded request (:class:`_ReactorClock`):
    ~1.5 ms of latency per instance, more than the database work. Polling faster only within
    :data:`_BUSY_WINDOW_S` of the last received PDU keeps an idle association at 1 ms, and
    only while it is the listener's one association: with several, their work overlaps the
    waits and the CPU (2 cores, one GIL) is better spent on it than on polling.
    """

    _open_associations: Sized  # the listener's established associations

    @property  # type: ignore[override]
    def _run_loop_delay(self) -> float:
        last_pdu_s = self._idle_timer._start_time  # restarted on every received PDU
        if (
            last_pdu_s is not None
            and time.time() - last_pdu_s < _BUSY_WINDOW_S
            and len(self._open_associations) <= 1
        ):
            return _BUSY_POLL_S
        return _IDLE_POLL_S

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        pass  # DULServiceProvider.__init__ sets its constant; the property decides

    @classmethod
    def adopt(cls, dul: DULServiceProvider, open_associations: Sized) -> None:
        """Switch a running reactor to this polling (a no-op if pynetdicom changed)."""
        if type(dul) is DULServiceProvider and isinstance(getattr(dul, "_idle_timer", None), Timer):
            dul._open_associations = open_associations  # type: ignore[attr-defined]
            dul.__class__ = cls


class _ReactorClock:
    """Stands in for ``time`` inside ``pynetdicom.association``.

    The association reactor sleeps a fixed 1 ms before each look for a decoded request: in the
    reactor thread of an association whose DUL polls busily (ours, see
    :class:`_BusyPollingDUL`) that sleep follows the same busy/idle delay. Every other sleep,
    and every other thread, is untouched.
    """

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == _IDLE_POLL_S:
            dul = getattr(threading.current_thread(), "dul", None)
            if isinstance(dul, _BusyPollingDUL):
                seconds = dul._run_loop_delay
        time.sleep(seconds)

    @classmethod
    def install(cls) -> None:
        """Idempotent; leaves a module that someone else already changed alone."""
        if pynetdicom_association.time is time:
            pynetdicom_association.time = cls()  # type: ignore[assignment]


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


class Recorder(Protocol):
    """Records an archived instance in the database (``service.ingest.InstanceRecorder``).

    ``None``: recording was deferred (``service.record_backlog.BufferedRecorder`` while the
    database is unavailable); the instance is durable in the archive and the recorder reports
    it itself once recorded.
    """

    def record(
        self,
        dataset: Dataset,
        archived: ArchivedInstance,
        *,
        transfer_syntax_uid: str,
        calling_ae_title: str = "",
    ) -> RecordResult | None: ...


class StoreSCP:
    """LesionWatch's C-STORE/C-ECHO listener.

    Parameters
    ----------
    listener, storage:
        Configuration sections.
    recorder:
        Records each archived instance in the database (:class:`Recorder`).
    on_recorded:
        Called after an instance is archived and recorded (e.g. to start a prior lookup on a
        new study), not when the recorder deferred it; its exceptions are logged and never
        change the C-STORE status.
    on_outcome:
        Called with "stored" or "refused" for every C-STORE request (metrics).
    """

    def __init__(
        self,
        listener: ListenerConfig,
        storage: StorageConfig,
        recorder: Recorder,
        on_recorded: Callable[[RecordResult], None] | None = None,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self.listener = listener
        self.on_outcome = on_outcome
        self.archive = Archive(
            storage.data_dir,
            fsync=storage.fsync,
            min_free_disk_mb=storage.min_free_disk_mb,
        )
        self.max_instance_bytes = listener.max_instance_mb * 2**20
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
        ae.guard_listener = True  # type: ignore[attr-defined]  # see listener_guards
        # Received data sets stream to the archive's incoming folder (receive_spool).
        ae.receive_spool = receive_spool.SpoolSettings(  # type: ignore[attr-defined]
            directory=self.archive.incoming,
            max_data_set_bytes=self.max_instance_bytes,
            check_space=self.archive.check_free_space,
            new_name=self.archive.new_temp_name,
        )
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
        _ReactorClock.install()
        receive_spool.install()
        listener_guards.install()
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
        _BusyPollingDUL.adopt(event.assoc.dul, self._tallies)
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
        receive_spool.abandon(id(event.assoc))  # a data set cut off by an abort
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
        if self.on_outcome is not None:
            self.on_outcome("stored" if stored else "refused")
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

    def _handle_store(self, event: Event) -> Dataset | int:
        # The Error Comment goes to the peer: it says what is wrong with the request or what to
        # do, never server paths or exception text (those stay in the local log).
        try:
            self._store(event)
        except _InvalidInstanceError as exc:
            return self._failure(event, exc.status, str(exc))
        except _TooLargeError as exc:
            limit = self.listener.max_instance_mb
            return self._failure(
                event, StoreStatus.OUT_OF_RESOURCES, str(exc),
                f"instance over listener.max_instance_mb={limit}",
            )  # fmt: skip
        except InvalidUidError as exc:
            return self._failure(
                event, StoreStatus.CANNOT_UNDERSTAND, str(exc),
                "a Study, Series or SOP Instance UID is not a valid DICOM UID",
            )  # fmt: skip
        except OutOfSpaceError as exc:
            return self._failure(
                event, StoreStatus.OUT_OF_RESOURCES, str(exc),
                "out of disk space (below storage.min_free_disk_mb): retry later",
            )  # fmt: skip
        except ArchiveError as exc:
            return self._failure(
                event, StoreStatus.PROCESSING_FAILURE, str(exc),
                "cannot write the instance to the archive: retry later",
            )  # fmt: skip
        except Exception as exc:  # a handler bug must fail one request, not the listener
            LOGGER.exception("C-STORE from %s failed unexpectedly", self._peer(event))
            comment = "internal error: retry later"
            if type(exc).__name__ == "RecordError":  # service.ingest (dicom_io cannot import it)
                comment = "cannot record the instance (database error): retry later"
            return self._failure(event, StoreStatus.PROCESSING_FAILURE, str(exc), comment)
        self._count(event, stored=True)
        return _SUCCESS

    @staticmethod
    def _status(status: StoreStatus, comment: str = "") -> Dataset:
        response = Dataset()
        response.Status = int(status)
        if comment:
            response.ErrorComment = comment[:_MAX_ERROR_COMMENT]
        return response

    def _failure(
        self, event: Event, status: StoreStatus, reason: str, comment: str | None = None
    ) -> Dataset:
        """Log `reason` here; answer `status` with `comment` (default: the reason)."""
        self._count(event, stored=False)
        request = cast(C_STORE, event.request)
        LOGGER.warning(
            "C-STORE of %s from %s refused with %s: %s",
            request.AffectedSOPInstanceUID,
            self._peer(event),
            status.name,
            reason,
        )
        return self._status(status, reason if comment is None else comment)

    def _store(self, event: Event) -> None:
        request = cast(C_STORE, event.request)
        spool = receive_spool.take(event.dataset_path)
        if spool is None or not spool.data_offset:  # not written through our spool's hooks
            raise _InvalidInstanceError(StoreStatus.PROCESSING_FAILURE, "data set not spooled")
        if isinstance(spool.refusal, receive_spool.TooLargeError):
            raise _TooLargeError(str(spool.refusal))
        if spool.refusal is not None:
            raise OutOfSpaceError(str(spool.refusal))
        transfer_syntax = UID(str(event.context.transfer_syntax))
        try:
            dataset = read_received_header(
                spool.path, spool.data_offset, transfer_syntax, self.max_instance_bytes
            )
        except UnreadableDataSetError as exc:
            raise _InvalidInstanceError(StoreStatus.CANNOT_UNDERSTAND, str(exc)) from exc
        except DataSetTooLargeError as exc:
            raise _TooLargeError(str(exc)) from exc
        _check_identity(
            dataset, str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)
        )
        # The spool file is made durable (fsync, rename, directory fsync) and only then its
        # row committed, so a row never names a file that is not durable, and a file without a
        # row is re-indexed by reconciliation. pynetdicom unlinks what was not renamed.
        archived = (
            self.archive.adopt(spool)
            .place(
                str(dataset.StudyInstanceUID),
                str(dataset.SeriesInstanceUID),
                str(dataset.SOPInstanceUID),
            )
            .finish()
        )
        result = self.recorder.record(
            dataset,
            archived,
            transfer_syntax_uid=str(transfer_syntax),
            calling_ae_title=event.assoc.requestor.ae_title,
        )
        if result is None:
            return
        if result.superseded_path is not None:
            self.archive.remove_superseded(result.superseded_path, archived)
        if self.on_recorded is not None:
            try:
                self.on_recorded(result)
            except Exception:
                LOGGER.exception("on_recorded hook failed for %s", dataset.SOPInstanceUID)


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
