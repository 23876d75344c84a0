"""read_series: exact geometry, multi-frame, compression, and errors that name the slice."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import logging
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import require_executable
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from scipy.spatial.transform import Rotation

from lesionwatch.config.schema import SeriesClass
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.series_errors import (
    DicomSeriesError,
    SeriesGeometryError,
    SeriesSelectionError,
)
from lesionwatch.dicom_io.series_identity import StudyIdentity, derive_uid
from lesionwatch.dicom_io.series_reader import load_series, read_series
from lesionwatch.dicom_io.series_writer import write_series

IDENTITY = StudyIdentity.from_seed(
    "reader-tests",
    patient_id="LW-TEST-1",
    patient_name="Test^Reader",
    birth_date=dt.date(1980, 2, 3),
    sex="F",
    study_date=dt.date(2024, 5, 6),
)


def _oblique_flipped() -> np.ndarray:
    """An oblique, left-handed direction (slices run against the IOP normal)."""
    direction = Rotation.from_euler("xyz", [12.0, -21.0, 7.0], degrees=True).as_matrix()
    direction[:, 2] *= -1
    return direction


def _volume(dtype: type = np.int16, shape: tuple[int, int, int] = (12, 32, 30)) -> ImageVolume:
    rng = np.random.default_rng(7)
    array = rng.integers(-300, 1200, shape).astype(dtype)
    return ImageVolume(array, (0.7, 0.9, 3.3), (10.5, -20.25, 33.3), _oblique_flipped())


def _write(volume: ImageVolume, folder: Path, series_number: int = 3, **kwargs) -> list[Path]:
    return write_series(
        volume,
        folder,
        contrast=SeriesClass.FLAIR,
        identity=IDENTITY,
        series_number=series_number,
        **kwargs,
    )


def _assert_same(read: ImageVolume, expected: ImageVolume, atol_mm: float = 1e-6) -> None:
    assert read.array.shape == expected.array.shape
    np.testing.assert_array_equal(read.array, expected.array)
    np.testing.assert_allclose(read.affine_lps, expected.affine_lps, atol=atol_mm, rtol=0)


# --- classic series: geometry and inputs ---------------------------------------------------


def test_oblique_flipped_anisotropic_series_reads_back_exactly(tmp_path: Path) -> None:
    volume = _volume()
    paths = _write(volume, tmp_path)
    read = read_series(tmp_path)
    _assert_same(read, volume)
    assert read.array.dtype == np.int16
    assert read.spacing_mm == pytest.approx((0.7, 0.9, 3.3), abs=1e-9)
    # the same from an unordered file list and from in-memory datasets
    _assert_same(read_series(list(reversed(paths))), volume)
    _assert_same(read_series([pydicom.dcmread(p) for p in paths[::-1]]), volume)


def test_slice_axis_comes_from_positions_not_slice_thickness(tmp_path: Path) -> None:
    paths = _write(_volume(), tmp_path)
    for path in paths:  # a scanner's excitation thickness often differs from the spacing
        ds = pydicom.dcmread(path)
        ds.SliceThickness = "5"
        ds.SpacingBetweenSlices = "5"
        ds.save_as(path)
    assert read_series(tmp_path).spacing_mm[2] == pytest.approx(3.3, abs=1e-9)


def test_slices_are_sorted_by_position_not_by_file_name(tmp_path: Path) -> None:
    volume = _volume()
    paths = _write(volume, tmp_path)
    shuffled = [p.rename(p.with_name(f"x{len(paths) - i:03d}.dcm")) for i, p in enumerate(paths)]
    assert len(shuffled) == 12
    _assert_same(read_series(tmp_path), volume)


def test_right_handed_grid_without_instance_numbers_sorts_along_the_normal(tmp_path: Path) -> None:
    direction = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    volume = ImageVolume(_volume().array, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), direction)
    paths = _write(volume, tmp_path)
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.InstanceNumber
        ds.save_as(path)
    _assert_same(read_series(tmp_path), volume)


def test_single_file_is_a_one_slice_volume(tmp_path: Path) -> None:
    volume = _volume()
    paths = _write(volume, tmp_path)
    single = read_series(paths[4])
    assert single.array.shape == (1, 32, 30)
    np.testing.assert_array_equal(single.array[0], volume.array[4])
    np.testing.assert_allclose(single.origin_mm, volume.index_to_lps([0, 0, 4]), atol=1e-9)
    assert single.spacing_mm[2] == pytest.approx(3.3)  # SpacingBetweenSlices: nothing else


def test_float_volume_round_trips_within_quantisation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    array = rng.normal(50.0, 20.0, (12, 32, 30)).astype(np.float32)
    volume = ImageVolume(array, (1.0, 1.0, 1.2), (1.0, 2.0, 3.0), _oblique_flipped())
    _write(volume, tmp_path)
    read = read_series(tmp_path)
    assert read.array.dtype == np.float32
    slope = float(pydicom.dcmread(next(tmp_path.iterdir())).RescaleSlope)
    assert np.abs(read.array - array).max() <= slope / 2 + 1e-5
    np.testing.assert_allclose(read.affine_lps, volume.affine_lps, atol=1e-6)


def test_integer_rescale_returns_float32_real_world_values(tmp_path: Path) -> None:
    array = np.arange(12 * 32 * 30, dtype=np.int32).reshape(12, 32, 30) + 100_000
    volume = ImageVolume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    _write(volume, tmp_path)
    read = read_series(tmp_path)
    assert read.array.dtype == np.float32
    np.testing.assert_array_equal(read.array, array.astype(np.float32))


def test_gzipped_files_are_read_transparently(siemens_t1_dir: Path) -> None:
    loaded = load_series(siemens_t1_dir)
    volume = loaded.volume
    assert volume.array.shape == (96, 128, 128)
    assert volume.array.dtype == np.uint16
    first = pydicom.dcmread(io.BytesIO(gzip.decompress(loaded.slice_files[0].read_bytes())))
    assert int(first.InstanceNumber) == 1  # stack runs the way the scanner numbered it
    np.testing.assert_allclose(volume.origin_mm, [float(v) for v in first.ImagePositionPatient])
    assert volume.spacing_mm == pytest.approx((2.0, 2.0, 2.0), abs=1e-3)


def test_load_series_reports_the_source_of_each_slice(tmp_path: Path) -> None:
    paths = _write(_volume(), tmp_path)
    loaded = load_series(tmp_path)
    assert loaded.slice_files == tuple(paths)
    assert loaded.slice_sop_instance_uids == tuple(
        str(pydicom.dcmread(p).SOPInstanceUID) for p in paths
    )
    assert loaded.frame_of_reference_uid == IDENTITY.frame_of_reference_uid


# --- compressed transfer syntaxes ----------------------------------------------------------


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
@pytest.mark.parametrize("dtype", [np.int16, np.uint16])
def test_compressed_series_read_back_identical(tmp_path: Path, syntax: str, dtype: type) -> None:
    signed = _volume(shape=(6, 32, 32))
    volume = signed.with_array(signed.array.astype(dtype))  # uint16: negatives wrap high
    paths = _write(volume, tmp_path, transfer_syntax=syntax)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    _assert_same(read_series(tmp_path), volume)


def test_dataset_compress_of_written_series_reads_identical(tmp_path: Path) -> None:
    volume = _volume(shape=(6, 32, 32))
    paths = _write(volume, tmp_path / "plain")
    for syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
        datasets = []
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.compress(syntax)
            datasets.append(ds)
        _assert_same(read_series(datasets), volume)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16])
def test_dcmtk_jpeg_lossless_sv1_series_reads_identical(tmp_path: Path, dtype: type) -> None:
    """JPEG Lossless SV1, the syntax PACS most often send, encoded by dcmtk's dcmcjpeg."""
    dcmcjpeg = require_executable("dcmcjpeg")
    signed = _volume(shape=(6, 32, 30))
    volume = signed.with_array(signed.array.astype(dtype))
    for path in _write(volume, tmp_path / "plain"):
        target = tmp_path / "jpeg" / path.name
        target.parent.mkdir(exist_ok=True)
        subprocess.run([dcmcjpeg, "+e1", str(path), str(target)], check=True, capture_output=True)
    syntax = pydicom.dcmread(next((tmp_path / "jpeg").iterdir())).file_meta.TransferSyntaxUID
    assert syntax == JPEGLosslessSV1
    _assert_same(read_series(tmp_path / "jpeg"), volume)


