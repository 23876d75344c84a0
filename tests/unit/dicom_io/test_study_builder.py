"""build_study_from_nifti: the demo study from open_ms_data, written and read back exactly."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lesionwatch.config.schema import SeriesClass
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.series_identity import StudyIdentity
from lesionwatch.dicom_io.series_reader import read_series
from lesionwatch.dicom_io.study_builder import (
    SeriesSpec,
    build_study_from_nifti,
    open_ms_longitudinal_specs,
)

IDENTITY = StudyIdentity.from_seed(
    "open-ms-patient01-study2",
    patient_id="LW-DEMO-01",
    patient_name="Demo^Patient01",
    birth_date=dt.date(1975, 3, 14),
    sex="F",
    study_date=dt.date(2024, 6, 1),
    accession_number="DEMO0102",
    study_description="MRI brain MS follow-up",
)


def test_open_ms_study_becomes_one_dicom_study(test_data: Path, tmp_path: Path) -> None:
    patient = test_data / "open_ms_data" / "longitudinal" / "patient01"
    specs = open_ms_longitudinal_specs(patient, 2)
    assert [s.contrast for s in specs] == [SeriesClass.FLAIR, SeriesClass.T1_PRE, SeriesClass.T2]
    built = build_study_from_nifti(specs, IDENTITY, tmp_path)
    assert [b.folder.name for b in built] == ["002_FLAIR", "003_T1_PRE", "004_T2"]
    headers = [pydicom.dcmread(b.files[0], stop_before_pixels=True) for b in built]
    assert len({h.StudyInstanceUID for h in headers}) == 1
    assert len({h.FrameOfReferenceUID for h in headers}) == 1
    assert len({h.SeriesInstanceUID for h in headers}) == 3
    assert headers[0].SeriesDescription == "t2_tirm_tra_dark-fluid"  # 3 mm slices: 2-D FLAIR
    for series in built:  # the real oblique clinical volumes come back voxel- and mm-exact
        source = ImageVolume.load(series.source)
        read = read_series(series.folder)
        np.testing.assert_array_equal(read.array, source.array)
        np.testing.assert_allclose(read.affine_lps, source.affine_lps, atol=1e-6, rtol=0)


def test_duplicate_series_numbers_and_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="series numbers must differ"):
        build_study_from_nifti(
            [
                SeriesSpec(tmp_path / "a.nii.gz", SeriesClass.FLAIR, 3),
                SeriesSpec(tmp_path / "b.nii.gz", SeriesClass.T2, 3),
            ],
            IDENTITY,
            tmp_path,
        )
    with pytest.raises(FileNotFoundError, match="a.nii.gz"):
        build_study_from_nifti(
            [SeriesSpec(tmp_path / "a.nii.gz", SeriesClass.FLAIR)], IDENTITY, tmp_path
        )
    with pytest.raises(FileNotFoundError, match="study7"):
        open_ms_longitudinal_specs(tmp_path, 7)
