"""SEG in the source geometry: one frame per slice and segment, codes, references, encoding."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from result_cases import (
    FLAIR_MODEL,
    NEW_MODEL,
    Study,
    balls,
    build_study,
    shuffled,
    siemens_series,
)

from lesionwatch.config.schema import ResultsConfig, SegEncoding
from lesionwatch.dicom_io.codes import FINDING_CONCEPTS, FindingType
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.output_uids import derive_uid
from lesionwatch.dicom_io.seg import (
    Equipment,
    SegmentationGeometryError,
    SegmentInput,
    _null_pad_bits,
    build_segmentation,
    slice_indices,
    sort_by_slice,
)
from lesionwatch.dicom_io.series_reader import load_series


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return build_study(tmp_path_factory.mktemp("study"))


def _seg(
    sources: list[Dataset],
    segments: list[SegmentInput],
    encoding: SegEncoding = SegEncoding.FRACTIONAL,
) -> hd.seg.Segmentation:
    return build_segmentation(
        sources,
        segments,
        series_instance_uid=derive_uid("job", "seg/series"),
        sop_instance_uid=derive_uid("job", "seg/instance"),
        series_number=9001,
        equipment=Equipment(),
        encoding=encoding,
    )


def _flair_segments(study: Study) -> list[SegmentInput]:
    return [
        SegmentInput(FindingType.MS_LESION, study.lesion_mask, FLAIR_MODEL, derive_uid("j", "t1")),
        SegmentInput(FindingType.NEW_LESION, study.new_mask, NEW_MODEL, derive_uid("j", "t2")),
    ]


def _frames_by_source(seg: Dataset) -> dict[tuple[int, str], np.ndarray]:
    """(segment number, source SOP instance UID) -> frame pixels, from the dataset itself."""
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    result = {}
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        derivation = frame.DerivationImageSequence[0]
        source_uid = str(derivation.SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert (segment, source_uid) not in result, "two frames for one slice and segment"
        result[(segment, source_uid)] = pixels[index]
    return result


def test_slice_indices_follow_positions_in_any_file_order() -> None:
    series = siemens_series()
    loaded = load_series(series)  # the reader's own order: k -> SOP instance UID
    expected = {uid: k for k, uid in enumerate(loaded.slice_sop_instance_uids)}
    mixed = shuffled(series)
    ks = slice_indices(mixed, loaded.volume)
    assert ks == [expected[str(ds.SOPInstanceUID)] for ds in mixed]
    assert [str(ds.SOPInstanceUID) for ds in sort_by_slice(mixed, loaded.volume)] == list(
        loaded.slice_sop_instance_uids
    )


def test_slice_indices_work_for_a_stack_that_runs_against_the_normal(study: Study) -> None:
    grid = study.lesion_mask
    last = grid.array.shape[0] - 1
    reversed_grid = ImageVolume(
        array=grid.array[::-1].copy(),
        spacing_mm=grid.spacing_mm,
        origin_mm=tuple(grid.index_to_lps([0, 0, last])),
        direction=grid.direction * np.array([1.0, 1.0, -1.0]),
    )
    forward = slice_indices(study.flair, grid)
    backward = slice_indices(study.flair, reversed_grid)
    assert [last - k for k in forward] == backward


def test_a_mask_off_the_source_grid_is_refused_naming_the_instance(study: Study) -> None:
    grid = study.lesion_mask
    half_slice = np.asarray(grid.origin_mm) + grid.direction[:, 2] * grid.spacing_mm[2] / 2
    shifted = ImageVolume(grid.array, grid.spacing_mm, tuple(half_slice), grid.direction)
    with pytest.raises(SegmentationGeometryError, match="instance .* is not a slice origin"):
        slice_indices(study.flair, shifted)
    with pytest.raises(SegmentationGeometryError, match="19 images but the mask has 20 slices"):
        slice_indices(study.flair[:-1], grid)
    with pytest.raises(SegmentationGeometryError, match="both lie on slice"):
        slice_indices([*study.flair[:-1], study.flair[0]], grid)


@pytest.mark.parametrize("encoding", list(SegEncoding))
def test_every_slice_has_a_frame_per_segment_matching_the_mask(
    study: Study, encoding: SegEncoding
) -> None:
    seg = _seg(shuffled(study.flair), _flair_segments(study), encoding)
    n_slices = len(study.flair)
    assert seg.SegmentationType == encoding.value.upper()
    assert int(seg.NumberOfFrames) == 2 * n_slices  # empty frames are kept (OHIF pitfall)
    frames = _frames_by_source(seg)
    ks = slice_indices(study.flair, study.lesion_mask)
    for ds, k in zip(study.flair, ks, strict=True):
        uid = str(ds.SOPInstanceUID)
        assert np.array_equal(frames[(1, uid)] > 0, study.lesion_mask.array[k] > 0)
        assert np.array_equal(frames[(2, uid)] > 0, study.new_mask.array[k] > 0)
    # plane positions are the source slices' own, one slice per frame
    positions = {
        tuple(round(float(v), 3) for v in f.PlanePositionSequence[0].ImagePositionPatient)
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert positions == {
        tuple(round(float(v), 3) for v in ds.ImagePositionPatient) for ds in study.flair
    }


def test_segments_carry_codes_algorithm_and_tracking(study: Study) -> None:
    seg = _seg(study.flair, _flair_segments(study))
    first, second = seg.SegmentSequence
    assert first.SegmentLabel == FINDING_CONCEPTS[FindingType.MS_LESION].label
    assert first.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert first.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    first_type = first.SegmentedPropertyTypeCodeSequence[0]
    assert "SegmentedPropertyTypeModifierCodeSequence" not in first_type
    modifier = second.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
    assert (modifier[0].CodeValue, modifier[0].CodingSchemeDesignator) == ("7147002", "SCT")
    assert first.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = first.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == FLAIR_MODEL.name
    assert algorithm.AlgorithmVersion == FLAIR_MODEL.version
    assert FLAIR_MODEL.model_card_sha256 in algorithm.AlgorithmParameters
    assert first.TrackingUID == derive_uid("j", "t1")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.flair[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == study.flair[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == study.flair[0].FrameOfReferenceUID


def test_file_order_does_not_change_the_object(study: Study) -> None:
    a = _seg(study.flair, _flair_segments(study))
    b = _seg(shuffled(study.flair, seed=3), _flair_segments(study))
    assert a.PixelData == b.PixelData
    assert a.PerFrameFunctionalGroupsSequence == b.PerFrameFunctionalGroupsSequence


def test_highdicom_reads_back_the_mask_on_a_real_sagittal_siemens_series(tmp_path: Path) -> None:
    series = siemens_series()
    grid = load_series(series).volume
    mask = balls(grid, [(60, 50, 40), (30, 80, 70)], radius_mm=5.0)
    seg = _seg(
        shuffled(series),
        [SegmentInput(FindingType.ENHANCING_LESION, mask, FLAIR_MODEL, derive_uid("j", "t"))],
    )
    seg.save_as(tmp_path / "seg.dcm")
    read = hd.seg.segread(tmp_path / "seg.dcm")
    ordered = sort_by_slice(series, grid)
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in ordered],
        segment_numbers=[1],
    )
    assert pixels.shape == (96, 128, 128, 1)
    assert np.array_equal(pixels[..., 0], mask.array)
    assert int(mask.array.sum()) > 0


def test_mixed_grids_and_repeated_finding_types_are_refused(study: Study) -> None:
    other = study.enhancing_mask  # same geometry as FLAIR in this study: shift it
    moved = ImageVolume(
        other.array, other.spacing_mm, tuple(np.asarray(other.origin_mm) + 1.0), other.direction
    )
    with pytest.raises(SegmentationGeometryError, match="not on the same grid"):
        _seg(
            study.flair,
            [
                SegmentInput(FindingType.MS_LESION, study.lesion_mask, FLAIR_MODEL, "1.2.3"),
                SegmentInput(FindingType.NEW_LESION, moved, NEW_MODEL, "1.2.4"),
            ],
        )
    with pytest.raises(ValueError, match="only once"):
        _seg(
            study.flair,
            [
                SegmentInput(FindingType.MS_LESION, study.lesion_mask, FLAIR_MODEL, "1.2.3"),
                SegmentInput(FindingType.MS_LESION, study.new_mask, NEW_MODEL, "1.2.4"),
            ],
        )


def test_fractional_is_the_default_and_stores_0_or_255(study: Study) -> None:
    assert ResultsConfig().seg_encoding is SegEncoding.FRACTIONAL
    seg = _seg(study.flair, _flair_segments(study))
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    assert (int(seg.BitsAllocated), int(seg.MaximumFractionalValue)) == (8, 255)
    assert set(np.unique(seg.pixel_array).tolist()) == {0, 255}
    assert len(seg.PixelData) == int(seg.NumberOfFrames) * seg.Rows * seg.Columns


def test_binary_is_one_bit_a_pixel(study: Study) -> None:
    seg = _seg(study.flair, _flair_segments(study), SegEncoding.BINARY)
    assert int(seg.BitsAllocated) == 1
    assert len(seg.PixelData) == (int(seg.NumberOfFrames) * seg.Rows * seg.Columns + 7) // 8


def test_odd_length_one_bit_pixel_data_is_padded_with_a_null_byte() -> None:
    # 182 frames of 218 x 182 pixels (a 1 mm MNI FLAIR): 902629 bytes, one padding byte.
    n_pixels = 182 * 218 * 182
    seg = Dataset()
    seg.PixelData = b"\xff" * 902629 + b"0"  # as highdicom 0.28 writes it
    _null_pad_bits(seg, n_pixels)  # type: ignore[arg-type]
    assert len(seg.PixelData) == 902630 and seg.PixelData[-1:] == b"\x00"
    even = Dataset()
    even.PixelData = b"\xff" * 4000
    _null_pad_bits(even, 32000)  # type: ignore[arg-type]
    assert even.PixelData == b"\xff" * 4000