# --- Enhanced MR multi-frame -------------------------------------------------------------


def _enhanced_mr(volume: ImageVolume, slopes: np.ndarray, intercepts: np.ndarray) -> Dataset:
    """An Enhanced MR Image Storage object: per-frame positions and rescale, shared rest."""
    stored = np.round((volume.array - intercepts[:, None, None]) / slopes[:, None, None])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = derive_uid("enhanced", "sop")
    ds.SeriesInstanceUID = derive_uid("enhanced", "series")
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = volume.array.shape[1:]
    ds.NumberOfFrames = volume.array.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [*volume.direction[:, 0], *volume.direction[:, 1]]
    shared.PlaneOrientationSequence = [orientation]
    measures = Dataset()
    measures.PixelSpacing = [volume.spacing_mm[1], volume.spacing_mm[0]]
    measures.SliceThickness = volume.spacing_mm[2]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in range(volume.array.shape[0]):
        frame, position, rescale = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = list(volume.index_to_lps([0, 0, k]))
        rescale.RescaleSlope, rescale.RescaleIntercept = slopes[k], intercepts[k]
        rescale.RescaleType = "US"
        frame.PlanePositionSequence = [position]
        frame.PixelValueTransformationSequence = [rescale]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = stored.astype(np.int16).tobytes()
    return ds


