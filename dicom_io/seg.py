"""DICOM Segmentation in the exact geometry of the source series.

One SEG per source series, one segment per finding type derived from that series (FLAIR:
MS lesions and new lesions; T1 post-contrast: enhancing lesions). Viewer pitfalls avoided:
- every source slice gets a frame for every segment, empty or not (omitting empty frames
  shifted overlays in OHIF);
- one frame per source slice, each frame referencing its source instance, so a frame never
  spans several slices and the plane positions are the source's own.
- 8-bit FRACTIONAL pixels by default (`SegEncoding`): OHIF 3.13 over DICOMweb draws no
  1-bit BINARY SEG whose frames are not a whole number of bytes (it rejects the even-length
  padding of the whole instance, Orthanc refuses single 1-bit frames whose columns are not a
  multiple of 8, and frames starting mid-byte are read in the wrong bit order). BINARY stays
  available, padded with a null byte (highdicom pads odd-length 1-bit data with "0", 0x30).
The mask must already lie on the source grid; `slice_indices` proves that slice by slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from lesionwatch.config.schema import SegEncoding
from lesionwatch.dicom_io.codes import (
    ALGORITHM_FAMILY,
    ANATOMIC_REGION_BRAIN,
    FINDING_CONCEPTS,
    FindingType,
)
from lesionwatch.dicom_io.image_volume import ImageVolume

__all__ = [
    "AlgorithmIdentity",
    "Equipment",
    "SegEncoding",
    "SegmentInput",
    "SegmentationGeometryError",
    "build_segmentation",
    "slice_indices",
    "sort_by_slice",
]

POSITION_TOLERANCE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-4


class SegmentationGeometryError(ValueError):
    """A mask and its source series do not describe the same grid."""


@dataclass(frozen=True)
class AlgorithmIdentity:
    """The algorithm that produced a finding: written into SEG and SR."""

    name: str  # e.g. "LesionWatch FLAIR lesion U-Net"
    version: str  # model/weights version
    model_card_sha256: str  # sha256 of the model card (pins the exact weights + settings)

    def parameters(self) -> dict[str, str]:
        return {"model_card_sha256": self.model_card_sha256}


@dataclass(frozen=True)
class Equipment:
    """The device that creates the result objects (General Equipment module)."""

    manufacturer: str = "LesionWatch"
    model_name: str = "LesionWatch"
    software_versions: str = "0.1.0"
    device_serial_number: str = "1"


@dataclass(frozen=True)
class SegmentInput:
    """One segment: a binary mask of one finding type on the source grid."""

    finding_type: FindingType
    mask: ImageVolume
    algorithm: AlgorithmIdentity
    tracking_uid: str


def _position(ds: Dataset, where: str) -> npt.NDArray[np.float64]:
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword not in ds:
            raise SegmentationGeometryError(f"{where}: source image has no {keyword}")
    return np.asarray(ds.ImagePositionPatient, dtype=np.float64)


def slice_indices(source_series: Sequence[Dataset], grid: ImageVolume) -> list[int]:
    """The k index of `grid` on which each source image lies, in the input (file) order.

    Each ImagePositionPatient is mapped into the grid's index space: it must land on
    i = j = 0 and an integer k, with the grid's in-plane axes and size. Any file order and
    either stacking direction work; a slice off the grid, a duplicate or a gap is an error
    naming the instance.
    """
    if not source_series:
        raise SegmentationGeometryError("the source series is empty")
    to_index = np.linalg.inv(grid.direction * np.asarray(grid.spacing_mm)[None, :])
    n_columns, n_rows, n_slices = grid.shape_ijk
    if len(source_series) != n_slices:
        raise SegmentationGeometryError(
            f"the source series has {len(source_series)} images but the mask has {n_slices} "
            f"slices: the mask is not on this series' grid"
        )
    result: list[int] = []
    seen: dict[int, str] = {}
    for ds in source_series:
        where = f"instance {ds.get('SOPInstanceUID', '?')}"
        position = _position(ds, where)
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        expected = np.concatenate([grid.direction[:, 0], grid.direction[:, 1]])
        if not np.allclose(orientation, expected, atol=ORIENTATION_TOLERANCE):
            raise SegmentationGeometryError(
                f"{where}: ImageOrientationPatient {list(orientation)} differs from the mask "
                f"grid's in-plane axes {expected.round(6).tolist()}"
            )
        if (int(ds.Rows), int(ds.Columns)) != (n_rows, n_columns):
            raise SegmentationGeometryError(
                f"{where}: {ds.Rows}x{ds.Columns} pixels, mask slices are {n_rows}x{n_columns}"
            )
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        if not np.allclose((column_spacing, row_spacing), grid.spacing_mm[:2], atol=1e-4):
            raise SegmentationGeometryError(
                f"{where}: PixelSpacing {[row_spacing, column_spacing]} differs from the mask's "
                f"in-plane spacing {list(grid.spacing_mm[:2])[::-1]}"
            )
        ijk = to_index @ (position - np.asarray(grid.origin_mm))
        k = int(round(ijk[2]))
        offset_mm = np.abs(ijk - (0.0, 0.0, k)) * np.asarray(grid.spacing_mm)
        if offset_mm.max() > POSITION_TOLERANCE_MM or not 0 <= k < n_slices:
            raise SegmentationGeometryError(
                f"{where}: ImagePositionPatient {position.tolist()} is not a slice origin of "
                f"the mask grid (grid index {ijk.round(4).tolist()})"
            )
        if k in seen:
            raise SegmentationGeometryError(f"{where} and {seen[k]} both lie on slice k={k}")
        seen[k] = where
        result.append(k)
    return result


def sort_by_slice(source_series: Sequence[Dataset], grid: ImageVolume) -> list[Dataset]:
    """The source images in grid order (k = 0, 1, ...)."""
    ks = slice_indices(source_series, grid)
    return [ds for _, ds in sorted(zip(ks, source_series, strict=True), key=lambda p: p[0])]


def _segment_description(number: int, segment: SegmentInput) -> hd.seg.SegmentDescription:
    concept = FINDING_CONCEPTS[segment.finding_type]
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=concept.label,
        segmented_property_category=concept.category,
        segmented_property_type=concept.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=segment.algorithm.name,
            family=ALGORITHM_FAMILY,
            version=segment.algorithm.version,
            parameters=segment.algorithm.parameters(),
        ),
        tracking_uid=segment.tracking_uid,
        tracking_id=concept.label,
        anatomic_regions=[ANATOMIC_REGION_BRAIN],
        display_color=hd.color.CIELabColor.from_rgb(*concept.display_rgb),
    )
    if concept.property_type_modifier is not None:
        # highdicom has no argument for it; the attribute is standard (PS3.3 C.8.20.2).
        type_item = description.SegmentedPropertyTypeCodeSequence[0]
        type_item.SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(concept.property_type_modifier)
        ]
    return description


def build_segmentation(
    source_series: Sequence[Dataset],
    segments: Sequence[SegmentInput],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    equipment: Equipment,
    series_description: str = "LesionWatch lesions (computer-generated)",
    encoding: SegEncoding = SegEncoding.FRACTIONAL,
) -> hd.seg.Segmentation:
    """A SEG with segment i+1 = `segments[i]`, one frame per source slice and segment.

    Every pixel is in or out of its segment under either `encoding`: FRACTIONAL stores 0 or
    255 (MaximumFractionalValue 255, SegmentationFractionalType PROBABILITY), BINARY 0 or 1.
    """
    if not segments:
        raise ValueError("build_segmentation needs at least one segment")
    grid = segments[0].mask
    for segment in segments[1:]:
        if not segment.mask.same_grid(grid):
            raise SegmentationGeometryError(
                f"the {segment.finding_type.value} mask is not on the same grid as the "
                f"{segments[0].finding_type.value} mask"
            )
    if len({s.finding_type for s in segments}) != len(segments):
        raise ValueError("each finding type may appear only once in one SEG")
    ks = slice_indices(source_series, grid)
    order = np.argsort(ks)
    sorted_sources = [source_series[int(i)] for i in order]
    sorted_ks = [ks[int(i)] for i in order]
    # (frames, rows, columns, segments): frame f is source image sorted_sources[f]
    labels = np.stack([np.asarray(s.mask.array) > 0 for s in segments], axis=-1)
    in_segment = np.ascontiguousarray(labels[sorted_ks])
    binary = encoding is SegEncoding.BINARY
    seg = hd.seg.Segmentation(
        source_images=sorted_sources,
        # float 0.0/1.0: highdicom scales FRACTIONAL to 0/255; uint8 0/1 for BINARY
        pixel_array=in_segment.astype(np.uint8 if binary else np.float32),
        segmentation_type=(
            hd.seg.SegmentationTypeValues.BINARY
            if binary
            else hd.seg.SegmentationTypeValues.FRACTIONAL
        ),
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        segment_descriptions=[_segment_description(n + 1, s) for n, s in enumerate(segments)],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_versions,
        device_serial_number=equipment.device_serial_number,
        content_label="LESIONS",
        content_description="MS lesion segmentation, computer-generated",
        omit_empty_frames=False,
    )
    seg.SeriesDescription = series_description[:64]
    if binary:
        _null_pad_bits(seg, in_segment.size)
    return seg


def _null_pad_bits(seg: hd.seg.Segmentation, n_pixels: int) -> None:
    """Make the padding byte of odd-length 1-bit PixelData 0x00 (PS3.5 8.1.1).

    highdicom 0.28 appends the character "0" (0x30); the bits past the last pixel are not
    pixels, and a reader that decodes them must find zeros.
    """
    n_bytes = (n_pixels + 7) // 8
    data = bytes(seg.PixelData)
    if len(data) == n_bytes + 1 and n_bytes % 2 == 1:
        seg.PixelData = data[:n_bytes] + b"\x00"
