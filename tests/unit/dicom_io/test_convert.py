"""convert_series: DICOM series to NIfTI, checked with nibabel (RAS) and dcm2niix's reference."""

from __future__ import annotations

import datetime as dt
import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy.spatial.transform import Rotation

from lesionwatch.config.schema import SeriesClass
from lesionwatch.dicom_io.convert import convert_series
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.series_errors import SeriesGeometryError, SeriesSelectionError
from lesionwatch.dicom_io.series_identity import StudyIdentity
from lesionwatch.dicom_io.series_writer import write_series

IDENTITY = StudyIdentity.from_seed(
    "convert-tests",
    patient_id="LW-TEST-3",
    patient_name="Test^Convert",
    birth_date=None,
    sex="",
    study_date=dt.date(2024, 1, 2),
)


def _canonical(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    canonical = nib.as_closest_canonical(image)
    return np.asarray(canonical.dataobj), canonical.affine


def test_written_series_converts_to_the_same_nifti(tmp_path: Path) -> None:
    direction = Rotation.from_euler("xyz", [5.0, -12.0, 20.0], degrees=True).as_matrix()
    direction[:, 0] *= -1
    array = np.random.default_rng(5).integers(0, 900, (12, 32, 30)).astype(np.int16)
    volume = ImageVolume(array, (0.8, 0.9, 2.5), (30.0, -12.0, 5.5), direction)
    write_series(
        volume, tmp_path / "dicom", contrast=SeriesClass.T2, identity=IDENTITY, series_number=2
    )
    out = tmp_path / "out" / "t2.nii.gz"
    returned = convert_series(tmp_path / "dicom", out)
    image = nib.load(out)
    np.testing.assert_array_equal(np.asarray(image.dataobj), array.transpose(2, 1, 0))
    np.testing.assert_allclose(image.affine, volume.affine_ras, atol=1e-4)  # NIfTI holds float32
    np.testing.assert_allclose(returned.affine_lps, volume.affine_lps, atol=1e-6)


def test_siemens_series_matches_committed_dcm2niix_reference(
    siemens_t1_dir: Path, test_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "siemens.nii.gz"
    volume = convert_series(siemens_t1_dir, out)
    ours_data, ours_affine = _canonical(nib.load(out))
    ref_data, ref_affine = _canonical(
        nib.load(test_data / "dicom_t1" / "siemens_xa30_t1_tfl3d.dcm2niix_ref.nii.gz")
    )
    np.testing.assert_array_equal(ours_data, ref_data)
    np.testing.assert_allclose(ours_affine[:3, :3], ref_affine[:3, :3], atol=1e-3, rtol=0)
    # Our slice grid passes through every file's ImagePositionPatient within the 1e-4 mm the
    # scanner rounds to; dcm2niix extrapolates from the first two slices (see integration test).
    for path in sorted(siemens_t1_dir.iterdir())[::19]:
        ds = pydicom.dcmread(io.BytesIO(gzip.decompress(path.read_bytes())))
        k = int(ds.InstanceNumber) - 1
        np.testing.assert_allclose(
            volume.index_to_lps([0, 0, k]), [float(v) for v in ds.ImagePositionPatient], atol=2e-4
        )


def test_refusals_propagate(tmp_path: Path) -> None:
    paths = write_series(
        ImageVolume(np.zeros((5, 32, 32), np.int16), (1, 1, 2), (0, 0, 0)),
        tmp_path / "d",
        contrast=SeriesClass.FLAIR,
        identity=IDENTITY,
        series_number=2,
    )
    with pytest.raises(ValueError, match="must end with"):
        convert_series(tmp_path / "d", tmp_path / "out.png")
    paths[2].unlink()
    with pytest.raises(SeriesGeometryError, match="missing slice"):
        convert_series(tmp_path / "d", tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()
    with pytest.raises(SeriesSelectionError):
        convert_series(tmp_path / "empty", tmp_path / "out.nii.gz")
