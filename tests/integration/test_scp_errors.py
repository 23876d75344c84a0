"""Bad requests get failure statuses with reasons; the listener keeps serving; nothing is lost."""

from __future__ import annotations

import random
from pathlib import Path

import pydicom
import pytest
from conftest import free_port
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import MRImageStorage, Verification
from scp_harness import count_instances, running_listener
from sqlalchemy import text

from lesionwatch.dicom_io.scp import StoreStatus

pytestmark = pytest.mark.integration


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send files' bytes as they are, so broken encodings reach the listener unchanged."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture
def ge_file(ge_t1_dir: Path) -> Path:
    return sorted(ge_t1_dir.iterdir())[0]


def _associate(port: int) -> Association:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="LESIONWATCH")
    assert assoc.is_established
    return assoc


def _file_with(tmp_path: Path, name: str, meta_from: Path, dataset_bytes: bytes) -> Path:
    """A Part 10 file: the valid preamble and File Meta of ``meta_from``, then ``dataset_bytes``."""
    data = meta_from.read_bytes()
    meta = pydicom.filereader.read_file_meta_info(meta_from)
    meta_end = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    path = tmp_path / name
    path.write_bytes(data[:meta_end] + dataset_bytes)
    return path


def _encoded(dataset: pydicom.Dataset) -> bytes:
    """The data set alone (no preamble, no File Meta), in Explicit VR Little Endian."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def _bad_files(tmp_path: Path, ge_file: Path) -> dict[str, tuple[Path, StoreStatus, str]]:
    data = ge_file.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 40_000])  # cut in the middle of the pixel data

    garbage = _file_with(tmp_path, "garbage.dcm", ge_file, random.Random(7).randbytes(20_000))

    no_uid = pydicom.dcmread(ge_file)
    del no_uid.SOPInstanceUID
    no_uid_path = _file_with(tmp_path, "no_uid.dcm", ge_file, _encoded(no_uid))

    other_class = pydicom.dcmread(ge_file)
    other_class.SOPClassUID = SecondaryCaptureImageStorage
    other_class_path = _file_with(tmp_path, "other_class.dcm", ge_file, _encoded(other_class))
    return {
        "truncated": (truncated, StoreStatus.CANNOT_UNDERSTAND, "truncated"),
        "garbage": (garbage, StoreStatus.CANNOT_UNDERSTAND, ""),
        "no SOPInstanceUID": (no_uid_path, StoreStatus.CANNOT_UNDERSTAND, "no SOPInstanceUID"),
        "SOP class mismatch": (
            other_class_path,
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            "SOPClassUID",
        ),
    }


@pytest.mark.usefixtures("chunked_send")
def test_malformed_instances_fail_and_the_next_store_succeeds(
    tmp_path: Path, ge_file: Path, ge_t1_dir: Path
) -> None:
    valid = sorted(ge_t1_dir.iterdir())[1:6]
    with running_listener(tmp_path / "lw", f"sqlite:///{tmp_path / 'lw.db'}", free_port()) as lw:
        for index, (what, (path, status, comment)) in enumerate(
            _bad_files(tmp_path, ge_file).items()
        ):
            assoc = _associate(lw.port)
            response = assoc.send_c_store(path)
            assert response.Status == status, what
            assert comment in response.get("ErrorComment", ""), (what, response)
            # The same association goes on working after the failure...
            assert assoc.send_c_store(valid[index]).Status == StoreStatus.SUCCESS, what
            assoc.release()
        # ...and so does a new one.
        assoc = _associate(lw.port)
        assert assoc.send_c_store(valid[-1]).Status == StoreStatus.SUCCESS
        assoc.release()

        assert count_instances(lw.sessions) == len(valid)
        assert len(lw.archived_files()) == len(valid)  # none of the bad data, no temp files


def test_disk_watermark_refuses_with_out_of_resources(
    tmp_path: Path, database_url: str, ge_file: Path
) -> None:
    with running_listener(
        tmp_path / "lw", database_url, free_port(), storage={"min_free_disk_mb": 10**9}
    ) as lw:
        assoc = _associate(lw.port)
        response = assoc.send_c_store(pydicom.dcmread(ge_file))
        assert response.Status == StoreStatus.OUT_OF_RESOURCES
        assert "min_free_disk_mb" in response.ErrorComment
        assert assoc.send_c_echo().Status == StoreStatus.SUCCESS
        assoc.release()
        assert lw.archived_files() == []
        assert count_instances(lw.sessions) == 0


def test_database_failure_fails_the_store_and_the_listener_survives(
    tmp_path: Path, ge_t1_dir: Path
) -> None:
    first, second = sorted(ge_t1_dir.iterdir())[:2]
    with running_listener(tmp_path / "lw", f"sqlite:///{tmp_path / 'lw.db'}", free_port()) as lw:
        assoc = _associate(lw.port)
        assert assoc.send_c_store(pydicom.dcmread(first)).Status == StoreStatus.SUCCESS
        with lw.engine.begin() as connection:
            connection.execute(text("ALTER TABLE instance RENAME TO instance_away"))
        response = assoc.send_c_store(pydicom.dcmread(second))
        assert response.Status == StoreStatus.PROCESSING_FAILURE
        assert "cannot record" in response.ErrorComment
        assert assoc.send_c_echo().Status == StoreStatus.SUCCESS
        assoc.release()
        with lw.engine.begin() as connection:
            connection.execute(text("ALTER TABLE instance_away RENAME TO instance"))
        # The sender retries after the failure: now it is recorded (the file was kept).
        assoc = _associate(lw.port)
        assert assoc.send_c_store(pydicom.dcmread(second)).Status == StoreStatus.SUCCESS
        assoc.release()
        assert count_instances(lw.sessions) == 2
