"""`lesionwatch convert SERIES_DIR OUT.nii.gz`: one DICOM series to a NIfTI file."""

from __future__ import annotations

import logging
from pathlib import Path

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.series_reader import read_series

__all__ = ["convert_series"]

log = logging.getLogger(__name__)

_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def convert_series(
    series_dir: Path, out_path: Path, series_instance_uid: str | None = None
) -> ImageVolume:
    """Read the series in `series_dir` and write it to `out_path` (NIfTI: RAS on disk).

    Raises DicomSeriesError (with the slice and the problem) when the series cannot form
    one regular volume, and ValueError for an output name SimpleITK would not know.
    """
    if not str(out_path).lower().endswith(_VOLUME_SUFFIXES):
        raise ValueError(f"{out_path}: output must end with one of {', '.join(_VOLUME_SUFFIXES)}")
    volume = read_series(series_dir, series_instance_uid=series_instance_uid)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    volume.save(out_path)
    log.info(
        "converted %s to %s (%s voxels, %s)",
        series_dir,
        out_path,
        volume.shape_ijk,
        volume.array.dtype,
    )
    return volume
