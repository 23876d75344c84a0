"""Gather the DICOM instances of a series from a folder, a list of files, or datasets.

Files may be plain DICOM (Part 10) or gzip-compressed DICOM (``.dcm.gz``, as some public
collections ship them); gzip is recognised by its magic bytes, not by the file name.
Anything that is not an image with patient geometry (DICOMDIR, SR, SEG, text files) is
skipped with one log line saying what it was, so a scanner export folder can be read as is.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import SegmentationStorage

from lesionwatch.dicom_io.series_errors import SeriesSelectionError

__all__ = ["SeriesSource", "SourceInstance", "collect_instances", "read_dicom_file"]

log = logging.getLogger(__name__)

SeriesSource = Path | str | Sequence[Path | str] | Sequence[Dataset]

_GZIP_MAGIC = b"\x1f\x8b"
# SOP classes that carry Rows/Columns and plane geometry but are not image volumes to read.
_NOT_VOLUME_SOP_CLASSES = {
    SegmentationStorage,
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map Storage
}


def read_dicom_file(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    """Read one DICOM file, transparently gunzipping it when it is gzip-compressed."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == _GZIP_MAGIC
    if gzipped:
        with gzip.open(path, "rb") as stream:
            return pydicom.dcmread(stream, stop_before_pixels=stop_before_pixels)
    return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)


@dataclass(frozen=True)
class SourceInstance:
    """One image instance: its header (pixel data possibly not yet read) and where it came from."""

    dataset: Dataset
    path: Path | None = None

    def describe(self, frame_number: int | None = None) -> str:
        """'instance 12 (SOP Instance UID ..., file ...)' or 'frame 3 of instance ...'."""
        ds = self.dataset
        parts = [f"SOP Instance UID {ds.get('SOPInstanceUID', '?')}"]
        if self.path is not None:
            parts.append(f"file {self.path}")
        text = f"instance {ds.get('InstanceNumber', '?')} ({', '.join(parts)})"
        return text if frame_number is None else f"frame {frame_number} of {text}"

    def with_pixels(self) -> SourceInstance:
        """The same instance with pixel data loaded (re-reads a header-only file)."""
        if self.path is None or "PixelData" in self.dataset:
            return self
        return SourceInstance(read_dicom_file(self.path), self.path)


def _not_a_volume_reason(ds: Dataset) -> str | None:
    sop_class = str(ds.get("SOPClassUID", ""))
    kind = pydicom.uid.UID(sop_class).name if sop_class else "no SOP Class UID"
    if "Rows" not in ds or "Columns" not in ds:
        return f"not an image ({kind})"
    if sop_class in _NOT_VOLUME_SOP_CLASSES:
        return f"not an acquired image ({kind})"
    if "PerFrameFunctionalGroupsSequence" in ds:
        return None
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        return f"an image without patient geometry ({kind}: no ImagePositionPatient/Orientation)"
    return None


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def collect_instances(source: SeriesSource) -> list[SourceInstance]:
    """Header-only instances of every image in `source`; non-images are logged and skipped."""
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise SeriesSelectionError(f"{path} does not exist")
        paths = _files_under(path) if path.is_dir() else [path]
        items: Sequence[Path | str | Dataset] = paths
    else:
        items = list(source)

    instances: list[SourceInstance] = []
    for item in items:
        if isinstance(item, Dataset):
            instance = SourceInstance(item)
        else:
            file_path = Path(item)
            try:
                header = read_dicom_file(file_path, stop_before_pixels=True)
            except (InvalidDicomError, EOFError, OSError) as exc:
                log.info("ignoring %s: not a readable DICOM file (%s)", file_path, exc)
                continue
            instance = SourceInstance(header, file_path)
        reason = _not_a_volume_reason(instance.dataset)
        if reason is not None:
            where = instance.path if instance.path is not None else instance.describe()
            log.info("ignoring %s: %s", where, reason)
            continue
        instances.append(instance)
    if not instances:
        raise SeriesSelectionError(f"no DICOM image with patient geometry found in {_name(source)}")
    return instances


def _name(source: SeriesSource) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return f"the {len(source)} given inputs"
