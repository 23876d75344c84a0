"""Sending results to a DICOM node: C-ECHO and batched C-STORE with classified outcomes.

Every failure is classified as *transient* (worth retrying later) or *permanent* (a retry of
the same bytes to the same node cannot succeed; an admin has to change something). The rules:

Association level
    - TCP connection refused, connect/ACSE timeout, host name not resolved, other socket
      errors, A-ABORT / A-P-ABORT from the peer, association rejected-transient: transient.
    - Association rejected-permanent (e.g. calling or called AE title not recognised): permanent.
    - TLS: certificate verification failure is permanent (wrong CA or host name); other
      handshake failures (peer closed during the handshake) are transient.
    - Association accepted but none of the proposed presentation contexts accepted: permanent.

Instance level (C-STORE response status, PS3.4 B.2.3 and PS3.7 C)
    - Success, and every Warning status (0xB000 coercion, 0xB006 elements discarded, 0xB007
      data set does not match SOP class, ...): stored.
    - Refused: Out of Resources (0xA7xx), Resource Limitation (0x0213), Processing Failure
      (0x0110, many archives use it for internal, often temporary errors), Duplicate
      Invocation (0x0210), no response at all (DIMSE timeout, association lost): transient.
    - Refused: SOP Class Not Supported (0x0122), Not Authorised (0x0124), Data Set Does Not
      Match SOP Class (0xA9xx), Cannot Understand (0xCxxx), Duplicate SOP Instance (0x0111,
      the archive refuses to replace), any other failure code of the general table: permanent.
      "Cannot understand" is deliberately permanent: it is a statement about the content of
      the data set, and resending identical bytes gets the identical answer.
    - An unknown status code (not in PS3.4/PS3.7): transient; the retry budget bounds it.
    - The file's (SOP class, transfer syntax) pair not accepted in negotiation: permanent.

Instances are sent exactly as stored: the presentation contexts proposed are the exact
(SOP class, transfer syntax) pairs of the files, one transfer syntax per context.
"""

from __future__ import annotations

