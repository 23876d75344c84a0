"""Longitudinal DICOM studies for the prior-search tests (open_ms_data longitudinal patient01).

`study1` is the baseline, `study2` the follow-up of the same patient: real clinical 2D FLAIR
(36 slices) and T1W/T2W in scanner space. `write_study` writes one of them as DICOM with the
identity given, so a test can make a prior, a later study, a study without FLAIR, and so on.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from conftest import TEST_DATA

from lesionwatch.config.schema import SeriesClass
from lesionwatch.dicom_io.series_identity import StudyIdentity, derive_uid
from lesionwatch.dicom_io.study_builder import BuiltSeries, SeriesSpec, build_study_from_nifti

__all__ = ["PATIENT01", "identity", "write_study"]

PATIENT01 = TEST_DATA / "open_ms_data" / "longitudinal" / "patient01"
_STEMS = {SeriesClass.FLAIR: "FLAIR", SeriesClass.T1_PRE: "T1W", SeriesClass.T2: "T2W"}


def identity(
    tag: str,
    study_date: dt.date,
    *,
    patient_id: str = "OMS-LONG-01",
    accession_number: str = "",
    study_time: dt.time = dt.time(9, 30),
) -> StudyIdentity:
    return StudyIdentity(
        patient_id=patient_id,
        patient_name="OpenMS^Patient01",
        birth_date=dt.date(1980, 5, 17),
        sex="F",
        study_instance_uid=derive_uid("prior-search", tag),
        study_date=study_date,
        study_time=study_time,
        accession_number=accession_number,
    )


def write_study(
    who: StudyIdentity,
    volumes: int,
    classes: list[SeriesClass],
    out_dir: Path,
    *,
    crop_mm: float | None = None,
) -> list[BuiltSeries]:
    """open_ms_data patient01 study `volumes` (1 or 2), the given series classes, as DICOM.

    `crop_mm`: keep only the central box of that edge (geometry kept exact), so that the
    pipelines' sliding window needs a single position on CPU (end-to-end tests)."""
    specs = []
    for series_class in classes:
        source = PATIENT01 / f"study{volumes}_{_STEMS[series_class]}.nii.gz"
        if crop_mm is not None:
            cropped = out_dir.with_name(out_dir.name + "-nifti") / source.name
            source = _central_crop(source, crop_mm, cropped)
        specs.append(SeriesSpec(source, series_class))
    return build_study_from_nifti(specs, who, out_dir, vendor="ge")


def _central_crop(source: Path, edge_mm: float, target: Path) -> Path:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    size, spacing = image.GetSize(), image.GetSpacing()
    keep = [min(n, max(1, int(edge_mm / s))) for n, s in zip(size, spacing, strict=True)]
    start = [(n - k) // 2 for n, k in zip(size, keep, strict=True)]
    cropped = image[
        start[0] : start[0] + keep[0],
        start[1] : start[1] + keep[1],
        start[2] : start[2] + keep[2],
    ]
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(cropped, str(target))
    return target
