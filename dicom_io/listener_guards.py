"""Two guards pynetdicom lacks, for the listener's associations only.

- PDU size. pynetdicom reads a whole PDU into memory whatever its length, even past the
  maximum the listener advertised: a sender could make it hold up to 4 GiB. A P-DATA-TF PDU
  longer than the advertised maximum (``listener.maximum_pdu_size``), or any other PDU longer
  than :data:`MAX_CONTROL_PDU_BYTES`, aborts the association before its body is read.
- Invalid UIDs in a C-STORE request. pynetdicom validates the request's UIDs while decoding
  it and aborts the association on one of over 64 characters, so the sender learns nothing
  and retries. In the listener's threads they are let through: the C-STORE handler refuses
  the instance with "cannot understand" (0xC000) and the association goes on.

Other associations of the process (the dispatcher's, query/retrieve) keep pynetdicom's
behaviour. Both are installed by :func:`install` (idempotent).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

__all__ = ["MAX_CONTROL_PDU_BYTES", "install"]

LOGGER = logging.getLogger(__name__)

# A-ASSOCIATE-RQ with every presentation context and a user identity token fits easily.
MAX_CONTROL_PDU_BYTES = 1 << 20
_P_DATA_TF = 0x04
_INVALID_PDU_EVENT = "Evt19"  # pynetdicom's "invalid or unrecognised PDU": A-ABORT
_CLOSED_EVENT = "Evt17"  # "transport connection closed"

_original_read: Callable[[DULServiceProvider], None] = DULServiceProvider._read_pdu_data
_previous_ui_validator: Callable[[Any], tuple[bool, str]] = _config.VALIDATORS["UI"]


def _guarded(association: Association | None) -> bool:
    return association is not None and bool(getattr(association.ae, "guard_listener", False))


class _ReplaySocket:
    """The association socket, handing back a PDU header already read from it."""

    def __init__(self, socket: Any, header: bytes) -> None:
        self._socket = socket
        self._header: bytes | None = header

    def recv(self, nr_bytes: int) -> bytes:
        if self._header is not None:
            header, self._header = self._header, None
            return header
        return bytes(self._socket.recv(nr_bytes))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


def _read_pdu_data(self: DULServiceProvider) -> None:
    dul = self
    if not _guarded(dul.assoc):
        _original_read(dul)
        return
    socket = dul.socket
    assert socket is not None
    try:
        header = bytes(socket.recv(6))
    except (OSError, TimeoutError):
        dul.event_queue.put(_CLOSED_EVENT)
        return
    if len(header) == 6:
        pdu_type, _, length = struct.unpack(">BBL", header)
        advertised = dul.assoc.acceptor.maximum_length  # 0: unlimited
        limit = (advertised or None) if pdu_type == _P_DATA_TF else MAX_CONTROL_PDU_BYTES
        # The length field counts the PDV items, at most the advertised maximum (PS3.8 D.1);
        # a few bytes of slack for peers that miscount.
        if limit is not None and length > limit + 6:
            LOGGER.warning(
                "association from %s:%s aborted: a PDU of type 0x%02X is %d bytes, over the "
                "%d the listener allows",
                dul.assoc.requestor.address,
                dul.assoc.requestor.port,
                pdu_type,
                length,
                limit,
            )
            dul.event_queue.put(_INVALID_PDU_EVENT)
            return
    dul.socket = _ReplaySocket(socket, header)  # type: ignore[assignment]
    try:
        _original_read(dul)
    finally:
        dul.socket = socket


def _validate_ui(value: Any) -> tuple[bool, str]:
    thread = threading.current_thread()
    association = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
    if isinstance(association, Association) and _guarded(association):
        return True, ""  # the C-STORE handler refuses invalid UIDs with 0xC000
    return _previous_ui_validator(value)


def install() -> None:
    """Apply both guards to associations of AEs with ``guard_listener = True``."""
    global _previous_ui_validator
    DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
    if _config.VALIDATORS["UI"] is not _validate_ui:
        _previous_ui_validator = _config.VALIDATORS["UI"]
        _config.VALIDATORS["UI"] = _validate_ui
