"""Read one DICOM image series (classic single-frame or Enhanced MR multi-frame) as a volume.

`read_series` returns an ImageVolume in LPS geometry, indexed [k, j, i]: j runs down the
rows, i along a row, k along the stack (see series_geometry for the slice order rule).
Voxels are real-world values: RescaleSlope/Intercept (classic, or the per-frame Pixel Value
Transformation of multi-frame objects) is applied; the result is float32 when any slope is
not 1 or any intercept not 0, otherwise it keeps the stored integer type.
Compressed transfer syntaxes decode through pydicom's plugins (pylibjpeg, pyjpegls, ...).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.series_errors import DicomSeriesError, SeriesSelectionError
from lesionwatch.dicom_io.series_files import SeriesSource, SourceInstance, collect_instances
from lesionwatch.dicom_io.series_geometry import SlicePlane, stack_geometry

__all__ = ["LoadedSeries", "load_series", "read_series"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedSeries:
    """A volume plus, for each k, which instance (and frame) it came from."""

    volume: ImageVolume
    series_instance_uid: str
    frame_of_reference_uid: str | None
    slice_sop_instance_uids: tuple[str, ...]  # per k
    slice_frame_numbers: tuple[int | None, ...]  # per k; 1-based frame in a multi-frame object
    slice_files: tuple[Path | None, ...]  # per k
    header: Dataset  # header of the first instance (no pixel data)


@dataclass(frozen=True)
class _Slice:
    plane: SlicePlane
    instance: int  # index into the instance list
    frame_number: int | None  # 1-based, multi-frame only
    slope: float
    intercept: float


def _floats(values: Any) -> npt.NDArray[np.float64]:
    return np.array([float(v) for v in values], dtype=np.float64)


def _classic_slice(index: int, source: SourceInstance) -> _Slice:
    ds = source.dataset
    label = source.describe()
    if "PixelSpacing" not in ds:
        raise DicomSeriesError(f"{label} has no PixelSpacing")
    nominal = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    plane = SlicePlane(
        label=label,
        order_number=int(ds.InstanceNumber) if ds.get("InstanceNumber") is not None else None,
        position_mm=_floats(ds.ImagePositionPatient),
        orientation=_floats(ds.ImageOrientationPatient),
        pixel_spacing_mm=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        nominal_spacing_mm=float(nominal) if nominal else None,
    )
    return _Slice(
        plane,
        index,
        None,
        float(ds.get("RescaleSlope", 1) or 1),
        float(ds.get("RescaleIntercept", 0) or 0),
    )


def _functional_group(ds: Dataset, frame: Dataset, keyword: str) -> Dataset | None:
    """The item of functional group `keyword` for one frame: per-frame first, then shared."""
    if keyword in frame and len(frame[keyword].value):
        return frame[keyword].value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and keyword in shared[0] and len(shared[0][keyword].value):
        return shared[0][keyword].value[0]
    return None


def _multiframe_slices(index: int, source: SourceInstance) -> list[_Slice]:
    ds = source.dataset
    slices = []
    for number, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        label = source.describe(frame_number=number)
        position = _functional_group(ds, frame, "PlanePositionSequence")
        orientation = _functional_group(ds, frame, "PlaneOrientationSequence")
        measures = _functional_group(ds, frame, "PixelMeasuresSequence")
        if position is None or orientation is None or measures is None:
            raise DicomSeriesError(
                f"{label} lacks PlanePosition, PlaneOrientation or PixelMeasures functional groups"
            )
        rescale = _functional_group(ds, frame, "PixelValueTransformationSequence")
        nominal = measures.get("SpacingBetweenSlices") or measures.get("SliceThickness")
        plane = SlicePlane(
            label=label,
            order_number=number,
            position_mm=_floats(position.ImagePositionPatient),
            orientation=_floats(orientation.ImageOrientationPatient),
            pixel_spacing_mm=(float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1])),
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            nominal_spacing_mm=float(nominal) if nominal else None,
        )
        slope = float(rescale.get("RescaleSlope", 1) or 1) if rescale is not None else 1.0
        intercept = float(rescale.get("RescaleIntercept", 0) or 0) if rescale is not None else 0.0
        slices.append(_Slice(plane, index, number, slope, intercept))
    return slices


def _select_series(
    instances: list[SourceInstance], series_instance_uid: str | None, source: SeriesSource
) -> list[SourceInstance]:
    by_series: dict[str, list[SourceInstance]] = defaultdict(list)
    for instance in instances:
        uid = instance.dataset.get("SeriesInstanceUID")
        if not uid:
            raise DicomSeriesError(f"{instance.describe()} has no SeriesInstanceUID")
        by_series[str(uid)].append(instance)

    def listing() -> str:
        rows = []
        for uid, members in by_series.items():
            ds = members[0].dataset
            rows.append(
                f"  {uid} (series {ds.get('SeriesNumber', '?')} "
                f"'{ds.get('SeriesDescription', '')}', {len(members)} instance(s))"
            )
        return "\n".join(rows)

    where = source if isinstance(source, str | Path) else "the input"
    if series_instance_uid is not None:
        if series_instance_uid not in by_series:
            raise SeriesSelectionError(
                f"series {series_instance_uid} is not in {where}; it holds:\n{listing()}"
            )
        return by_series[series_instance_uid]
    if len(by_series) > 1:
        raise SeriesSelectionError(
            f"{where} holds {len(by_series)} image series; choose one with "
            f"series_instance_uid:\n{listing()}"
        )
    return next(iter(by_series.values()))


def _pixels(source: SourceInstance, frame_number: int | None) -> npt.NDArray[Any]:
    try:
        array = source.with_pixels().dataset.pixel_array
    except Exception as exc:  # decoder plugins raise many types; name the file and syntax
        meta = getattr(source.dataset, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        raise DicomSeriesError(
            f"cannot decode pixel data of {source.describe()} (transfer syntax "
            f"{syntax.name if syntax else 'unknown'}): {exc}"
        ) from exc
    if frame_number is None:
        if array.ndim != 2:
            raise DicomSeriesError(
                f"{source.describe()} is not a single-frame monochrome image (pixel array "
                f"shape {array.shape})"
            )
        return array
    if array.ndim == 2:  # a one-frame multi-frame object
        array = array[None]
    return array[frame_number - 1]


def load_series(source: SeriesSource, *, series_instance_uid: str | None = None) -> LoadedSeries:
    """Read and validate one series; the volume plus where each slice came from."""
    instances = _select_series(collect_instances(source), series_instance_uid, source)
    slices: list[_Slice] = []
    for index, instance in enumerate(instances):
        ds = instance.dataset
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise DicomSeriesError(
                f"{instance.describe()} has {ds.SamplesPerPixel} samples per pixel; only "
                "monochrome images form a volume"
            )
        if "PerFrameFunctionalGroupsSequence" in ds:
            slices.extend(_multiframe_slices(index, instance))
        else:
            slices.append(_classic_slice(index, instance))

    geometry = stack_geometry([s.plane for s in slices])
    ordered = [slices[i] for i in geometry.order]

    loaded: dict[int, SourceInstance] = {}
    planes = []
    for s in ordered:
        if s.instance not in loaded:
            loaded[s.instance] = instances[s.instance].with_pixels()
        planes.append(_pixels(loaded[s.instance], s.frame_number))
    stored = np.stack(planes)
    trivial = all(s.slope == 1.0 and s.intercept == 0.0 for s in ordered)
    if trivial:
        array = stored
    else:
        slopes = np.array([s.slope for s in ordered])[:, None, None]
        intercepts = np.array([s.intercept for s in ordered])[:, None, None]
        array = (stored.astype(np.float64) * slopes + intercepts).astype(np.float32)

    volume = ImageVolume(
        array=array,
        spacing_mm=geometry.spacing_mm,
        origin_mm=geometry.origin_mm,
        direction=geometry.direction,
    )
    header = instances[0].dataset
    series_uid = str(header.SeriesInstanceUID)
    log.info(
        "read series %s: %d slice(s) from %d instance(s), shape (i,j,k)=%s, spacing %s mm",
        series_uid,
        len(ordered),
        len(instances),
        geometry.shape_ijk,
        tuple(round(v, 4) for v in geometry.spacing_mm),
    )
    return LoadedSeries(
        volume=volume,
        series_instance_uid=series_uid,
        frame_of_reference_uid=str(header.FrameOfReferenceUID)
        if header.get("FrameOfReferenceUID")
        else None,
        slice_sop_instance_uids=tuple(
            str(instances[s.instance].dataset.SOPInstanceUID) for s in ordered
        ),
        slice_frame_numbers=tuple(s.frame_number for s in ordered),
        slice_files=tuple(instances[s.instance].path for s in ordered),
        header=header,
    )


def read_series(
    source: Path | str | Sequence[Path | str] | Sequence[Dataset],
    *,
    series_instance_uid: str | None = None,
) -> ImageVolume:
    """The image volume of the one series in `source` (a folder, files, or datasets).

    Raises SeriesGeometryError when the slices do not form a regular grid, and
    SeriesSelectionError when there is no image series, or several and none was chosen.
    """
    return load_series(source, series_instance_uid=series_instance_uid).volume
