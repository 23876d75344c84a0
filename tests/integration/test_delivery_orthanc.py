"""Results delivered to a real Orthanc, read back over its REST API.

Covers: SEG, SR and fallback SC images stored and read back; Orthanc down -> results wait
and go once it is back; a re-send replaces instead of duplicating; an Orthanc that rejects
our AE title is not retried and says why; `send-test` against both.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import TEST_DATA, free_port, require_executable
from orthanc_server import OrthancServer, running_orthanc
from sqlalchemy.orm import Session, sessionmaker

from lesionwatch.config.schema import DeliveryConfig, DestinationConfig
from lesionwatch.service.db.delivery_models import AttemptOutcome, Delivery, DeliveryState
from lesionwatch.service.delivery import enqueue_results, list_deliveries
from lesionwatch.service.dispatcher import Dispatcher
from lesionwatch.service.send_test import StepStatus, check_destination, format_report

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
POLICY = DeliveryConfig(max_attempts=5, initial_backoff_s=30, max_backoff_s=600)


def _result_objects(out_dir: Path) -> dict[str, Path]:
    """LesionWatch's own SEG, TID 1500 SR and first overlay SC (dicom_io.results) for a real
    FLAIR crop (open_ms_data patient07, written as a DICOM series) and its consensus mask."""
    import datetime as dt

    import SimpleITK as sitk

    from lesionwatch.config.schema import SeriesClass
    from lesionwatch.dicom_io.codes import FindingType
    from lesionwatch.dicom_io.image_volume import ImageVolume
    from lesionwatch.dicom_io.results import FindingInput, JobIdentity, build_result_objects
    from lesionwatch.dicom_io.seg import AlgorithmIdentity
    from lesionwatch.dicom_io.series_identity import StudyIdentity, derive_uid
    from lesionwatch.dicom_io.series_reader import read_series
    from lesionwatch.dicom_io.series_writer import write_series
    from lesionwatch.dicom_io.sr import AnalysisNote, AnalysisState
    from lesionwatch.pipelines.postprocess import lesion_table

    patient = TEST_DATA / "open_ms_data" / "cross_sectional" / "patient07"
    box = (slice(50, 130), slice(60, 150), slice(60, 80))
    flair = ImageVolume.from_sitk(sitk.ReadImage(str(patient / "FLAIR.nii.gz"))[box])
    mask = ImageVolume.from_sitk(sitk.ReadImage(str(patient / "lesion_mask.nii.gz"))[box])
    identity = StudyIdentity(
        patient_id="OMS-CROSS-07",
        patient_name="OpenMS^Patient07",
        birth_date=None,
        sex="",
        study_instance_uid=derive_uid("delivery-test", "p07"),
        study_date=dt.date(2025, 6, 3),
        study_time=dt.time(10, 0),
    )
    files = write_series(
        flair, out_dir / "flair", contrast=SeriesClass.FLAIR, identity=identity, series_number=2
    )
    source = [pydicom.dcmread(f) for f in files]
    source_grid = read_series(files)
    assert source_grid.same_grid(flair)  # the writer round-trips the crop's grid exactly
    on_source = source_grid.with_array((mask.array > 0).astype(np.uint8))
    algorithm = AlgorithmIdentity("LesionWatch FLAIR lesion U-Net", "test", "a1" * 32)
    objects = build_result_objects(
        [
            FindingInput(
                FindingType.MS_LESION, source, on_source, lesion_table(on_source), algorithm
            )
        ],
        job=JobIdentity("delivery-test/p07/flair"),
        notes=[AnalysisNote(AnalysisState.NO_PRIOR_AVAILABLE, "delivery test: no prior")],
    )
    assert objects.report is not None and objects.secondary_captures
    chosen = {
        "seg": objects.segmentations[0],
        "sr": objects.report,
        "sc": objects.secondary_captures[0],
    }
    paths = {}
    for name, ds in chosen.items():
        paths[name] = out_dir / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _result_objects(tmp_path_factory.mktemp("results"))


@pytest.fixture(autouse=True)
def _orthanc_installed() -> None:
    require_executable("Orthanc")


def _destination(port: int, name: str = "orthanc") -> DestinationConfig:
    return DestinationConfig(
        name=name, ae_title="ORTHANC", host="127.0.0.1", port=port, timeout_s=10
    )


def _stored(orthanc: OrthancServer) -> dict[str, dict[str, str]]:
    """SOP Instance UID -> simplified tags, for everything Orthanc holds."""
    stored = {}
    for instance_id in orthanc.get("/instances"):
        tags = orthanc.get(f"/instances/{instance_id}/tags?simplify")
        stored[tags["SOPInstanceUID"]] = tags | {"_id": instance_id}
    return stored


def _rows(sessions: sessionmaker[Session], **filters: object) -> list[Delivery]:
    with sessions() as session:
        rows = list_deliveries(session, **filters)  # type: ignore[arg-type]
        for row in rows:
            _ = row.attempt_log
        return rows


def _uids(paths: dict[str, Path]) -> dict[str, tuple[str, str]]:
    out = {}
    for name, path in paths.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out[name] = (str(ds.SOPInstanceUID), str(ds.SOPClassUID))
    return out


def test_seg_sr_and_overlay_reach_orthanc_and_read_back(
    sessions: sessionmaker[Session], results: dict[str, Path], tmp_path: Path
) -> None:
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        with sessions() as session:
            enqueue_results(session, list(results.values()), ["orthanc"], now=T0)
            session.commit()
        dispatcher = Dispatcher(sessions, [_destination(orthanc.dicom_port)], POLICY)
        summary = dispatcher.run_once(T0)
        assert (summary.claimed, summary.sent) == (3, 3)

        stored = _stored(orthanc)
        for name, (sop_instance_uid, sop_class_uid) in _uids(results).items():
            tags = stored[sop_instance_uid]
            assert tags["SOPClassUID"] == sop_class_uid, name
            # Orthanc keeps the file as received: byte-identical data set and pixels.
            received = orthanc.get(f"/instances/{tags['_id']}/file")
            sent_pixels = pydicom.dcmread(results[name]).get("PixelData")
            back = pydicom.dcmread(io.BytesIO(received))
            assert back.get("PixelData") == sent_pixels, name
        assert stored[_uids(results)["seg"][0]]["Modality"] == "SEG"
        assert stored[_uids(results)["sr"][0]]["Modality"] == "SR"
        assert stored[_uids(results)["sc"][0]]["SeriesDescription"].startswith(
            "LesionWatch overlay"
        )

        # A re-send of the same (deterministic) UIDs replaces; nothing is duplicated.
        with sessions() as session:
            enqueue_results(session, list(results.values()), ["orthanc"], now=T0)
            session.commit()
        assert dispatcher.run_once(T0).sent == 3
        assert len(orthanc.get("/instances")) == 3
        assert all(len(row.attempt_log) == 2 for row in _rows(sessions))


def test_results_wait_while_orthanc_is_down_and_go_when_it_returns(
    sessions: sessionmaker[Session], results: dict[str, Path], tmp_path: Path
) -> None:
    port = free_port()  # Orthanc will come up on this port later
    dispatcher = Dispatcher(sessions, [_destination(port)], POLICY)
    with sessions() as session:
        enqueue_results(session, list(results.values()), ["orthanc"], now=T0)
        session.commit()

    down = dispatcher.run_once(T0)
    assert (down.claimed, down.retry_scheduled, down.sent) == (3, 3, 0)
    for row in _rows(sessions):
        assert row.state == DeliveryState.PENDING
        assert f"connection to 127.0.0.1:{port} refused" in row.last_reason
        assert [a.outcome for a in row.attempt_log] == [AttemptOutcome.TRANSIENT]
    retry_at = max(row.next_attempt_at for row in _rows(sessions))
    assert retry_at >= T0 + timedelta(seconds=POLICY.initial_backoff_s)

    with running_orthanc(tmp_path / "orthanc", extra_config={"DicomPort": port}) as orthanc:
        assert dispatcher.run_once(T0 + timedelta(seconds=1)).claimed == 0  # backoff holds
        back = dispatcher.run_once(retry_at)
        assert back.sent == 3
        assert set(_stored(orthanc)) == {uid for uid, _ in _uids(results).values()}
    for row in _rows(sessions):
        assert row.state == DeliveryState.SENT
        assert row.attempts == 2
        assert [a.outcome for a in row.attempt_log] == [
            AttemptOutcome.TRANSIENT,
            AttemptOutcome.SUCCESS,
        ]


def test_orthanc_that_rejects_our_ae_title_is_not_retried(
    sessions: sessionmaker[Session], results: dict[str, Path], tmp_path: Path
) -> None:
    strict = {"DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False}
    with running_orthanc(tmp_path / "orthanc", extra_config=strict) as orthanc:
        dispatcher = Dispatcher(sessions, [_destination(orthanc.dicom_port)], POLICY)
        with sessions() as session:
            enqueue_results(session, list(results.values()), ["orthanc"], now=T0)
            session.commit()
        assert dispatcher.run_once(T0).failed_permanent == 3
        assert dispatcher.run_once(T0 + timedelta(days=30)).claimed == 0
        assert orthanc.get("/instances") == []

    failed = _rows(sessions, states=[DeliveryState.FAILED_PERMANENT])
    assert len(failed) == 3
    for row in failed:
        assert row.attempts == 1
        assert "rejected the association (rejected permanent" in row.last_reason
        assert "Calling AE title not recognised" in row.last_reason


def test_send_test_against_orthanc(tmp_path: Path) -> None:
    with running_orthanc(tmp_path / "open") as orthanc:
        report = check_destination(_destination(orthanc.dicom_port))
        assert report.ok, format_report(report)
        assert [step.status for step in report.steps] == [StepStatus.OK] * 3
        test_object = _stored(orthanc)[str(report.test_sop_instance_uid)]
        assert test_object["PatientName"] == "LESIONWATCH^CONNECTIVITY TEST"
    strict = {"DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False}
    with running_orthanc(tmp_path / "strict", extra_config=strict) as orthanc:
        text = format_report(check_destination(_destination(orthanc.dicom_port)))
    assert "add AE title 'LESIONWATCH'" in text
    assert "NOT ready" in text
