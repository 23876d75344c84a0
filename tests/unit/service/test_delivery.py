"""The result outbox and dispatcher: real associations to pynetdicom SCPs on localhost.

Each SCP here plays one kind of destination (accepting, out of resources, refusing a SOP
class, rejecting our AE title, silent). The database tests run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import free_port
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    Verification,
)
from sqlalchemy.orm import Session, sessionmaker

from lesionwatch.config.schema import DeliveryConfig, DestinationConfig
from lesionwatch.dicom_io.scu import (
    AssociationFailureKind,
    Outcome,
    StoreStatus,
    associate,
    classify_store_status,
)
from lesionwatch.service.db.delivery_models import AttemptOutcome, Delivery, DeliveryState
from lesionwatch.service.delivery import (
    ResultFileError,
    backoff_delay_s,
    claim_due,
    enqueue_results,
    list_deliveries,
    record_result,
)
from lesionwatch.service.dispatcher import Dispatcher
from lesionwatch.service.send_test import StepStatus, check_destination, format_report

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
POLICY = DeliveryConfig(max_attempts=3, initial_backoff_s=30, max_backoff_s=300, backoff_factor=2)


# --- result objects: SEG, SR and SC made with highdicom from one real GE MR slice -----------


def build_result_objects(source_file: Path, out_dir: Path) -> dict[str, Path]:
    """SEG (Explicit VR LE), Comprehensive 3D SR (Explicit VR LE), SC (Implicit VR LE)."""
    source = pydicom.dcmread(source_file)
    mask = np.zeros((1, source.Rows, source.Columns), dtype=bool)
    mask[0, 100:120, 100:130] = True
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label="lesion",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Lesion,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        ],
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="LesionWatch tests",
        manufacturer_model_name="delivery test",
        software_versions="0",
        device_serial_number="0",
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    report = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport, template_id="1500")
    report.ContentSequence = [
        hd.sr.TextContentItem(
            name=codes.DCM.Finding,
            value="delivery test",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=902,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="LesionWatch tests",
    )
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.zeros((64, 64, 3), np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "P"),
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=903,
        instance_number=1,
        manufacturer="LesionWatch tests",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, obj in (("seg", seg), ("sr", sr), ("sc", sc)):
        paths[name] = out_dir / f"{name}.dcm"
        obj.save_as(paths[name], enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def results(ge_t1_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    source = sorted(ge_t1_dir.iterdir())[0]
    with pytest.warns(UserWarning, match="person name"):  # the GE series' PatientName is "dicom"
        return build_result_objects(source, tmp_path_factory.mktemp("results"))


# --- destinations played by pynetdicom SCPs -----------------------------------------------


@dataclass
class FakeNode:
    """A real pynetdicom SCP; `statuses` maps SOP class UID -> C-STORE status to answer."""

    port: int
    received: list[tuple[str, str]] = field(default_factory=list)  # (SOP instance UID, TS)
    associations: int = 0

    def destination(self, **overrides: object) -> DestinationConfig:
        values: dict[str, object] = {
            "name": "node",
            "ae_title": "NODE",
            "host": "127.0.0.1",
            "port": self.port,
            "timeout_s": 5.0,
        }
        return DestinationConfig.model_validate(values | overrides)


NodeFactory = Callable[..., FakeNode]


@pytest.fixture
def node_factory() -> Iterator[NodeFactory]:
    servers = []

    def start(
        *,
        supported: tuple[str, ...] = (
            SegmentationStorage,
            Comprehensive3DSRStorage,
            SecondaryCaptureImageStorage,
            Verification,
        ),
        statuses: dict[str, int] | None = None,
        require_calling_aet: list[str] | None = None,
    ) -> FakeNode:
        node = FakeNode(free_port())
        ae = AE(ae_title="NODE")
        for uid in supported:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        if require_calling_aet:
            ae.require_calling_aet = require_calling_aet

        def on_store(event: evt.Event) -> int:
            ds = event.dataset
            node.received.append((str(ds.SOPInstanceUID), str(event.context.transfer_syntax)))
            return (statuses or {}).get(str(ds.SOPClassUID), StoreStatus.SUCCESS)

        def on_established(_event: evt.Event) -> None:
            node.associations += 1

        servers.append(
            ae.start_server(
                ("127.0.0.1", node.port),
                block=False,
                evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ESTABLISHED, on_established)],
            )
        )
        return node

    yield start
    for server in servers:
        server.shutdown()


def _enqueue(sessions: sessionmaker[Session], paths: list[Path], dests: list[str]) -> None:
    with sessions() as session:
        enqueue_results(session, paths, dests, now=T0)
        session.commit()


def _by_path(sessions: sessionmaker[Session]) -> dict[str, Delivery]:
    with sessions() as session:
        rows = list_deliveries(session)
        for row in rows:
            _ = row.attempt_log  # load while the session is open
        return {Path(row.path).stem: row for row in rows}


# --- pure policy ----------------------------------------------------------------------------


def test_backoff_is_exponential_and_capped() -> None:
    delays = [backoff_delay_s(POLICY, attempts) for attempts in range(1, 8)]
    assert delays == [30, 60, 120, 240, 300, 300, 300]
    assert backoff_delay_s(POLICY, 10_000) == 300  # no overflow for absurd counts


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (0x0000, Outcome.SUCCESS),
        (0xB000, Outcome.WARNING),  # coercion of data elements: stored
        (0xB007, Outcome.WARNING),
        (0xA700, Outcome.TRANSIENT),  # out of resources
        (0xA7FF, Outcome.TRANSIENT),
        (0x0213, Outcome.TRANSIENT),  # resource limitation
        (0x0110, Outcome.TRANSIENT),  # processing failure
        (0x0122, Outcome.PERMANENT),  # SOP class not supported
        (0x0124, Outcome.PERMANENT),  # not authorised
        (0xA900, Outcome.PERMANENT),  # data set does not match SOP class
        (0xC123, Outcome.PERMANENT),  # cannot understand
        (0x0111, Outcome.PERMANENT),  # duplicate SOP instance refused
        (0x7777, Outcome.TRANSIENT),  # unknown: bounded by the retry budget
    ],
)
def test_store_status_classification(code: int, outcome: Outcome) -> None:
    assert classify_store_status(code)[0] == outcome
    assert f"0x{code:04X}" in classify_store_status(code)[1]


# --- outbox in the database -------------------------------------------------------------------


def test_enqueue_resets_instead_of_duplicating(
    sessions: sessionmaker[Session], results: dict[str, Path], node_factory: NodeFactory
) -> None:
    node = node_factory()
    paths = list(results.values())
    _enqueue(sessions, paths, ["node", "archive"])
    dispatcher = Dispatcher(sessions, [node.destination()], POLICY)
    assert dispatcher.run_once(T0).sent == 3
    _enqueue(sessions, paths, ["node", "archive"])  # regenerated results, same UIDs
    with sessions() as session:
        rows = list_deliveries(session)
        assert len(rows) == 6
        assert {row.state for row in rows} == {DeliveryState.PENDING}
        assert all(row.attempts == 0 for row in rows)
        resent = list_deliveries(session, destination="node")
        assert all("re-queued" in row.last_reason for row in resent)
        assert all(len(row.attempt_log) == 1 for row in resent)  # the history stays
    summary = dispatcher.run_once(T0)
    assert summary.sent == 3
    assert summary.unknown_destinations == ["archive"]  # waits, visibly


def test_enqueue_rejects_a_file_that_is_not_dicom(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    bogus = tmp_path / "not_dicom.dcm"
    bogus.write_text("hello")
    with sessions() as session, pytest.raises(ResultFileError, match="not_dicom.dcm"):
        enqueue_results(session, [bogus], ["node"], now=T0)


# --- dispatcher against real associations ---------------------------------------------------


def test_one_association_sends_every_instance_as_stored(
    sessions: sessionmaker[Session], results: dict[str, Path], node_factory: NodeFactory
) -> None:
    node = node_factory()
    _enqueue(sessions, list(results.values()), ["node"])
    summary = Dispatcher(sessions, [node.destination()], POLICY).run_once(T0)
    assert (summary.claimed, summary.sent) == (3, 3)
    assert node.associations == 1
    stored_ts = {
        str(pydicom.dcmread(p).SOPInstanceUID): str(pydicom.dcmread(p).file_meta.TransferSyntaxUID)
        for p in results.values()
    }
    assert dict(node.received) == stored_ts  # SC went as Implicit, SEG/SR as Explicit VR LE
    rows = _by_path(sessions)
    for row in rows.values():
        assert row.state == DeliveryState.SENT
        assert [a.outcome for a in row.attempt_log] == [AttemptOutcome.SUCCESS]
        assert row.last_status == 0


def test_out_of_resources_is_retried_with_backoff_then_given_up(
    sessions: sessionmaker[Session], results: dict[str, Path], node_factory: NodeFactory
) -> None:
    node = node_factory(statuses={Comprehensive3DSRStorage: 0xA700})
    _enqueue(sessions, list(results.values()), ["node"])
    dispatcher = Dispatcher(sessions, [node.destination()], POLICY)
    first = dispatcher.run_once(T0)
    assert (first.sent, first.retry_scheduled) == (2, 1)
    sr = _by_path(sessions)["sr"]
    assert sr.state == DeliveryState.PENDING
    assert sr.last_status == 0xA700
    assert "Out of Resources" in sr.last_reason
    due = sr.next_attempt_at
    assert timedelta(seconds=30) <= due - T0 < timedelta(seconds=35)

    assert dispatcher.run_once(due - timedelta(seconds=1)).claimed == 0  # not yet due
    second = dispatcher.run_once(due)
    assert (second.claimed, second.retry_scheduled) == (1, 1)
    sr = _by_path(sessions)["sr"]
    assert sr.next_attempt_at - due >= timedelta(seconds=60)
    third = dispatcher.run_once(sr.next_attempt_at)
    assert third.gave_up == 1
    sr = _by_path(sessions)["sr"]
    assert sr.state == DeliveryState.GAVE_UP
    assert sr.last_reason.startswith("gave up after 3 attempts: 0xA700")
    assert [a.outcome for a in sr.attempt_log] == [AttemptOutcome.TRANSIENT] * 3
    assert dispatcher.run_once(T0 + timedelta(days=1)).claimed == 0


def test_sop_class_not_supported_status_fails_permanently_at_once(
    sessions: sessionmaker[Session], results: dict[str, Path], node_factory: NodeFactory
) -> None:
    node = node_factory(statuses={SegmentationStorage: 0x0122})
    _enqueue(sessions, list(results.values()), ["node"])
    dispatcher = Dispatcher(sessions, [node.destination()], POLICY)
    assert dispatcher.run_once(T0).failed_permanent == 1
    assert dispatcher.run_once(T0 + timedelta(days=1)).claimed == 0
    seg = _by_path(sessions)["seg"]
    assert seg.state == DeliveryState.FAILED_PERMANENT
    assert (seg.attempts, seg.last_status) == (1, 0x0122)
    assert "SOP Class Not Supported" in seg.last_reason


def test_presentation_context_not_accepted_fails_only_that_instance(
    sessions: sessionmaker[Session], results: dict[str, Path], node_factory: NodeFactory
) -> None:
    node = node_factory(supported=(Comprehensive3DSRStorage, SecondaryCaptureImageStorage))
    _enqueue(sessions, list(results.values()), ["node"])
    summary = Dispatcher(sessions, [node.destination()], POLICY).run_once(T0)
    assert (summary.sent, summary.failed_permanent) == (2, 1)
    seg = _by_path(sessions)["seg"]
    assert seg.state == DeliveryState.FAILED_PERMANENT
    assert "does not accept Segmentation Storage" in seg.last_reason


def test_rejected_calling_ae_title_fails_permanently(
    sessions: sessionmaker[Session], results: dict[str, Path], node_factory: NodeFactory
) -> None:
    node = node_factory(require_calling_aet=["SOMEONE_ELSE"])
    _enqueue(sessions, list(results.values()), ["node"])
    summary = Dispatcher(sessions, [node.destination()], POLICY).run_once(T0)
    assert summary.failed_permanent == 3
    for row in _by_path(sessions).values():
        assert row.state == DeliveryState.FAILED_PERMANENT
        assert "Calling AE title not recognised" in row.last_reason


def test_connection_refused_waits_for_the_destination(
    sessions: sessionmaker[Session], results: dict[str, Path]
) -> None:
    dest = DestinationConfig(name="node", ae_title="NODE", host="127.0.0.1", port=free_port())
    _enqueue(sessions, [results["sr"]], ["node"])
    summary = Dispatcher(sessions, [dest], POLICY).run_once(T0)
    assert summary.retry_scheduled == 1
    row = _by_path(sessions)["sr"]
    assert row.state == DeliveryState.PENDING
    assert f"connection to 127.0.0.1:{dest.port} refused" in row.last_reason


def test_interrupted_attempt_is_recorded_and_resent(
    sessions: sessionmaker[Session], results: dict[str, Path], node_factory: NodeFactory
) -> None:
    node = node_factory()
    _enqueue(sessions, [results["seg"]], ["node"])
    with sessions() as session:  # a dispatcher claims, commits, then dies before sending
        claim_due(session, T0, destination="node", limit=10, lease_s=600, max_attempts=3)
        session.commit()
    dispatcher = Dispatcher(sessions, [node.destination()], POLICY, lease_s=600)
    assert dispatcher.run_once(T0 + timedelta(seconds=599)).claimed == 0  # lease still held
    assert dispatcher.run_once(T0 + timedelta(seconds=600)).sent == 1
    seg = _by_path(sessions)["seg"]
    assert [a.outcome for a in seg.attempt_log] == [
        AttemptOutcome.INTERRUPTED,
        AttemptOutcome.SUCCESS,
    ]


def test_missing_result_file_fails_permanently(
    sessions: sessionmaker[Session],
    results: dict[str, Path],
    node_factory: NodeFactory,
    tmp_path: Path,
) -> None:
    node = node_factory()
    copy = tmp_path / "gone.dcm"
    copy.write_bytes(results["sc"].read_bytes())
    _enqueue(sessions, [copy], ["node"])
    copy.unlink()
    assert Dispatcher(sessions, [node.destination()], POLICY).run_once(T0).failed_permanent == 1
    row = _by_path(sessions)["gone"]
    assert "cannot read result file" in row.last_reason


# --- association diagnosis and send-test ----------------------------------------------------


def test_silent_peer_is_an_association_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts TCP, never answers
        port = silent.getsockname()[1]
        dest = DestinationConfig(
            name="silent", ae_title="X", host="127.0.0.1", port=port, timeout_s=0.5
        )
        attempt = associate(dest, [(Verification, ExplicitVRLittleEndian)])
    assert attempt.association is None and attempt.failure is not None
    assert attempt.failure.kind == AssociationFailureKind.TIMEOUT
    assert attempt.failure.transient


def test_send_test_passes_against_an_accepting_node(node_factory: NodeFactory) -> None:
    node = node_factory()
    report = check_destination(node.destination())
    assert report.ok, format_report(report)
    assert [step.status for step in report.steps] == [
        StepStatus.OK,
        StepStatus.WARNING,
        StepStatus.OK,  # Comprehensive SR not offered: warning
    ]
    assert node.received[0][0] == report.test_sop_instance_uid


def test_send_test_explains_an_unknown_calling_ae(node_factory: NodeFactory) -> None:
    node = node_factory(require_calling_aet=["PACS_ONLY"])
    report = check_destination(node.destination(calling_ae_title="LW_WARD3"))
    text = format_report(report)
    assert not report.ok
    assert "add AE title 'LW_WARD3'" in text
    assert [step.status for step in report.steps][1:] == [StepStatus.SKIPPED] * 2


def test_send_test_explains_a_closed_port() -> None:
    port = free_port()
    dest = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    text = format_report(check_destination(dest))
    assert f"Nothing listens on 127.0.0.1:{port}" in text
    assert "NOT ready" in text


def test_run_forever_stops_when_asked(
    sessions: sessionmaker[Session], results: dict[str, Path], node_factory: NodeFactory
) -> None:
    node = node_factory()
    _enqueue(sessions, [results["sc"]], ["node"])
    policy = POLICY.model_copy(update={"poll_interval_s": 0.05})
    stop = threading.Event()
    thread = threading.Thread(
        target=Dispatcher(sessions, [node.destination()], policy).run_forever, args=(stop,)
    )
    thread.start()
    try:
        for _ in range(100):
            if node.received:
                break
            stop.wait(0.05)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert _by_path(sessions)["sc"].state == DeliveryState.SENT


def test_no_accepted_context_at_all_is_permanent(
    sessions: sessionmaker[Session], results: dict[str, Path], node_factory: NodeFactory
) -> None:
    node = node_factory(supported=(Verification,))
    _enqueue(sessions, list(results.values()), ["node"])
    assert Dispatcher(sessions, [node.destination()], POLICY).run_once(T0).failed_permanent == 3
    for row in _by_path(sessions).values():
        assert "accepted none of the proposed presentation contexts" in row.last_reason


def test_requeue_during_a_send_wins_over_the_late_outcome(
    sessions: sessionmaker[Session], results: dict[str, Path]
) -> None:
    _enqueue(sessions, [results["sr"]], ["node"])
    with sessions() as session:
        (claim,) = claim_due(session, T0, destination="node", limit=10, lease_s=600, max_attempts=3)
        session.commit()
    _enqueue(sessions, [results["sr"]], ["node"])  # a regenerated result arrives meanwhile
    with sessions() as session:
        state = record_result(
            session, claim, Outcome.TRANSIENT, None, "timeout", now=T0, policy=POLICY
        )
        session.commit()
    assert state == DeliveryState.PENDING
    row = _by_path(sessions)["sr"]
    assert (row.attempts, row.next_attempt_at) == (0, T0)  # due now, with a fresh budget
    assert [a.outcome for a in row.attempt_log] == [AttemptOutcome.TRANSIENT]
