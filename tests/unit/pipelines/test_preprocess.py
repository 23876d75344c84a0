"""preprocess(): the 1 mm z-scored result, its step record, and the exact way back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from scipy.spatial.transform import Rotation

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.preprocess import PreprocessResult, preprocess
from lesionwatch.pipelines.steps.resampling import (
    Grid,
    Interpolation,
    isotropic_grid,
    resample_to_grid,
)

CROSS_SECTIONAL = Path("open_ms_data") / "cross_sectional" / "patient07"
LONGITUDINAL = Path("open_ms_data") / "longitudinal" / "patient01"


def source_grid_around(
    volume: ImageVolume, spacing_mm: tuple[float, float, float], euler_deg: tuple[float, ...]
) -> Grid:
    """A grid of `spacing_mm` voxels, rotated by `euler_deg`, centred on `volume`'s field of
    view and as large (the rotated corners are cut off)."""
    axes = Rotation.from_euler("xyz", euler_deg, degrees=True).as_matrix() @ volume.direction
    extent_mm = np.asarray(volume.shape_ijk) * np.asarray(volume.spacing_mm)
    size = np.ceil(extent_mm / np.asarray(spacing_mm)).astype(int)
    centre = volume.index_to_lps((np.asarray(volume.shape_ijk) - 1) / 2.0)
    origin = centre - axes @ ((size - 1) / 2.0 * np.asarray(spacing_mm))
    return Grid(
        (int(size[0]), int(size[1]), int(size[2])),
        spacing_mm,
        (float(origin[0]), float(origin[1]), float(origin[2])),
        tuple(float(d) for d in axes.flatten()),
    )


def voxel_centres_lps(grid: Grid) -> npt.NDArray[np.float64]:
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape_kji], indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(np.float64)
    return ijk @ grid.affine_lps[:3, :3].T + np.asarray(grid.origin_mm)


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


# name -> (data file, source spacing, rotation): oblique thick slices, flips, a clinical head.
CASES = {
    "oblique_1.8x1.8x4": (CROSS_SECTIONAL / "FLAIR.nii.gz", (1.8, 1.8, 4.0), (12.0, -6.0, 9.0)),
    "flipped_2x2.2x3": (CROSS_SECTIONAL / "FLAIR.nii.gz", (2.0, 2.2, 3.0), (180.0, 0.0, 180.0)),
    "clinical_with_skull": (LONGITUDINAL / "study1_FLAIR.nii.gz", (1.6, 1.6, 4.0), (0.0, 0.0, 0.0)),
}


@pytest.fixture(scope="module", params=list(CASES))
def prepared(
    request: pytest.FixtureRequest, test_data: Path
) -> tuple[ImageVolume, PreprocessResult]:
    path, spacing_mm, euler_deg = CASES[request.param]
    data = ImageVolume.load(test_data / path)
    source = resample_to_grid(
        data, source_grid_around(data, spacing_mm, euler_deg), interpolation=Interpolation.LINEAR
    )
    return source, preprocess(source, spacing_mm=1.0)


def test_result_is_1mm_zscored_inside_the_brain(
    prepared: tuple[ImageVolume, PreprocessResult],
) -> None:
    source, result = prepared
    assert result.source_grid == Grid.of(source)
    assert result.image.spacing_mm == (1.0, 1.0, 1.0)
    assert result.brain_mask.same_grid(result.image)
    assert result.brain_mask.array.dtype == np.uint8
    inside = result.brain_mask.array > 0
    volume_ml = inside.sum() / 1000.0
    assert 900 < volume_ml < 1900, volume_ml
    assert abs(float(result.image.array[inside].mean())) < 1e-4
    assert abs(float(result.image.array[inside].std()) - 1.0) < 1e-4
    assert (result.image.array[~inside] == 0).all()
    assert result.channels["flair"] is result.image


def test_steps_record_time_and_geometry(prepared: tuple[ImageVolume, PreprocessResult]) -> None:
    source, result = prepared
    names = [step.name for step in result.steps]
    assert names == ["n4_bias_correction", "resample_linear", "brain_mask", "zscore_in_brain"]
    assert all(step.seconds >= 0 for step in result.steps)
    assert result.steps[0].grid_in == Grid.of(source)
    assert result.steps[1].grid_out == result.grid
    assert result.steps[-1].grid_out == result.grid


def test_to_source_grid_gives_the_exact_source_grid(
    prepared: tuple[ImageVolume, PreprocessResult],
) -> None:
    source, result = prepared
    labels = result.to_source_grid(result.brain_mask, is_label=True)
    assert labels.array.shape == source.array.shape
    np.testing.assert_array_equal(labels.affine_lps, source.affine_lps)
    assert labels.array.dtype == np.uint8
    probability = result.to_source_grid(result.image, is_label=False)
    np.testing.assert_array_equal(probability.affine_lps, source.affine_lps)
    assert probability.array.dtype == np.float32
    with pytest.raises(ValueError, match="working grid"):
        result.to_source_grid(source, is_label=True)


def sphere_on(
    grid: Grid, centre: npt.NDArray[np.float64], radius_mm: float
) -> npt.NDArray[np.uint8]:
    """A ball sampled at `grid`'s voxel centres (only a box around it is evaluated: fast)."""
    inverse = np.linalg.inv(grid.affine_lps[:3, :3])
    centre_ijk = inverse @ (centre - np.asarray(grid.origin_mm))
    reach = np.abs(inverse).sum(axis=1) * radius_mm + 2
    low = np.maximum(np.floor(centre_ijk - reach), 0).astype(int)
    high = np.minimum(np.ceil(centre_ijk + reach), np.asarray(grid.size_ijk) - 1).astype(int)
    k, j, i = np.meshgrid(*[np.arange(low[a], high[a] + 1) for a in (2, 1, 0)], indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(np.float64)
    inside = np.linalg.norm(
        ijk @ grid.affine_lps[:3, :3].T + np.asarray(grid.origin_mm) - centre, axis=-1
    )
    ball = np.zeros(grid.shape_kji, dtype=np.uint8)
    ball[low[2] : high[2] + 1, low[1] : high[1] + 1, low[0] : high[0] + 1] = inside <= radius_mm
    return ball


def centroid_lps(volume: ImageVolume) -> npt.NDArray[np.float64]:
    k, j, i = np.nonzero(volume.array)
    weights = volume.array[k, j, i].astype(np.float64)
    points = volume.index_to_lps(np.stack([i, j, k], axis=-1))
    return np.asarray((points * weights[:, None]).sum(axis=0) / weights.sum())


def test_a_blob_maps_back_without_shifting(prepared: tuple[ImageVolume, PreprocessResult]) -> None:
    """Perfect 1 mm predictions of balls, mapped back, against the same balls on the source
    grid: high overlap and no systematic shift (a half-voxel error would shift by >= 1 mm)."""
    source, result = prepared
    rng = np.random.default_rng(7)
    middle = result.grid.affine_lps @ np.append((np.asarray(result.grid.size_ijk) - 1) / 2.0, 1.0)
    shifts = {"nearest": [], "probability": []}
    for _ in range(6):
        centre = middle[:3] + rng.uniform(-25.0, 25.0, 3)
        truth = source.with_array(sphere_on(result.source_grid, centre, 10.0))
        prediction = result.image.with_array(sphere_on(result.grid, centre, 10.0))
        for method, back in (
            ("nearest", result.to_source_grid(prediction, is_label=True)),
            (
                "probability",
                result.mask_to_source_grid(
                    prediction.with_array(prediction.array.astype(np.float32))
                ),
            ),
        ):
            assert back.same_grid(source)
            assert dice(back.array > 0, truth.array > 0) > 0.85
            shifts[method].append(centroid_lps(back) - centroid_lps(truth))
    for method, vectors in shifts.items():
        mean_shift_mm = float(np.linalg.norm(np.mean(vectors, axis=0)))
        assert mean_shift_mm < 0.2, (method, mean_shift_mm)
        assert max(float(np.linalg.norm(v)) for v in vectors) < 0.6, (method, vectors)


@pytest.mark.parametrize(
    ("spacing_mm", "euler_deg"),
    [((0.72, 0.72, 3.0), (12.0, 5.0, -8.0)), ((0.9, 0.9, 4.0), (0.0, 0.0, 180.0))],
)
def test_probabilities_map_real_lesions_back_better_than_nearest_labels(
    test_data: Path, spacing_mm: tuple[float, float, float], euler_deg: tuple[float, ...]
) -> None:
    """The measurement behind `mask_to_source_grid`: a real lesion mask on a clinical-like
    source grid, taken to the 1 mm grid (as a perfect network would predict it) and back."""
    lesions = ImageVolume.load(test_data / CROSS_SECTIONAL / "lesion_mask.nii.gz")
    lesions = lesions.with_array(lesions.array.astype(np.float32))
    source_grid = source_grid_around(lesions, spacing_mm, euler_deg)
    truth = resample_to_grid(lesions, source_grid, interpolation=Interpolation.LINEAR).array >= 0.5
    working = isotropic_grid(source_grid, 1.0)
    truth_volume = source_grid.volume(truth.astype(np.float32))
    probability = resample_to_grid(truth_volume, working, interpolation=Interpolation.LINEAR)
    result = PreprocessResult(
        image=probability,
        brain_mask=probability.with_array(np.ones(probability.array.shape, np.uint8)),
        source_grid=source_grid,
        steps=(),
    )
    labels = probability.with_array((probability.array >= 0.5).astype(np.uint8))
    nearest = result.to_source_grid(labels, is_label=True).array > 0
    via_probability = result.mask_to_source_grid(probability).array > 0
    dice_nearest, dice_probability = dice(nearest, truth), dice(via_probability, truth)
    print(f"{spacing_mm} nearest {dice_nearest:.4f} probability {dice_probability:.4f}")
    assert dice_nearest > 0.8
    assert dice_probability > 0.88
    assert dice_probability > dice_nearest


def test_t1_is_registered_into_the_flair_grid(test_data: Path) -> None:
    flair_data = ImageVolume.load(test_data / CROSS_SECTIONAL / "FLAIR.nii.gz")
    t1_data = ImageVolume.load(test_data / CROSS_SECTIONAL / "T1.nii.gz")
    flair = resample_to_grid(
        flair_data,
        source_grid_around(flair_data, (2.0, 2.0, 4.0), (5.0, 0.0, 0.0)),
        interpolation=Interpolation.LINEAR,
    )
    t1 = resample_to_grid(
        t1_data,
        source_grid_around(t1_data, (2.5, 2.5, 2.5), (0.0, -7.0, 4.0)),
        interpolation=Interpolation.LINEAR,
    )
    result = preprocess(flair, t1=t1, spacing_mm=3.0)  # 3 mm keeps the registration quick
    t1_on_grid = result.channels["t1"]
    assert t1_on_grid.same_grid(result.image)
    inside = result.brain_mask.array > 0
    assert abs(float(t1_on_grid.array[inside].mean())) < 1e-4
    # Aligned: the T1 sampled directly on the working grid agrees with the registered one.
    direct = resample_to_grid(t1_data, result.grid, interpolation=Interpolation.LINEAR).array
    correlation = np.corrcoef(t1_on_grid.array[inside], direct[inside])[0, 1]
    assert correlation > 0.9, correlation
    assert [s.name for s in result.steps][-3:] == [
        "t1_n4_bias_correction",
        "t1_rigid_registration_to_flair",
        "t1_zscore_in_brain",
    ]
