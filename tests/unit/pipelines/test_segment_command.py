"""`lesionwatch segment flair` on a DICOM series: mask on the series' own grid, lesion table,
and the SEG/SR/fallback objects it would send (--dicom-out), with a U-Net of known output."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from known_unet import intensity_threshold_unet

from lesionwatch.config.schema import SeriesClass
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.series_identity import StudyIdentity, derive_uid
from lesionwatch.dicom_io.series_writer import write_series
from lesionwatch.models.weights import save_model
from lesionwatch.service.cli import main

PATIENT07 = Path(__file__).resolve().parents[2] / "data/open_ms_data/cross_sectional/patient07"


@pytest.fixture
def flair_series(tmp_path: Path) -> Path:
    crop = sitk.ReadImage(str(PATIENT07 / "FLAIR.nii.gz"))[50:130, 60:150, 40:100]
    identity = StudyIdentity(
        patient_id="OMS-CROSS-07",
        patient_name="OpenMS^Patient07",
        birth_date=None,
        sex="",
        study_instance_uid=derive_uid("segment-test", "p07"),
        study_date=dt.date(2025, 6, 3),
        study_time=dt.time(10, 0),
    )
    out = tmp_path / "flair"
    write_series(
        ImageVolume.from_sitk(crop),
        out,
        contrast=SeriesClass.FLAIR,
        identity=identity,
        series_number=3,
    )
    return out


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "weights" / "flair.pt"
    save_model(
        intensity_threshold_unet(2.0, 4.0), path, task="flair", channels=("flair",), version="test",
        training_data="none: weights set by hand for a plumbing test", patch_size_mm=32,
    )  # fmt: skip
    return path


def test_segment_flair_dicom_in_mask_table_and_dicom_out(
    tmp_path: Path, flair_series: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "lw.yaml"
    config.write_text("inference: {device: cpu, patch_size_mm: 32, step_mm: 16}\n")
    out = tmp_path / "out"
    status = main(
        [
            "segment", "flair", "--flair", str(flair_series), "--weights", str(weights),
            "--out", str(out / "mask.nii.gz"), "--table", str(out / "lesions.csv"),
            "--dicom-out", str(out / "dicom"), "--config", str(config),
        ]
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "lesions" in printed and "time per step" in printed

    from lesionwatch.dicom_io.series_reader import read_series

    source = read_series(flair_series)
    mask = ImageVolume.load(out / "mask.nii.gz")
    assert mask.same_grid(source)
    assert mask.array.sum() > 0
    with (out / "lesions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) > 0

    objects = [pydicom.dcmread(p) for p in sorted((out / "dicom").glob("*.dcm"))]
    sop_classes = {ds.SOPClassUID.name for ds in objects}
    assert sop_classes == {
        "Segmentation Storage",
        "Comprehensive 3D SR Storage",
        "Secondary Capture Image Storage",
    }
    seg = next(ds for ds in objects if ds.Modality == "SEG")
    assert seg.StudyInstanceUID == source_study_uid(flair_series)
    report = json.loads((out / "dicom" / "lesionwatch-results.json").read_text())
    lesion_rows = report["findings"]["ms_lesion"]["lesions"]
    assert len(lesion_rows) == len(rows)

    # a second run gives the same UIDs (deterministic outputs: a re-send replaces)
    again = tmp_path / "again"
    assert main(
        [
            "segment", "flair", "--flair", str(flair_series), "--weights", str(weights),
            "--out", str(again / "mask.nii.gz"), "--dicom-out", str(again / "dicom"),
            "--config", str(config),
        ]
    ) == 0  # fmt: skip
    assert sorted(p.name for p in (again / "dicom").glob("*.dcm")) == sorted(
        p.name for p in (out / "dicom").glob("*.dcm")
    )
    assert np.array_equal(ImageVolume.load(again / "mask.nii.gz").array, mask.array)


def source_study_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def test_segment_flair_explains_missing_weights_and_nifti_with_dicom_out(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flair = PATIENT07 / "FLAIR.nii.gz"
    assert main(["segment", "flair", "--flair", str(flair), "--out", str(tmp_path / "m.nii.gz"),
                 "--weights", str(tmp_path / "none.pt")]) == 2  # fmt: skip
    assert "no weights for the flair pipeline" in capsys.readouterr().err
    assert main(["segment", "flair", "--flair", str(flair), "--out", str(tmp_path / "m.nii.gz"),
                 "--weights", str(weights), "--dicom-out", str(tmp_path / "d")]) == 2  # fmt: skip
    assert "--dicom-out needs the FLAIR as a DICOM series" in capsys.readouterr().err