import enum
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import (
    STATUS_FAILURE,
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from lesionwatch.config.schema import DestinationConfig

__all__ = [
    "MAX_PRESENTATION_CONTEXTS",
    "AssociateResult",
    "AssociationAttempt",
    "AssociationFailure",
    "AssociationFailureKind",
    "EchoResult",
    "Outcome",
    "RejectSource",
    "RejectUserReason",
    "StoreItem",
    "StoreResult",
    "StoreStatus",
    "associate",
    "classify_store_status",
    "echo",
    "store_files",
]

MAX_PRESENTATION_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context IDs 1..255


class Outcome(enum.StrEnum):
    SUCCESS = "success"
    WARNING = "warning"  # stored, with a warning status
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class StoreStatus(enum.IntEnum):
    """Named C-STORE status codes (pynetdicom's `Status` names only a few).

    Ranged codes (0xA7xx, 0xA9xx, 0xCxxx) are named by their first value; compare
    with `code & RANGE_MASK`, or `code & CANNOT_UNDERSTAND_MASK` for 0xCxxx.
    """

    SUCCESS = 0x0000
    WARNING_OPTIONAL_ATTRIBUTES = 0x0001
    WARNING_COERCION = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_DATA_SET_MISMATCH = 0xB007
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_SOP_CLASS = 0x0118
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORISED = 0x0124
    DUPLICATE_INVOCATION = 0x0210
    RESOURCE_LIMITATION = 0x0213
    OUT_OF_RESOURCES = 0xA700  # 0xA7xx
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # 0xA9xx
    CANNOT_UNDERSTAND = 0xC000  # 0xCxxx


RANGE_MASK = 0xFF00
CANNOT_UNDERSTAND_MASK = 0xF000

_TRANSIENT_STATUSES = {
    StoreStatus.PROCESSING_FAILURE,
    StoreStatus.DUPLICATE_INVOCATION,
    StoreStatus.RESOURCE_LIMITATION,
}


class AssociateResult(enum.IntEnum):
    """A-ASSOCIATE-RJ Result (PS3.8 9.3.4)."""

    ACCEPTED = 0
    REJECTED_PERMANENT = 1
    REJECTED_TRANSIENT = 2


class RejectSource(enum.IntEnum):
    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


class RejectUserReason(enum.IntEnum):
    """Reason/Diag. values when the source is the service user."""

    NO_REASON_GIVEN = 1
    APPLICATION_CONTEXT_NOT_SUPPORTED = 2
    CALLING_AE_TITLE_NOT_RECOGNISED = 3
    CALLED_AE_TITLE_NOT_RECOGNISED = 7


class AssociationFailureKind(enum.StrEnum):
    CONNECTION_REFUSED = "connection_refused"
    TIMEOUT = "timeout"
    HOST_NOT_FOUND = "host_not_found"
    NETWORK_ERROR = "network_error"
    TLS_CONFIG = "tls_config"  # our own certificate/key/CA files cannot be loaded
    TLS_CERTIFICATE = "tls_certificate"
    TLS_HANDSHAKE = "tls_handshake"
    REJECTED_PERMANENT = "rejected_permanent"
    REJECTED_TRANSIENT = "rejected_transient"
    ABORTED = "aborted"
    NO_ACCEPTED_CONTEXT = "no_accepted_context"


_PERMANENT_KINDS = {
    AssociationFailureKind.TLS_CONFIG,
    AssociationFailureKind.TLS_CERTIFICATE,
    AssociationFailureKind.REJECTED_PERMANENT,
    AssociationFailureKind.NO_ACCEPTED_CONTEXT,
}


@dataclass(frozen=True)
class AssociationFailure:
    kind: AssociationFailureKind
    reason: str
    # (result, source, reason/diagnostic) of an A-ASSOCIATE-RJ, when that is what happened
    rejection: tuple[int, int, int] | None = None

    @property
    def transient(self) -> bool:
        return self.kind not in _PERMANENT_KINDS


@dataclass
class AssociationAttempt:
    """Either an established association (release it when done) or why there is none."""

    association: Association | None
    failure: AssociationFailure | None


@dataclass(frozen=True)
class StoreItem:
    key: int  # caller's identifier (the delivery row id)
    path: Path


@dataclass(frozen=True)
class StoreResult:
    key: int
    outcome: Outcome
    status: int | None  # DIMSE status, None when the instance never got a response
    reason: str


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    status: int | None
    failure: AssociationFailure | None
    reason: str


def _uid_label(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def classify_store_status(code: int) -> tuple[Outcome, str]:
    """Outcome and a readable description of a C-STORE response status code."""
    description = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1] or "Success"
    label = f"0x{code:04X} {description}"
    category = code_to_category(code)
    if category == STATUS_SUCCESS:
        return Outcome.SUCCESS, label
    if category == STATUS_WARNING:
        return Outcome.WARNING, label
    if category != STATUS_FAILURE:
        return Outcome.TRANSIENT, f"0x{code:04X} unknown status code (treated as transient)"
    if code in _TRANSIENT_STATUSES or code & RANGE_MASK == StoreStatus.OUT_OF_RESOURCES:
        return Outcome.TRANSIENT, label
    return Outcome.PERMANENT, label


def _tls_args(dest: DestinationConfig) -> tuple[ssl.SSLContext, str] | None:
    if dest.tls is None:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(dest.tls.ca_file) if dest.tls.ca_file else None
    )
    context.check_hostname = dest.tls.check_hostname
    if dest.tls.cert_file is not None and dest.tls.key_file is not None:
        context.load_cert_chain(str(dest.tls.cert_file), str(dest.tls.key_file))
    return context, dest.host


def _probe_connect(
    dest: DestinationConfig, tls: tuple[ssl.SSLContext, str] | None
) -> OSError | None:
    """Repeat the TCP (and TLS) connect to learn why it failed: pynetdicom only logs the error."""
    try:
        with socket.create_connection((dest.host, dest.port), timeout=dest.timeout_s) as sock:
            if tls is not None:
                with tls[0].wrap_socket(sock, server_hostname=tls[1]):
                    pass
    except OSError as exc:
        return exc
    return None


def _connect_failure(dest: DestinationConfig, exc: OSError | None) -> AssociationFailure:
    where = f"{dest.host}:{dest.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return AssociationFailure(
            AssociationFailureKind.TLS_CERTIFICATE,
            f"TLS certificate of {where} not trusted: {exc.verify_message or exc}",
        )
    if isinstance(exc, ssl.SSLError):
        return AssociationFailure(
            AssociationFailureKind.TLS_HANDSHAKE, f"TLS handshake with {where} failed: {exc}"
        )
    if isinstance(exc, ConnectionRefusedError):
        return AssociationFailure(
            AssociationFailureKind.CONNECTION_REFUSED, f"connection to {where} refused"
        )
    if isinstance(exc, TimeoutError):
        return AssociationFailure(
            AssociationFailureKind.TIMEOUT,
            f"no TCP connection to {where} within {dest.timeout_s:g} s",
        )
    if isinstance(exc, socket.gaierror):
        return AssociationFailure(
            AssociationFailureKind.HOST_NOT_FOUND, f"host name {dest.host!r} not resolved: {exc}"
        )
    detail = str(exc) if exc is not None else "it worked on a second try; the network is flaky"
    return AssociationFailure(
        AssociationFailureKind.NETWORK_ERROR, f"cannot connect to {where}: {detail}"
    )