def test_enhanced_mr_multiframe_with_per_frame_rescale(tmp_path: Path) -> None:
    base = _volume(shape=(8, 32, 30))
    slopes = np.linspace(0.5, 2.0, 8)
    intercepts = np.arange(8, dtype=np.float64) * 10
    values = base.array.astype(np.float64) * slopes[:, None, None] + intercepts[:, None, None]
    expected = base.with_array(values.astype(np.float32))
    ds = _enhanced_mr(expected, slopes, intercepts)
    _assert_same(read_series([ds]), expected)
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    loaded = load_series(tmp_path)
    _assert_same(loaded.volume, expected)
    assert loaded.slice_frame_numbers == tuple(range(1, 9))


def test_enhanced_mr_error_names_the_frame() -> None:
    base = _volume(shape=(4, 32, 30))
    ds = _enhanced_mr(base, np.ones(4), np.zeros(4))
    position = ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0]
    ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[
        0
    ].ImagePositionPatient = position.ImagePositionPatient
    with pytest.raises(SeriesGeometryError, match="duplicates the position") as info:
        read_series([ds])
    assert "frame 2 of instance 1" in str(info.value) and "frame 3 of instance 1" in str(info.value)


def _orient_lps(volume: ImageVolume) -> ImageVolume:
    return ImageVolume.from_sitk(sitk.DICOMOrient(volume.to_sitk(), "LPS"))


def test_highdicom_legacy_converted_enhanced_mr_matches_classic(tmp_path: Path) -> None:
    import highdicom as hd

    volume = _volume(shape=(8, 32, 30))
    datasets = [pydicom.dcmread(p) for p in _write(volume, tmp_path)]
    multiframe = hd.legacy.LegacyConvertedEnhancedMRImage(
        datasets,
        series_instance_uid=derive_uid("legacy", "series"),
        series_number=99,
        sop_instance_uid=derive_uid("legacy", "sop"),
        instance_number=1,
    )
    read = read_series([multiframe])
    # highdicom orders frames its own way; the physical image must be the same
    _assert_same(_orient_lps(read), _orient_lps(volume))


# --- refusals that name the slice --------------------------------------------------------


