"""Checks on received data sets: what can never be an instance is refused before archiving."""

from __future__ import annotations

import copy
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from lesionwatch.dicom_io.received_header import (
    DataSetTooLargeError,
    UnreadableDataSetError,
    read_received_header,
)

_OFFSET = 10  # the data set follows other bytes in a spool file (preamble and meta)


@pytest.fixture(scope="module")
def image(ge_t1_dir: Path) -> Dataset:
    return pydicom.dcmread(sorted(ge_t1_dir.iterdir())[0])


def _encode(dataset: Dataset, implicit: bool) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def _read(tmp_path: Path, data: bytes, syntax: UID, max_bytes: int = 2**30) -> Dataset:
    path = tmp_path / "spool.tmp"
    path.write_bytes(b"x" * _OFFSET + data)
    return read_received_header(path, _OFFSET, syntax, max_bytes)


def test_a_valid_image_reads_with_its_pixel_data_left_on_disk(
    tmp_path: Path, image: Dataset
) -> None:
    dataset = _read(tmp_path, _encode(image, implicit=False), ExplicitVRLittleEndian)
    assert dataset.SOPInstanceUID == image.SOPInstanceUID
    pixel = dataset._dict[pydicom.tag.Tag("PixelData")]
    assert pixel.value is None and pixel.length == len(image.PixelData)  # deferred


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: setattr(d, "PixelData", d.PixelData[:-100]), "pixel data holds"),
        (lambda d: setattr(d, "PixelData", b""), "empty pixel data"),
        (lambda d: setattr(d, "Rows", 65535), "pixel data holds"),
        (lambda d: setattr(d, "NumberOfFrames", 2**31 - 1), "pixel data holds"),
        (lambda d: setattr(d, "BitsAllocated", 12), "BitsAllocated"),
        (lambda d: setattr(d, "Columns", 0), "image of"),
        (lambda d: delattr(d, "PixelData"), "no pixel data"),
        (lambda d: setattr(d, "NumberOfFrames", 0), "0 frames"),
        (lambda d: delattr(d, "Columns"), "image of"),
        (lambda d: d.update({"BitsAllocated": 8, "BitsStored": 8}), "pixel data holds"),
        (lambda d: setattr(d, "BitsStored", 17), "BitsStored"),
    ],
)
def test_images_that_cannot_be_images_are_refused(
    tmp_path: Path, image: Dataset, change: object, reason: str
) -> None:
    broken = copy.deepcopy(image)
    change(broken)  # type: ignore[operator]
    with pytest.raises(UnreadableDataSetError, match=reason):
        _read(tmp_path, _encode(broken, implicit=False), ExplicitVRLittleEndian)


@pytest.mark.parametrize("cut", [1, 7, 100, 5000])
def test_truncated_data_sets_are_refused(tmp_path: Path, image: Dataset, cut: int) -> None:
    data = _encode(image, implicit=True)
    with pytest.raises(UnreadableDataSetError, match="truncated|pixel data"):
        _read(tmp_path, data[:-cut], ImplicitVRLittleEndian)


def test_a_data_set_cut_before_its_pixel_data_is_refused(tmp_path: Path, image: Dataset) -> None:
    data = _encode(image, implicit=False)
    cut = data[: data.index(struct.pack("<HH", 0x7FE0, 0x0010))]
    with pytest.raises(UnreadableDataSetError, match="no pixel data"):
        _read(tmp_path, cut, ExplicitVRLittleEndian)


def test_vr_encoding_must_match_the_presentation_context(tmp_path: Path, image: Dataset) -> None:
    with pytest.raises(UnreadableDataSetError, match="explicit VR data set on an implicit"):
        _read(tmp_path, _encode(image, implicit=False), ImplicitVRLittleEndian)
    with pytest.raises(UnreadableDataSetError, match="implicit VR data set on an explicit"):
        _read(tmp_path, _encode(image, implicit=True), ExplicitVRLittleEndian)


def test_undefined_length_on_a_non_sequence_element_is_refused(tmp_path: Path) -> None:
    # (0008,0016) SOP Class UID with an undefined length, in implicit VR.
    element = struct.pack("<HHL", 0x0008, 0x0016, 0xFFFFFFFF) + b"1.2.3\x00"
    delimiter = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    with pytest.raises(UnreadableDataSetError, match="undefined length"):
        _read(tmp_path, element + delimiter, ImplicitVRLittleEndian)


def test_a_deflate_bomb_is_refused_at_the_limit(tmp_path: Path, image: Dataset) -> None:
    bomb = copy.deepcopy(image)
    bomb.Rows, bomb.Columns = 4096, 4096
    bomb.PixelData = bytes(4096 * 4096 * 2)  # 32 MiB of zeros
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = compressor.compress(_encode(bomb, implicit=False)) + compressor.flush()
    assert len(data) < 2**20
    with pytest.raises(DataSetTooLargeError, match="inflated"):
        _read(tmp_path, data, DeflatedExplicitVRLittleEndian, max_bytes=8 * 2**20)
    assert [path.name for path in tmp_path.iterdir()] == ["spool.tmp"]  # inflated copy gone
    dataset = _read(tmp_path, data, DeflatedExplicitVRLittleEndian, max_bytes=64 * 2**20)
    assert dataset.Rows == 4096


def test_corrupt_deflate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnreadableDataSetError, match="deflated"):
        _read(tmp_path, b"\xff" * 64, DeflatedExplicitVRLittleEndian)


def test_a_little_excess_pixel_data_is_tolerated(tmp_path: Path, image: Dataset) -> None:
    padded = copy.deepcopy(image)
    padded.PixelData = image.PixelData + bytes(64)  # some devices pad; dcmtk reads it
    assert _read(tmp_path, _encode(padded, implicit=False), ExplicitVRLittleEndian).Rows


@pytest.mark.parametrize("vr", [b"ZZ", b"\x01\x02"])
def test_an_element_without_a_valid_vr_is_refused(
    tmp_path: Path, image: Dataset, vr: bytes
) -> None:
    # pydicom reads past it by guessing, dcmtk does not: they would disagree on what follows.
    data = bytearray(_encode(image, implicit=False))
    modality = data.index(struct.pack("<HH", 0x0008, 0x0060) + b"CS")
    data[modality + 4 : modality + 6] = vr
    with pytest.raises(UnreadableDataSetError, match="valid VR|truncated|parsed"):
        _read(tmp_path, bytes(data), ExplicitVRLittleEndian)
