"""Real associations to the listener: real Siemens and GE series archived and recorded."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from conftest import free_port, require_executable
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import MRImageStorage
from scp_harness import (
    count_instances,
    gunzip_series,
    run_storescu,
    running_listener,
    sop_instance_uids,
)
from sqlalchemy import select

from lesionwatch.service.db.models import Instance, Series, Study, StudyState
from lesionwatch.service.ingest import RecordResult

pytestmark = pytest.mark.integration


def _dataset_bytes(path: Path) -> bytes:
    """The encoded data set after the File Meta Information."""
    data = path.read_bytes()
    meta = read_file_meta_info(path)
    return data[132 + 12 + int(meta.FileMetaInformationGroupLength) :]


@pytest.fixture(scope="module")
def siemens_files(tmp_path_factory: pytest.TempPathFactory, siemens_t1_dir: Path) -> Path:
    return gunzip_series(siemens_t1_dir, tmp_path_factory.mktemp("siemens"))


def test_storescu_series_are_archived_and_recorded(
    tmp_path: Path, database_url: str, siemens_files: Path, ge_t1_dir: Path
) -> None:
    require_executable("storescu")
    sent = sop_instance_uids(siemens_files) | sop_instance_uids(ge_t1_dir)
    with running_listener(tmp_path / "lw", database_url, free_port()) as listener:
        result = run_storescu(listener.port, siemens_files, ge_t1_dir)
        assert result.returncode == 0, result.stderr

        with listener.sessions() as session:
            rows = session.scalars(select(Instance)).all()
            assert {row.sop_instance_uid for row in rows} == sent
            series = session.scalars(select(Series)).all()
            assert len(series) == 2
            assert {s.manufacturer.split()[0].upper() for s in series} == {"SIEMENS", "GE"}
            assert all(s.classification_reason for s in series)
            assert len(session.scalars(select(Study)).all()) == 2
            for row in rows:
                archived = listener.archive_root / row.path
                assert archived.is_file()
                assert row.size_bytes == archived.stat().st_size
                assert row.calling_ae_title == "STORESCU"

        # Every file holds exactly the sent instance: same elements, same pixel bytes, and meta
        # naming the same SOP class, instance and transfer syntax as the source file.
        sources = list(siemens_files.iterdir()) + list(ge_t1_dir.iterdir())
        with listener.sessions() as session:
            paths = {r.sop_instance_uid: r.path for r in session.scalars(select(Instance))}
        for source_path in sources:
            source = pydicom.dcmread(source_path)
            stored = pydicom.dcmread(listener.archive_root / paths[source.SOPInstanceUID])
            assert stored == source, source_path.name
            assert stored.PixelData == source.PixelData
            for keyword in (
                "MediaStorageSOPClassUID",
                "MediaStorageSOPInstanceUID",
                "TransferSyntaxUID",
            ):
                assert stored.file_meta[keyword].value == source.file_meta[keyword].value
            assert stored.file_meta.SourceApplicationEntityTitle == "STORESCU"

        # A second identical send (of one series, to keep the test short): one copy, one row.
        files_before = {p: p.read_bytes() for p in listener.archived_files()}
        again = run_storescu(listener.port, siemens_files)
        assert again.returncode == 0, again.stderr
        assert {p: p.read_bytes() for p in listener.archived_files()} == files_before
        assert count_instances(listener.sessions) == len(sent)


def test_raw_bytes_are_archived_unchanged(
    tmp_path: Path, database_url: str, ge_t1_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunked sending streams the file's data set bytes as they are (storescu re-encodes).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    files = sorted(ge_t1_dir.iterdir())[:3]
    with running_listener(tmp_path / "lw", database_url, free_port()) as listener:
        ae = AE(ae_title="RAWSCU")
        ae.add_requested_context(MRImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="LESIONWATCH")
        assert assoc.is_established
        try:
            for path in files:
                assert assoc.send_c_store(path).Status == 0
        finally:
            assoc.release()
        archived = {p.stem: p for p in listener.archived_files()}
        for path in files:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert _dataset_bytes(archived[uid]) == _dataset_bytes(path)


def test_concurrent_associations_of_one_series_record_each_row_once(
    tmp_path: Path, database_url: str, ge_t1_dir: Path
) -> None:
    """Two senders race with the same series: rows stay unique, every instance is recorded."""
    files = sorted(ge_t1_dir.iterdir())[:24]
    outcomes: list[list[int]] = []

    def send(subset: list[Path]) -> None:
        ae = AE(ae_title="PARALLEL")
        ae.add_requested_context(MRImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="LESIONWATCH")
        statuses = [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in subset]
        assoc.release()
        outcomes.append(statuses)

    port = free_port()
    with running_listener(tmp_path / "lw", database_url, port) as listener:
        # Both threads send the full list (overlapping instances) in opposite orders.
        threads = [
            threading.Thread(target=send, args=(files,)),
            threading.Thread(target=send, args=(files[::-1],)),
            threading.Thread(target=send, args=(files[::2],)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert [set(statuses) for statuses in outcomes] == [{0}, {0}, {0}]
        assert count_instances(listener.sessions) == len(files)
        with listener.sessions() as session:
            assert len(session.scalars(select(Series)).all()) == 1
            assert len(session.scalars(select(Study)).all()) == 1
        assert len(listener.archived_files()) == len(files)


def test_resend_with_changed_content_replaces_file_and_row(
    tmp_path: Path, database_url: str, ge_t1_dir: Path
) -> None:
    path = sorted(ge_t1_dir.iterdir())[0]
    original = pydicom.dcmread(path)
    changed = pydicom.dcmread(path)
    changed.SeriesDescription = "corrected at the modality"

    with running_listener(tmp_path / "lw", database_url, free_port()) as listener:
        ae = AE(ae_title="RESEND")
        ae.add_requested_context(MRImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="LESIONWATCH")
        assert assoc.send_c_store(original).Status == 0
        with listener.sessions() as session:
            first_sha = session.scalars(select(Instance)).one().sha256
        assert assoc.send_c_store(changed).Status == 0
        assoc.release()

        [archived] = listener.archived_files()
        assert pydicom.dcmread(archived).SeriesDescription == "corrected at the modality"
        with listener.sessions() as session:
            row = session.scalars(select(Instance)).one()
            assert row.sha256 != first_sha
            assert row.size_bytes == archived.stat().st_size


# dcmtk writes the syntaxes pydicom has no encoder (or no endianness conversion) for.
_DCMTK_ENCODERS = {
    ImplicitVRLittleEndian: ("dcmconv", "+ti"),
    ExplicitVRBigEndian: ("dcmconv", "+tb"),
    DeflatedExplicitVRLittleEndian: ("dcmconv", "+td"),
    JPEGLosslessSV1: ("dcmcjpeg", "+e1"),
}


def _encode_as(source: Path, transfer_syntax: pydicom.uid.UID, target: Path) -> Path:
    """``source`` as a new instance (new SOP Instance UID) encoded in ``transfer_syntax``."""
    dataset = pydicom.dcmread(source)
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if transfer_syntax in _DCMTK_ENCODERS:
        tool, option = _DCMTK_ENCODERS[transfer_syntax]
        plain = target.with_suffix(".plain.dcm")
        dataset.save_as(plain, enforce_file_format=True)
        subprocess.run([require_executable(tool), option, str(plain), str(target)], check=True)
    else:
        dataset.compress(transfer_syntax)
        dataset.save_as(target, enforce_file_format=True)
    assert pydicom.dcmread(target).file_meta.TransferSyntaxUID == transfer_syntax
    return target


STORED_AS_RECEIVED = [
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
]


def test_every_transfer_syntax_is_stored_as_received(
    tmp_path: Path, ge_t1_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    source = sorted(ge_t1_dir.iterdir())[0]
    files = [
        _encode_as(source, transfer_syntax, tmp_path / f"{index}.dcm")
        for index, transfer_syntax in enumerate(STORED_AS_RECEIVED)
    ]

    with running_listener(tmp_path / "lw", f"sqlite:///{tmp_path / 'lw.db'}", free_port()) as lw:
        ae = AE(ae_title="CODECS")
        for transfer_syntax in STORED_AS_RECEIVED:
            ae.add_requested_context(MRImageStorage, transfer_syntax)
        assoc = ae.associate("127.0.0.1", lw.port, ae_title="LESIONWATCH")
        assert assoc.is_established
        for path in files:
            assert assoc.send_c_store(path).Status == 0, path
        assoc.release()
        with lw.sessions() as session:
            rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
        for path, transfer_syntax in zip(files, STORED_AS_RECEIVED, strict=True):
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            archived = lw.archive_root / rows[uid].path
            assert rows[uid].transfer_syntax_uid == transfer_syntax
            assert pydicom.dcmread(archived).file_meta.TransferSyntaxUID == transfer_syntax
            assert _dataset_bytes(archived) == _dataset_bytes(path), transfer_syntax.name


def test_recording_reports_new_study_series_and_series_after_assembly(
    tmp_path: Path, database_url: str, ge_t1_dir: Path
) -> None:
    first, second = (pydicom.dcmread(p) for p in sorted(ge_t1_dir.iterdir())[:2])
    late = pydicom.dcmread(sorted(ge_t1_dir.iterdir())[2])
    late.SeriesInstanceUID = generate_uid()
    late.SeriesDescription = "late reformat"
    results: list[RecordResult] = []

    with running_listener(
        tmp_path / "lw", database_url, free_port(), on_recorded=results.append
    ) as listener:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(MRImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="LESIONWATCH")
        assert assoc.send_c_store(first).Status == 0
        with listener.sessions() as session, session.begin():
            study = session.scalars(select(Study)).one()
            study.state = StudyState.READY  # as the assembler would
        assert assoc.send_c_store(second).Status == 0
        assert assoc.send_c_store(late).Status == 0
        assoc.release()

        assert [(r.new_study, r.new_series, r.new_series_after_assembly) for r in results] == [
            (True, True, False),
            (False, False, False),
            (False, True, True),
        ]
        assert results[0].series_class is not None and results[1].series_class is None
        with listener.sessions() as session:
            assert session.scalars(select(Study)).one().state is StudyState.READY
            series = session.scalars(select(Series).order_by(Series.id)).all()
            assert [s.series_description for s in series][1] == "late reformat"
            assert all(s.classification_reason for s in series)
