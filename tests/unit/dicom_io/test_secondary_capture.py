"""Secondary-capture fallback: outlines on the right slices, labelled as computer-generated."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from result_cases import Study, balls, build_study, shuffled, siemens_series

from lesionwatch.dicom_io.codes import FINDING_CONCEPTS, FindingType
from lesionwatch.dicom_io.output_uids import derive_uid
from lesionwatch.dicom_io.secondary_capture import (
    BANNER_TEXT,
    OverlayLayer,
    build_secondary_captures,
    patient_orientation,
)
from lesionwatch.dicom_io.seg import Equipment, slice_indices, sort_by_slice
from lesionwatch.dicom_io.series_reader import load_series


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return build_study(tmp_path_factory.mktemp("study"))


def _captures(sources: list[Dataset], layers: list[OverlayLayer], **kwargs: bool) -> list[Dataset]:
    return build_secondary_captures(
        sources,
        layers,
        series_instance_uid=derive_uid("job", "sc/series"),
        instance_uid=lambda k: derive_uid("job", f"sc/{k}"),
        series_number=9011,
        equipment=Equipment(),
        algorithm_text="LesionWatch FLAIR lesion U-Net 1.0.0",
        **kwargs,
    )


def _layers(study: Study) -> list[OverlayLayer]:
    return [
        OverlayLayer(FindingType.MS_LESION, study.lesion_mask, 3),
        OverlayLayer(FindingType.NEW_LESION, study.new_mask, 1),
    ]


def _has_colour(pixels: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool(np.all(pixels == np.asarray(rgb, dtype=np.uint8), axis=-1).any())


def test_one_image_per_slice_with_lesions_each_outlined(study: Study) -> None:
    images = _captures(shuffled(study.flair), _layers(study))
    ks_with_lesions = [k for k in range(20) if study.lesion_mask.array[k].any()]
    assert len(images) == len(ks_with_lesions)
    uids = [str(d.SOPInstanceUID) for d in study.flair]
    ks = dict(zip(uids, slice_indices(study.flair, study.lesion_mask), strict=True))
    yellow = FINDING_CONCEPTS[FindingType.MS_LESION].display_rgb
    red = FINDING_CONCEPTS[FindingType.NEW_LESION].display_rgb
    for number, image in enumerate(images, start=1):
        k = ks[str(image.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        assert k == ks_with_lesions[number - 1]  # in slice order
        assert image.InstanceNumber == number
        assert image.SOPInstanceUID == derive_uid("job", f"sc/{k}")
        pixels = image.pixel_array
        assert pixels.shape[2] == 3 and pixels.shape[1] >= 384
        assert _has_colour(pixels, yellow) or _has_colour(pixels, red)
        if study.new_mask.array[k].any():
            assert _has_colour(pixels, red)


def test_outline_sits_on_the_lesion(study: Study) -> None:
    images = _captures(study.flair, _layers(study)[:1])
    k = int(np.argmax(study.lesion_mask.array.sum(axis=(1, 2))))
    source_uid = str(sort_by_slice(study.flair, study.lesion_mask)[k].SOPInstanceUID)
    image = next(
        i for i in images if str(i.SourceImageSequence[0].ReferencedSOPInstanceUID) == source_uid
    )
    pixels = image.pixel_array
    slice_px = study.lesion_mask.array.shape[1]
    factor = pixels.shape[1] // slice_px
    banner_px = pixels.shape[0] - slice_px * factor
    colour = FINDING_CONCEPTS[FindingType.MS_LESION].display_rgb
    outline = np.all(pixels[banner_px:] == colour, axis=-1)
    rows, columns = np.nonzero(outline)
    lesion_rows, lesion_columns = np.nonzero(study.lesion_mask.array[k])
    assert rows.min() // factor >= lesion_rows.min() and rows.max() // factor <= lesion_rows.max()
    assert columns.min() // factor >= lesion_columns.min()
    assert columns.max() // factor <= lesion_columns.max()


def test_images_are_labelled_computer_generated(study: Study) -> None:
    image = _captures(study.flair, _layers(study))[0]
    assert image.BurnedInAnnotation == "YES"
    assert image.ImageComments == BANNER_TEXT
    assert list(image.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert image.ConversionType == "WSD"
    assert "computer-generated" in image.SeriesDescription
    assert image.PatientID == study.flair[0].PatientID
    assert image.StudyInstanceUID == study.flair[0].StudyInstanceUID
    # the banner: yellow warning text on black above the anatomy
    pixels = image.pixel_array
    assert _has_colour(pixels[:30], (255, 255, 0))
    assert not pixels[:2].any()


def test_without_lesions_the_middle_slice_says_none_found(study: Study) -> None:
    empty = study.lesion_mask.with_array(np.zeros_like(study.lesion_mask.array))
    images = _captures(study.flair, [OverlayLayer(FindingType.MS_LESION, empty, 0)])
    assert len(images) == 1
    all_images = _captures(
        study.flair, [OverlayLayer(FindingType.MS_LESION, empty, 0)], all_slices=True
    )
    assert len(all_images) == len(study.flair)


def test_patient_orientation_of_axial_and_sagittal_series(study: Study) -> None:
    axial = patient_orientation(study.flair[0])
    assert len(axial) == 2 and {axial[0][0], axial[1][0]} <= set("LRAP")
    sagittal = siemens_series()[0]  # rows run anterior->posterior, columns head->feet
    assert patient_orientation(sagittal) == ("P", "F")


def test_real_siemens_series_renders_with_its_own_window() -> None:
    series = siemens_series()
    grid = load_series(series).volume
    mask = balls(grid, [(60, 50, 40)], radius_mm=6.0)
    images = _captures(series, [OverlayLayer(FindingType.ENHANCING_LESION, mask, 1)])
    assert len(images) == len({k for k in range(96) if mask.array[k].any()})
    colour = FINDING_CONCEPTS[FindingType.ENHANCING_LESION].display_rgb
    assert _has_colour(images[0].pixel_array, colour)


def test_oblique_slices_get_every_orientation_letter(study: Study) -> None:
    """A series tilted 20 degrees (common for brain FLAIR along the AC-PC line): highdicom
    only takes single letters, the image still says e.g. "PH" for its oblique columns."""
    angle = np.deg2rad(20.0)
    row = np.array([1.0, 0.0, 0.0])
    column = np.array([0.0, np.cos(angle), np.sin(angle)])
    normal = np.cross(row, column)
    origin = np.asarray(study.flair[0].ImagePositionPatient, dtype=np.float64)
    spacing = float(study.flair[0].SliceThickness)
    tilted = []
    for ds in sorted(study.flair, key=lambda d: int(d.InstanceNumber)):
        copy = ds.copy()
        k = int(ds.InstanceNumber) - 1
        copy.ImageOrientationPatient = [*row, *column]
        copy.ImagePositionPatient = list(origin + k * spacing * normal)
        tilted.append(copy)
    grid = load_series(tilted).volume
    mask = balls(grid, [(20, 20, 10)], radius_mm=4.0)
    [first, *_] = _captures(tilted, [OverlayLayer(FindingType.MS_LESION, mask, 1)])
    assert list(first.PatientOrientation) == ["L", "PH"]
    assert list(first.PatientOrientation) == list(patient_orientation(tilted[0]))