def _rejected_contexts_text(assoc: Association) -> str:
    parts = [
        f"{_uid_label(str(cx.abstract_syntax))} as {_uid_label(str(cx.transfer_syntax[0]))}: "
        f"{cx.status}"
        for cx in assoc.rejected_contexts
    ]
    return "; ".join(parts)


def _diagnose(
    dest: DestinationConfig,
    assoc: Association,
    connected: bool,
    tls: tuple[ssl.SSLContext, str] | None,
    elapsed_s: float,
) -> AssociationFailure:
    rsp = assoc.acceptor.primitive
    called = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if assoc.is_rejected and rsp is not None and rsp.result is not None:
        result, source, diagnostic = (
            int(rsp.result),
            int(rsp.result_source or 0),
            int(rsp.diagnostic or 0),
        )
        kind = (
            AssociationFailureKind.REJECTED_PERMANENT
            if result == AssociateResult.REJECTED_PERMANENT
            else AssociationFailureKind.REJECTED_TRANSIENT
        )
        reason = (
            f"{called} rejected the association ({rsp.result_str.lower()}, source "
            f"{rsp.source_str.lower()}): {rsp.reason_str} "
            f"[calling AE {dest.calling_ae_title!r}, called AE {dest.ae_title!r}]"
        )
        return AssociationFailure(kind, reason, (result, source, diagnostic))
    if not connected:
        return _connect_failure(dest, _probe_connect(dest, tls))
    if rsp is not None and rsp.result == AssociateResult.ACCEPTED and assoc.rejected_contexts:
        return AssociationFailure(
            AssociationFailureKind.NO_ACCEPTED_CONTEXT,
            f"{called} accepted none of the proposed presentation contexts: "
            f"{_rejected_contexts_text(assoc)}",
        )
    if rsp is None and elapsed_s >= 0.9 * dest.timeout_s:
        return AssociationFailure(
            AssociationFailureKind.TIMEOUT,
            f"{called} did not answer the association request within {dest.timeout_s:g} s",
        )
    return AssociationFailure(
        AssociationFailureKind.ABORTED, f"{called} aborted or closed the association"
    )


def associate(
    dest: DestinationConfig,
    contexts: Iterable[tuple[str, str]],
    *,
    ext_neg: Sequence[SCP_SCU_RoleSelectionNegotiation] = (),
    evt_handlers: Sequence[tuple[evt.InterventionEvent, Callable[..., object]]] = (),
) -> AssociationAttempt:
    """Request an association proposing exactly the given (abstract syntax, transfer syntax)
    pairs, one transfer syntax per presentation context.

    `ext_neg` (e.g. SCP/SCU role selection for C-GET) and `evt_handlers` (e.g. the C-STORE
    handler receiving C-GET sub-operations) are passed to pynetdicom as they are."""
    ae = AE(ae_title=dest.calling_ae_title)
    ae.connection_timeout = dest.timeout_s
    ae.acse_timeout = dest.timeout_s
    ae.dimse_timeout = dest.timeout_s
    ae.network_timeout = dest.timeout_s
    pairs = sorted(set(contexts))
    if len(pairs) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"{len(pairs)} presentation contexts; at most {MAX_PRESENTATION_CONTEXTS}")
    for abstract_syntax, transfer_syntax in pairs:
        ae.add_requested_context(abstract_syntax, transfer_syntax)
    try:
        tls = _tls_args(dest)
    except (OSError, ssl.SSLError) as exc:
        return AssociationAttempt(
            None,
            AssociationFailure(
                AssociationFailureKind.TLS_CONFIG,
                f"TLS settings of destination {dest.name!r} cannot be loaded: {exc}",
            ),
        )
    opened = threading.Event()
    started = time.monotonic()
    assoc = ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.ae_title,
        tls_args=tls,
        ext_neg=list(ext_neg) or None,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: opened.set()), *evt_handlers],
    )
    if assoc.is_established:
        return AssociationAttempt(assoc, None)
    failure = _diagnose(dest, assoc, opened.is_set(), tls, time.monotonic() - started)
    return AssociationAttempt(None, failure)


def echo(dest: DestinationConfig) -> EchoResult:
    """C-ECHO (Verification) to the destination."""
    attempt = associate(dest, [(Verification, ImplicitVRLittleEndian)])
    if attempt.association is None:
        assert attempt.failure is not None
        return EchoResult(False, None, attempt.failure, attempt.failure.reason)
    assoc = attempt.association
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        return EchoResult(
            False, None, None, "no C-ECHO response (DIMSE timeout or association lost)"
        )
    code = int(status.Status)
    return EchoResult(code == StoreStatus.SUCCESS, code, None, f"C-ECHO status 0x{code:04X}")


