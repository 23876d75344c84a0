"""Query/retrieve against a PACS (Study Root): C-FIND, then C-MOVE or C-GET of a series.

Associations come from :func:`lesionwatch.dicom_io.scu.associate`, so a failure to connect
is diagnosed the same way as for result delivery (refused, timeout, rejected, TLS...). Every
DICOM or network failure becomes a :class:`QueryRetrieveError` saying what happened and
whether a retry may help; nothing here raises anything else for a misbehaving PACS.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    EnhancedMRImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import STATUS_PENDING, STATUS_SUCCESS, STATUS_WARNING, code_to_category

from lesionwatch.config.schema import DestinationConfig, QueryPacsConfig

from .scu import AssociationAttempt, associate

__all__ = [
    "InstanceHandler",
    "QueryRetrieveClient",
    "QueryRetrieveError",
    "RetrieveOutcome",
    "pacs_node",
]

# What a prior series can be (MR images): offered for C-GET's storage sub-operations.
_STORAGE_CLASSES = (MRImageStorage, EnhancedMRImageStorage)
_STORAGE_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEG2000Lossless,
    RLELossless,
)

# Called for each instance a C-GET delivers: (data set, transfer syntax UID) -> C-STORE status.
InstanceHandler = Callable[[Dataset, str], int]


class QueryRetrieveError(Exception):
    """A query or retrieve did not complete; `transient` says whether a retry may help."""

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


@dataclass(frozen=True)
class RetrieveOutcome:
    completed: int
    failed: int
    warning: int


def pacs_node(pacs: QueryPacsConfig, listener_ae_title: str) -> DestinationConfig:
    """The query PACS as an association target (the shape `scu.associate` takes)."""
    return DestinationConfig(
        name="query-pacs",
        ae_title=pacs.ae_title,
        host=pacs.host,
        port=pacs.port,
        calling_ae_title=pacs.calling_ae_title or listener_ae_title,
        tls=pacs.tls,
        timeout_s=pacs.timeout_s,
    )


def _status_text(status: Dataset) -> str:
    code = int(status.Status)
    comment = status.get("ErrorComment", "")
    return f"0x{code:04X}{': ' + str(comment) if comment else ''}"


def _count(status: Dataset, keyword: str) -> int:
    value = status.get(keyword)
    return int(value) if value not in (None, "") else 0


class QueryRetrieveClient:
    """One PACS, Study Root information model; one association per operation."""

    def __init__(self, node: DestinationConfig, *, retrieve_timeout_s: float) -> None:
        self.node = node
        self.retrieve_timeout_s = retrieve_timeout_s

    @property
    def where(self) -> str:
        return f"{self.node.ae_title}@{self.node.host}:{self.node.port}"

    def _open(self, attempt: AssociationAttempt, operation: str) -> Association:
        if attempt.association is None:
            assert attempt.failure is not None
            raise QueryRetrieveError(
                f"{operation}: {attempt.failure.reason}", transient=attempt.failure.transient
            )
        return attempt.association

    def find(self, query: Dataset) -> list[Dataset]:
        """C-FIND `query` (QueryRetrieveLevel set by the caller); every matching identifier."""
        level = str(query.get("QueryRetrieveLevel", "?"))
        operation = f"C-FIND ({level} level) at {self.where}"
        assoc = self._open(
            associate(
                self.node, [(StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian)]
            ),
            operation,
        )
        matches: list[Dataset] = []
        final: Dataset | None = None
        try:
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            ):
                if "Status" not in status:
                    break  # no response: DIMSE timeout or association lost
                if code_to_category(int(status.Status)) == STATUS_PENDING:
                    if identifier is not None:
                        matches.append(identifier)
                    continue
                final = status
        finally:
            if assoc.is_established:
                assoc.release()
        if final is None:
            raise QueryRetrieveError(
                f"{operation}: no final response (timeout {self.node.timeout_s:g} s or "
                "association lost)",
                transient=True,
            )
        if code_to_category(int(final.Status)) != STATUS_SUCCESS:
            # 0xA700 out of resources is worth a retry; refusals (0xA900, 0xCxxx) are not.
            transient = int(final.Status) & 0xFF00 == 0xA700
            raise QueryRetrieveError(
                f"{operation} failed with status {_status_text(final)}", transient=transient
            )
        return matches

    def move(self, identifier: Dataset, destination_ae_title: str) -> RetrieveOutcome:
        """C-MOVE `identifier` to `destination_ae_title` (the instances arrive at the listener)."""
        operation = f"C-MOVE to {destination_ae_title} from {self.where}"
        assoc = self._open(
            associate(
                self.node, [(StudyRootQueryRetrieveInformationModelMove, ExplicitVRLittleEndian)]
            ),
            operation,
        )
        responses = assoc.send_c_move(
            identifier, destination_ae_title, StudyRootQueryRetrieveInformationModelMove
        )
        return self._retrieve(assoc, responses, operation)

    def get(self, identifier: Dataset, on_instance: InstanceHandler) -> RetrieveOutcome:
        """C-GET `identifier` over this association; `on_instance` stores each instance."""
        operation = f"C-GET from {self.where}"

        def handle_store(event: evt.Event) -> int:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            return on_instance(dataset, str(event.context.transfer_syntax))

        contexts = [(StudyRootQueryRetrieveInformationModelGet, ExplicitVRLittleEndian)]
        contexts += [(c, ts) for c in _STORAGE_CLASSES for ts in _STORAGE_SYNTAXES]
        roles = [build_role(c, scp_role=True) for c in _STORAGE_CLASSES]
        assoc = self._open(
            associate(
                self.node, contexts, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, handle_store)]
            ),
            operation,
        )
        responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
        return self._retrieve(assoc, responses, operation)

    def _retrieve(self, assoc: Association, responses: object, operation: str) -> RetrieveOutcome:
        # The DIMSE timeout is the longest pause between two responses; the whole retrieve is
        # bounded separately by retrieve_timeout_s (a PACS trickling responses forever).
        assoc.dimse_timeout = self.retrieve_timeout_s
        started = time.monotonic()
        final: Dataset | None = None
        try:
            for status, _identifier in responses:  # type: ignore[attr-defined]
                if "Status" not in status:
                    break
                if code_to_category(int(status.Status)) != STATUS_PENDING:
                    final = status
                    break
                if time.monotonic() - started > self.retrieve_timeout_s:
                    assoc.abort()
                    raise QueryRetrieveError(
                        f"{operation}: not finished after {self.retrieve_timeout_s:g} s",
                        transient=True,
                    )
        finally:
            if assoc.is_established:
                assoc.release()
        if final is None:
            raise QueryRetrieveError(
                f"{operation}: no final response (association lost or timed out)", transient=True
            )
        outcome = RetrieveOutcome(
            completed=_count(final, "NumberOfCompletedSuboperations"),
            failed=_count(final, "NumberOfFailedSuboperations"),
            warning=_count(final, "NumberOfWarningSuboperations"),
        )
        category = code_to_category(int(final.Status))
        stored = category == STATUS_SUCCESS or (category == STATUS_WARNING and outcome.completed)
        if stored and outcome.failed == 0:
            return outcome
        code = int(final.Status)
        # 0xA801 move destination unknown (Orthanc says 0xC000): permanent until an admin
        # registers our AE title at the PACS; out of resources, sub-operation failures: transient.
        transient = code != 0xA801 and code & 0xF000 != 0xC000
        hint = ""
        if "C-MOVE" in operation and (code == 0xA801 or outcome.completed + outcome.failed == 0):
            hint = (
                "; nothing was sent: check that the PACS knows the move destination AE title "
                "with LesionWatch's listener host and port"
            )
        raise QueryRetrieveError(
            f"{operation} failed with status {_status_text(final)} "
            f"({outcome.completed} stored, {outcome.failed} failed){hint}",
            transient=transient,
        )
