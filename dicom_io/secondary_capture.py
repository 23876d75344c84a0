"""Secondary-capture fallback: lesion outlines burned onto the source slices.

For PACS and viewers that cannot display SEG. Each image is an RGB copy of one source slice
(windowed as the source says), enlarged so outlines and text stay legible, with:
- the outline of every finding type in its colour (the SEG display colours);
- a black banner above the anatomy saying it is a computer-generated result, not for
  diagnosis alone, with algorithm, slice number and a colour legend;
- BurnedInAnnotation YES, ImageType DERIVED\\SECONDARY and a reference to the source image.
By default only slices that show a lesion are rendered (plus the middle slice when there is
none, so the reader still sees the result); `all_slices` renders every slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

from lesionwatch.dicom_io.codes import FINDING_CONCEPTS, FindingType
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.seg import Equipment, SegmentationGeometryError, slice_indices

__all__ = [
    "BANNER_TEXT",
    "OverlayLayer",
    "build_secondary_captures",
    "patient_orientation",
    "render_slice",
]

BANNER_TEXT = "COMPUTER-GENERATED RESULT - NOT FOR DIAGNOSIS ALONE"
MIN_DISPLAY_SIZE_PX = 384  # enlarge small matrices (e.g. 128x128) to at least this long side


@dataclass(frozen=True)
class OverlayLayer:
    """One finding type to outline, as a mask on the source grid."""

    finding_type: FindingType
    mask: ImageVolume
    lesion_count: int  # from the lesion table, so the banner agrees with SR and JSON


def patient_orientation(ds: Dataset) -> tuple[str, str]:
    """PatientOrientation (row direction, column direction) letters from the orientation."""
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)

    def letters(vector: npt.NDArray[np.float64]) -> str:
        names = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x, +y, -y, +z, -z in LPS
        order = np.argsort(-np.abs(vector))
        chosen = [names[a][0 if vector[a] > 0 else 1] for a in order if abs(vector[a]) > 1e-3]
        return "".join(chosen[:3])

    return letters(orientation[:3]), letters(orientation[3:])


def _window(source: Dataset, volume: npt.NDArray[np.float64]) -> tuple[float, float]:
    """(low, high) display range: the slice's own first VOI window, else series percentiles."""
    if "WindowCenter" in source and "WindowWidth" in source:
        center, width = source.WindowCenter, source.WindowWidth
        center = float(center[0] if isinstance(center, Sequence) else center)
        width = float(width[0] if isinstance(width, Sequence) else width)
        if width > 1:
            return center - width / 2, center + width / 2
    low, high = np.percentile(volume, [0.5, 99.5])
    return float(low), float(max(high, low + 1))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render_slice(
    gray: npt.NDArray[np.float64],
    window: tuple[float, float],
    outlines: Sequence[tuple[FindingType, npt.NDArray[np.bool_]]],
    header_lines: Sequence[str],
) -> npt.NDArray[np.uint8]:
    """An RGB image: banner on top, the slice below with outlines burned in."""
    low, high = window
    scaled = np.clip((gray - low) / (high - low), 0, 1) * 255
    factor = max(1, int(np.ceil(MIN_DISPLAY_SIZE_PX / max(gray.shape))))
    image = Image.fromarray(scaled.astype(np.uint8), mode="L").resize(
        (gray.shape[1] * factor, gray.shape[0] * factor), Image.Resampling.BILINEAR
    )
    rgb = np.asarray(image.convert("RGB")).copy()
    thickness = max(1, factor // 2)
    for finding_type, mask in outlines:
        big = np.kron(mask.astype(np.uint8), np.ones((factor, factor), np.uint8)).astype(bool)
        edge = big & ~ndimage.binary_erosion(big, iterations=thickness, border_value=0)
        rgb[edge] = FINDING_CONCEPTS[finding_type].display_rgb

    width = rgb.shape[1]
    font_px = max(10, width // 32)
    line_px = int(font_px * 1.4)
    n_lines = 2 + len(header_lines)  # warning, header lines, colour legend
    banner = Image.new("RGB", (width, line_px * n_lines + font_px // 2), "black")
    draw = ImageDraw.Draw(banner)
    font = _font(font_px)
    margin = font_px // 2
    draw.text((margin, font_px // 4), BANNER_TEXT, fill=(255, 255, 0), font=font)
    for n, line in enumerate(header_lines, start=1):
        draw.text((margin, font_px // 4 + n * line_px), line, fill="white", font=font)
    x, y = margin, font_px // 4 + (n_lines - 1) * line_px
    for finding_type, _ in outlines:
        concept = FINDING_CONCEPTS[finding_type]
        draw.rectangle((x, y + 2, x + font_px - 2, y + font_px), fill=concept.display_rgb)
        x += font_px + 4
        draw.text((x, y), concept.label, fill="white", font=font)
        x += int(draw.textlength(concept.label, font=font)) + font_px
    return np.concatenate([np.asarray(banner), rgb], axis=0).astype(np.uint8)


def build_secondary_captures(
    source_series: Sequence[Dataset],
    layers: Sequence[OverlayLayer],
    *,
    series_instance_uid: str,
    instance_uid: Callable[[int], str],
    series_number: int,
    equipment: Equipment,
    algorithm_text: str,
    all_slices: bool = False,
    also_slices: Iterable[int] = (),
) -> list[hd.sc.SCImage]:
    """Secondary-capture images of one source series; `instance_uid(k)` names slice k's image.

    Slices with a lesion are rendered (the middle slice when there is none), every slice with
    `all_slices`, plus `also_slices`: the slices an earlier version of these results showed,
    so that re-processing replaces each of them (same UID) instead of leaving a stale outline.
    """
    if not layers:
        raise ValueError("build_secondary_captures needs at least one overlay layer")
    grid = layers[0].mask
    for layer in layers[1:]:
        if not layer.mask.same_grid(grid):
            raise SegmentationGeometryError(
                f"the {layer.finding_type.value} overlay is not on the source grid"
            )
    ks = slice_indices(source_series, grid)
    by_k = dict(zip(ks, source_series, strict=True))
    masks = [(layer.finding_type, np.asarray(layer.mask.array) > 0) for layer in layers]
    volume = np.stack([apply_modality_lut(by_k[k].pixel_array, by_k[k]) for k in range(len(ks))])

    with_lesions = [k for k in range(len(ks)) if any(m[k].any() for _, m in masks)]
    chosen = list(range(len(ks))) if all_slices else with_lesions or [len(ks) // 2]
    chosen = sorted(set(chosen) | {k for k in also_slices if 0 <= k < len(ks)})
    counts = ", ".join(
        f"{FINDING_CONCEPTS[layer.finding_type].label}: {layer.lesion_count}" for layer in layers
    )
    images: list[hd.sc.SCImage] = []
    for number, k in enumerate(chosen, start=1):
        source = by_k[k]
        description = source.get("SeriesDescription", "")
        header = [
            f"Slice {k + 1}/{len(ks)} | {algorithm_text} | {description}"[:90],
            counts
            if k in with_lesions
            else f"No lesion on this slice ({counts})"
            if with_lesions
            else f"No lesions detected ({counts})",
        ]
        outlines = [(f, m[k]) for f, m in masks]
        pixels = render_slice(volume[k], _window(source, volume), outlines, header)
        orientation = patient_orientation(source)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=instance_uid(k),
            instance_number=number,
            manufacturer=equipment.manufacturer,
            # highdicom takes one letter per direction; oblique slices get the full letters
            # (most significant first, PS3.3 C.7.6.1.1.1) written below.
            patient_orientation=(orientation[0][0], orientation[1][0]),
        )
        sc.PatientOrientation = list(orientation)
        sc.ConversionType = "WSD"  # workstation: rendered by software, not digitised film
        sc.BurnedInAnnotation = "YES"
        # Laterality (type 2C) is absent for an unpaired body part, which validators can
        # only tell from BodyPartExamined.
        sc.BodyPartExamined = source.get("BodyPartExamined") or "HEAD"
        sc.SeriesDescription = "LesionWatch overlay - computer-generated, not for diagnosis"
        sc.ImageComments = BANNER_TEXT
        sc.DerivationDescription = f"Lesion outlines ({algorithm_text}) on the source slice"[:1024]
        sc.ManufacturerModelName = equipment.model_name
        sc.SoftwareVersions = equipment.software_versions
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        sc.SourceImageSequence = [reference]
        images.append(sc)
    return images