def _label(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return f"instance {ds.InstanceNumber} (SOP Instance UID {ds.SOPInstanceUID}, file {path})"


def test_missing_slice_names_the_neighbours(tmp_path: Path) -> None:
    paths = _write(_volume(), tmp_path)
    paths[5].unlink()
    with pytest.raises(SeriesGeometryError, match="missing slice") as info:
        read_series(tmp_path)
    message = str(info.value)
    assert _label(paths[4]) in message and _label(paths[6]) in message
    assert "about 1 slice(s) missing" in message


def test_duplicate_position_names_both_slices(tmp_path: Path) -> None:
    paths = _write(_volume(), tmp_path)
    ds = pydicom.dcmread(paths[3])
    ds.SOPInstanceUID = derive_uid("duplicate")
    ds.InstanceNumber = 99
    duplicate = tmp_path / "dup.dcm"
    ds.save_as(duplicate)
    with pytest.raises(SeriesGeometryError, match="duplicates the position") as info:
        read_series(tmp_path)
    assert str(duplicate) in str(info.value) and str(paths[3]) in str(info.value)
    assert "instance 99" in str(info.value)


def test_inconsistent_orientation_names_the_slice(tmp_path: Path) -> None:
    paths = _write(_volume(), tmp_path)
    ds = pydicom.dcmread(paths[7])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(paths[7])
    with pytest.raises(SeriesGeometryError, match="inconsistent orientation") as info:
        read_series(tmp_path)
    assert _label(paths[7]) in str(info.value)


def test_different_matrix_size_names_the_slice(tmp_path: Path) -> None:
    paths = _write(_volume(), tmp_path)
    ds = pydicom.dcmread(paths[2])
    ds.Rows = 16
    ds.PixelData = ds.PixelData[: 16 * 30 * 2]
    ds.save_as(paths[2])
    with pytest.raises(SeriesGeometryError, match="16 rows x 30 columns") as info:
        read_series(tmp_path)
    assert _label(paths[2]) in str(info.value)


def test_varying_spacing_is_refused(tmp_path: Path) -> None:
    volume = _volume()
    paths = _write(volume, tmp_path)
    ds = pydicom.dcmread(paths[6])
    shifted = np.asarray(ds.ImagePositionPatient, dtype=float) + 0.4 * volume.direction[:, 2]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in shifted]
    ds.save_as(paths[6])
    with pytest.raises(SeriesGeometryError, match="varying slice spacing") as info:
        read_series(tmp_path)
    assert _label(paths[6]) in str(info.value)


def test_sheared_stack_is_refused(tmp_path: Path) -> None:
    volume = _volume()
    paths = _write(volume, tmp_path)
    for k, path in enumerate(paths):  # gantry tilt: each slice shifts along the columns
        ds = pydicom.dcmread(path)
        position = np.asarray(ds.ImagePositionPatient, dtype=float)
        shifted = position + 0.5 * k * volume.direction[:, 1]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in shifted]
        ds.save_as(path)
    with pytest.raises(SeriesGeometryError, match="off the regular slice grid"):
        read_series(tmp_path)


def test_several_series_are_listed_and_one_can_be_chosen(tmp_path: Path) -> None:
    first = _volume()
    _write(first, tmp_path / "a", series_number=3)
    second = _volume(shape=(5, 32, 30))
    _write(second, tmp_path / "b", series_number=4)
    uid_a = str(pydicom.dcmread(next((tmp_path / "a").iterdir())).SeriesInstanceUID)
    uid_b = str(pydicom.dcmread(next((tmp_path / "b").iterdir())).SeriesInstanceUID)
    with pytest.raises(SeriesSelectionError) as info:
        read_series(tmp_path)
    assert uid_a in str(info.value) and uid_b in str(info.value)
    assert "2 image series" in str(info.value) and "12 instance(s)" in str(info.value)
    _assert_same(read_series(tmp_path, series_instance_uid=uid_b), second)
    with pytest.raises(SeriesSelectionError, match="is not in"):
        read_series(tmp_path, series_instance_uid="1.2.3.4")
    assert issubclass(SeriesSelectionError, DicomSeriesError)


def test_dicomdir_and_other_files_are_ignored_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    volume = _volume(shape=(4, 32, 30))
    fileset = FileSet()
    for path in _write(volume, tmp_path / "export"):
        fileset.add(path)
    media = tmp_path / "media"
    fileset.write(media)
    (media / "README.txt").write_text("exported by a viewer\n")
    with caplog.at_level(logging.INFO, logger="lesionwatch.dicom_io.series_files"):
        _assert_same(read_series(media), volume)
    messages = [record.getMessage() for record in caplog.records]
    assert any("DICOMDIR" in m and "not an image" in m for m in messages)
    assert any("README.txt" in m and "not a readable DICOM file" in m for m in messages)


def test_folder_without_images_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(SeriesSelectionError, match="no DICOM image"):
        read_series(tmp_path)
    with pytest.raises(SeriesSelectionError, match="does not exist"):
        read_series(tmp_path / "missing")
