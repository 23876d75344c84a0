"""Build a DICOM study (one folder per series) from NIfTI volumes, e.g. the demo study.

The open_ms_data longitudinal images are real clinical MR in scanner space; written with
realistic headers (series_writer) they give the service a study as a scanner would send it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from lesionwatch.config.schema import SeriesClass
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.mr_headers import Vendor
from lesionwatch.dicom_io.series_identity import StudyIdentity
from lesionwatch.dicom_io.series_writer import write_series

__all__ = ["BuiltSeries", "SeriesSpec", "build_study_from_nifti", "open_ms_longitudinal_specs"]

log = logging.getLogger(__name__)

# open_ms_data longitudinal file stems per series class (study{N}_<stem>.nii.gz)
_OPEN_MS_STEMS = {SeriesClass.FLAIR: "FLAIR", SeriesClass.T1_PRE: "T1W", SeriesClass.T2: "T2W"}


@dataclass(frozen=True)
class SeriesSpec:
    """One series to write: which volume, what contrast, and optionally its number/name."""

    nifti_path: Path
    contrast: SeriesClass
    series_number: int | None = None
    series_description: str | None = None


@dataclass(frozen=True)
class BuiltSeries:
    contrast: SeriesClass
    series_number: int
    folder: Path
    files: tuple[Path, ...]
    source: Path


def build_study_from_nifti(
    series: Sequence[SeriesSpec],
    identity: StudyIdentity,
    out_dir: Path,
    *,
    vendor: Vendor = "siemens",
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[BuiltSeries]:
    """Write every spec as a series of one study under `out_dir/<number>_<class>/`.

    Series without a number get 2, 3, ... in the given order (1 is left for a localizer).
    All series share the identity's study and frame of reference UIDs; writing the same
    specs twice gives the same UIDs.
    """
    if not series:
        raise ValueError("no series to write")
    numbers = [spec.series_number or index + 2 for index, spec in enumerate(series)]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"series numbers must differ within a study, got {numbers}")
    built = []
    for spec, number in zip(series, numbers, strict=True):
        if not spec.nifti_path.is_file():
            raise FileNotFoundError(
                f"{spec.contrast.value} volume {spec.nifti_path} does not exist"
            )
        volume = ImageVolume.load(spec.nifti_path)
        folder = out_dir / f"{number:03d}_{spec.contrast.value}"
        files = write_series(
            volume,
            folder,
            contrast=spec.contrast,
            identity=identity,
            series_number=number,
            vendor=vendor,
            series_description=spec.series_description,
            transfer_syntax=transfer_syntax,
        )
        built.append(BuiltSeries(spec.contrast, number, folder, tuple(files), spec.nifti_path))
    log.info(
        "wrote study %s with %d series to %s", identity.study_instance_uid, len(built), out_dir
    )
    return built


def open_ms_longitudinal_specs(patient_dir: Path, study: int) -> list[SeriesSpec]:
    """The FLAIR/T1W/T2W volumes of one open_ms_data longitudinal study that exist."""
    specs = [
        SeriesSpec(patient_dir / f"study{study}_{stem}.nii.gz", contrast)
        for contrast, stem in _OPEN_MS_STEMS.items()
        if (patient_dir / f"study{study}_{stem}.nii.gz").is_file()
    ]
    if not specs:
        raise FileNotFoundError(f"no study{study}_*.nii.gz volumes in {patient_dir}")
    return specs
