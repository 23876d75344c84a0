"""Real inputs for the result-object tests (SEG, SR, secondary capture, JSON).

- A small FLAIR and T1 post-contrast study: a 40x40x20 crop of open_ms_data patient07 (real
  MR, MNI space, 1 mm) written as classic MR series by `series_writer`, with the real
  consensus lesion mask on the same crop (3 lesions, 280 voxels).
- The real Siemens XA30 3D T1 series (sagittal, 96 files of 128x128) with lesions drawn on
  its own grid, for vendor headers and a non-axial, 2 mm grid.
Source series are read back with `read_series`, so the mask grid is the grid the service
itself would derive from the files.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from lesionwatch.config.schema import SeriesClass
from lesionwatch.dicom_io.codes import FindingType
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.results import AlgorithmIdentity, FindingInput, PriorStudyReference
from lesionwatch.dicom_io.series_files import read_dicom_file
from lesionwatch.dicom_io.series_identity import StudyIdentity
from lesionwatch.dicom_io.series_reader import read_series
from lesionwatch.dicom_io.series_writer import write_series
from lesionwatch.pipelines.postprocess import lesion_table

REPO_ROOT = Path(__file__).resolve().parents[3]
PATIENT07 = REPO_ROOT / "tests" / "data" / "open_ms_data" / "cross_sectional" / "patient07"
SIEMENS_T1 = REPO_ROOT / "tests" / "data" / "dicom_t1" / "siemens_xa30_t1_tfl3d"
CROP_KJI = (slice(52, 72), slice(80, 120), slice(76, 116))

FLAIR_MODEL = AlgorithmIdentity("LesionWatch FLAIR lesion U-Net", "1.0.0", "a1" * 32)
NEW_MODEL = AlgorithmIdentity("LesionWatch new lesion U-Net", "1.0.0", "b2" * 32)
ENHANCING_MODEL = AlgorithmIdentity("LesionWatch enhancing lesion U-Net", "1.0.0", "c3" * 32)


def crop(volume: ImageVolume, box: tuple[slice, slice, slice] = CROP_KJI) -> ImageVolume:
    start_ijk = [box[2].start, box[1].start, box[0].start]
    return ImageVolume(
        array=np.ascontiguousarray(volume.array[box]),
        spacing_mm=volume.spacing_mm,
        origin_mm=tuple(volume.index_to_lps(start_ijk)),
        direction=volume.direction,
    )


def read_datasets(paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(path) for path in paths]


def shuffled(datasets: list[Dataset], seed: int = 7) -> list[Dataset]:
    result = list(datasets)
    random.Random(seed).shuffle(result)
    return result


@dataclass(frozen=True)
class Study:
    flair: list[Dataset]
    t1_post: list[Dataset]
    lesion_mask: ImageVolume  # on the FLAIR grid
    new_mask: ImageVolume  # one of the lesions, called new for the test
    enhancing_mask: ImageVolume  # on the T1 post grid (same crop): one lesion, synthetic label
    prior: PriorStudyReference

    def findings(self, *, with_new: bool = True, with_enhancing: bool = True) -> list[FindingInput]:
        findings = [
            FindingInput(
                FindingType.MS_LESION,
                self.flair,
                self.lesion_mask,
                lesion_table(self.lesion_mask),
                FLAIR_MODEL,
            )
        ]
        if with_new:
            findings.append(
                FindingInput(
                    FindingType.NEW_LESION,
                    self.flair,
                    self.new_mask,
                    lesion_table(self.new_mask),
                    NEW_MODEL,
                )
            )
        if with_enhancing:
            findings.append(
                FindingInput(
                    FindingType.ENHANCING_LESION,
                    self.t1_post,
                    self.enhancing_mask,
                    lesion_table(self.enhancing_mask),
                    ENHANCING_MODEL,
                )
            )
        return findings


def identity(seed: str) -> StudyIdentity:
    return StudyIdentity.from_seed(
        seed,
        patient_id="LW-TEST-07",
        patient_name="Test^Patient07",
        birth_date=dt.date(1980, 5, 17),
        sex="F",
        study_date=dt.date(2024, 3, 1),
        accession_number="ACC0007",
        study_description="MR brain MS follow-up",
    )


def build_study(out_dir: Path) -> Study:
    study = identity("patient07-followup")
    mask_full = ImageVolume.load(PATIENT07 / "lesion_mask.nii.gz")
    series: dict[SeriesClass, list[Dataset]] = {}
    for number, (contrast, name) in enumerate(
        [(SeriesClass.FLAIR, "FLAIR"), (SeriesClass.T1_POST, "T1POST")], start=2
    ):
        volume = crop(ImageVolume.load(PATIENT07 / f"{name}.nii.gz"))
        paths = write_series(
            volume, out_dir / name, contrast=contrast, identity=study, series_number=number
        )
        series[contrast] = read_datasets(paths)
    flair_grid = read_series(series[SeriesClass.FLAIR])
    t1_grid = read_series(series[SeriesClass.T1_POST])
    cropped = crop(mask_full)
    assert cropped.same_grid(flair_grid) and cropped.same_grid(t1_grid)
    lesions = (cropped.array > 0).astype(np.uint8)
    table = lesion_table(flair_grid.with_array(lesions))
    # the smallest lesion plays the new one (its voxels only)
    smallest = min(table, key=lambda lesion: lesion.volume_ml)
    new = np.zeros_like(lesions)
    lo, hi = smallest.bbox_min_ijk, smallest.bbox_max_ijk
    box = (slice(lo[2], hi[2] + 1), slice(lo[1], hi[1] + 1), slice(lo[0], hi[0] + 1))
    new[box] = lesions[box]
    largest = max(table, key=lambda lesion: lesion.volume_ml)
    enhancing = np.zeros_like(lesions)
    lo, hi = largest.bbox_min_ijk, largest.bbox_max_ijk
    box = (slice(lo[2], hi[2] + 1), slice(lo[1], hi[1] + 1), slice(lo[0], hi[0] + 1))
    enhancing[box] = lesions[box]
    prior = PriorStudyReference(
        study_instance_uid=identity("patient07-baseline").study_instance_uid,
        study_date="20230301",
    )
    return Study(
        flair=series[SeriesClass.FLAIR],
        t1_post=series[SeriesClass.T1_POST],
        lesion_mask=flair_grid.with_array(lesions),
        new_mask=flair_grid.with_array(new),
        enhancing_mask=t1_grid.with_array(enhancing),
        prior=prior,
    )


def siemens_series() -> list[Dataset]:
    return [read_dicom_file(path) for path in sorted(SIEMENS_T1.glob("*.dcm.gz"))]


def balls(
    grid: ImageVolume, centers_ijk: list[tuple[int, int, int]], radius_mm: float
) -> ImageVolume:
    """Spherical lesions drawn in patient space on `grid`."""
    k, j, i = np.indices(grid.array.shape)
    points = grid.index_to_lps(np.stack([i, j, k], axis=-1).reshape(-1, 3))
    mask = np.zeros(points.shape[0], dtype=bool)
    for center in centers_ijk:
        center_mm = grid.index_to_lps(np.asarray(center, dtype=np.float64))
        mask |= np.linalg.norm(points - center_mm, axis=1) <= radius_mm
    return grid.with_array(mask.reshape(grid.array.shape).astype(np.uint8))