@dataclass(frozen=True)
class _Header:
    item: StoreItem
    sop_class_uid: str
    transfer_syntax_uid: str


def _read_header(item: StoreItem) -> _Header | StoreResult:
    try:
        ds = dcmread(item.path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        sop_class = str(ds.SOPClassUID)  # what pynetdicom matches contexts against
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    except (OSError, InvalidDicomError, AttributeError, KeyError) as exc:
        return StoreResult(
            item.key, Outcome.PERMANENT, None, f"cannot read result file {item.path}: {exc}"
        )
    return _Header(item, sop_class, transfer_syntax)


def _chunks(headers: list[_Header]) -> list[list[_Header]]:
    """Split so that no association needs more than MAX_PRESENTATION_CONTEXTS contexts."""
    chunks: list[list[_Header]] = []
    current: list[_Header] = []
    pairs: set[tuple[str, str]] = set()
    for header in headers:
        pair = (header.sop_class_uid, header.transfer_syntax_uid)
        if pair not in pairs and len(pairs) == MAX_PRESENTATION_CONTEXTS:
            chunks.append(current)
            current, pairs = [], set()
        pairs.add(pair)
        current.append(header)
    if current:
        chunks.append(current)
    return chunks


def _response_result(key: int, status: Dataset) -> StoreResult:
    if "Status" not in status:
        return StoreResult(
            key, Outcome.TRANSIENT, None, "no C-STORE response (DIMSE timeout or association lost)"
        )
    code = int(status.Status)
    outcome, label = classify_store_status(code)
    comment = status.get("ErrorComment", "")
    reason = f"{label}: {comment}" if comment else label
    return StoreResult(key, outcome, code, reason if outcome != Outcome.SUCCESS else "")


def _send_one(
    assoc: Association,
    header: _Header,
    accepted: set[tuple[str, str]],
    rejected: dict[tuple[str, str], str],
    dest: DestinationConfig,
) -> StoreResult:
    key = header.item.key
    pair = (header.sop_class_uid, header.transfer_syntax_uid)
    if pair not in accepted:
        why = rejected.get(pair, "not accepted")
        return StoreResult(
            key,
            Outcome.PERMANENT,
            None,
            f"{dest.name} does not accept {_uid_label(pair[0])} stored as "
            f"{_uid_label(pair[1])} (presentation context: {why})",
        )
    if not assoc.is_established:
        return StoreResult(key, Outcome.TRANSIENT, None, "association ended before this instance")
    try:
        dataset = dcmread(header.item.path)
    except (OSError, InvalidDicomError) as exc:
        return StoreResult(
            key, Outcome.PERMANENT, None, f"cannot read result file {header.item.path}: {exc}"
        )
    try:
        status = assoc.send_c_store(dataset)
    except ValueError as exc:  # the data set cannot be encoded for the context
        return StoreResult(key, Outcome.PERMANENT, None, f"cannot send {header.item.path}: {exc}")
    except (RuntimeError, OSError) as exc:
        return StoreResult(key, Outcome.TRANSIENT, None, f"sending failed: {exc}")
    return _response_result(key, status)


def store_files(dest: DestinationConfig, items: Sequence[StoreItem]) -> list[StoreResult]:
    """C-STORE every file to `dest` over as few associations as possible.

    Returns one result per item, in the order given. Never raises for network or DICOM
    failures: they become TRANSIENT or PERMANENT results with the reason.
    """
    results: dict[int, StoreResult] = {}
    headers: list[_Header] = []
    for item in items:
        header = _read_header(item)
        if isinstance(header, StoreResult):
            results[item.key] = header
        else:
            headers.append(header)
    for chunk in _chunks(headers):
        attempt = associate(dest, [(h.sop_class_uid, h.transfer_syntax_uid) for h in chunk])
        if attempt.association is None:
            assert attempt.failure is not None
            outcome = Outcome.TRANSIENT if attempt.failure.transient else Outcome.PERMANENT
            for header in chunk:
                results[header.item.key] = StoreResult(
                    header.item.key, outcome, None, attempt.failure.reason
                )
            continue
        assoc = attempt.association
        accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        }
        rejected = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])): cx.status
            for cx in assoc.rejected_contexts
        }
        try:
            for header in chunk:
                results[header.item.key] = _send_one(assoc, header, accepted, rejected, dest)
        finally:
            if assoc.is_established:
                assoc.release()
    return [results[item.key] for item in items]
