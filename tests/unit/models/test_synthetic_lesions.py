"""Synthetic lesions painted into a 64 mm cube of a real skull-stripped brain (patient07)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.synthetic_lesions import (
    EnhancementPattern,
    LesionModel,
    SyntheticLesionError,
    SyntheticLesions,
    TissueMasks,
    add_synthetic_lesions,
    estimate_tissues,
    make_new_lesion_pair,
)

MODEL = LesionModel(max_volume_mm3=500.0)  # the 64 mm cube has room for a few mL at most
CUBE = np.ones((3, 3, 3), dtype=bool)


def _crop(volume: ImageVolume, box: tuple[slice, ...]) -> ImageVolume:
    origin = volume.index_to_lps([s.start for s in box[::-1]])  # box is (k, j, i)
    return ImageVolume(
        np.ascontiguousarray(volume.array[box]), volume.spacing_mm, tuple(origin), volume.direction
    )


@pytest.fixture(scope="module")
def brain(test_data: Path) -> dict[str, ImageVolume]:
    """FLAIR, T1, T1POST cropped to 64^3 voxels around the brain's centre (ventricles + WM)."""
    folder = test_data / "open_ms_data" / "cross_sectional" / "patient07"
    volumes = {
        name: ImageVolume.load(folder / f"{name}.nii.gz") for name in ("FLAIR", "T1", "T1POST")
    }
    centre = np.round(ndimage.center_of_mass(volumes["FLAIR"].array > 0)).astype(int)
    box = tuple(slice(int(c) - 32, int(c) + 32) for c in centre)
    return {name: _crop(volume, box) for name, volume in volumes.items()}


@pytest.fixture(scope="module")
def tissues(brain: dict[str, ImageVolume]) -> TissueMasks:
    return estimate_tissues(brain["FLAIR"], t1=brain["T1"])


@pytest.fixture(scope="module")
def painted(brain: dict[str, ImageVolume], tissues: TissueMasks) -> SyntheticLesions:
    return add_synthetic_lesions(
        brain["FLAIR"],
        np.random.default_rng(7),
        12,
        t1=brain["T1"],
        t1_post=brain["T1POST"],
        tissues=tissues,
        model=MODEL,
    )


def test_tissue_classes_are_ordered_like_brain_tissue(
    brain: dict[str, ImageVolume], tissues: TissueMasks
) -> None:
    t1, flair = brain["T1"].array, brain["FLAIR"].array
    assert t1[tissues.csf].mean() < t1[tissues.gm].mean() < t1[tissues.wm].mean()
    assert flair[tissues.csf].mean() < flair[tissues.wm].mean() < flair[tissues.gm].mean()
    assert tissues.ventricles.sum() > 1000  # the lateral ventricles are in this cube
    assert not (tissues.ventricles & ~tissues.csf).any()
    flair_only = estimate_tissues(brain["FLAIR"])
    overlap = (flair_only.wm & tissues.wm).sum() / tissues.wm.sum()
    assert overlap > 0.6  # FLAIR alone separates WM less well, but finds most of it


def test_lesions_have_requested_count_and_volumes_inside_white_matter(
    painted: SyntheticLesions, tissues: TissueMasks
) -> None:
    labels = painted.labels.array
    assert [lesion.label for lesion in painted.lesions] == list(range(1, 13))
    assert set(np.unique(labels)) == set(range(13))
    _, n_components = ndimage.label(labels > 0, structure=CUBE)
    assert n_components == 12  # lesions never touch, so each is one 26-connected lesion
    assert tissues.wm[labels > 0].all()
    sizes = np.bincount(labels.ravel(), minlength=13)
    for lesion in painted.lesions:
        assert sizes[lesion.label] == lesion.volume_mm3  # 1 mm voxels
        assert lesion.volume_mm3 == round(lesion.requested_volume_mm3)
        assert MODEL.min_volume_mm3 <= lesion.volume_mm3 <= MODEL.max_volume_mm3
        k, j, i = lesion.centre_ijk[::-1]
        assert labels[k, j, i] == lesion.label
    assert any(lesion.periventricular for lesion in painted.lesions)


def test_label_mask_matches_the_intensity_change(
    brain: dict[str, ImageVolume], painted: SyntheticLesions
) -> None:
    labels = painted.labels.array > 0
    flair_change = painted.flair.array - brain["FLAIR"].array
    assert (flair_change >= 0).all()  # FLAIR lesions only ever brighten
    near = ndimage.binary_dilation(labels, structure=CUBE, iterations=2)
    assert not (flair_change[~near] != 0).any()  # soft edges reach two voxels at most
    relative = flair_change / np.maximum(brain["FLAIR"].array, 1e-3)
    assert (relative[labels] > 0).mean() > 0.99
    assert relative[labels].mean() > 3 * relative[near & ~labels].mean()
    t1_change = painted.t1.array - brain["T1"].array  # type: ignore[union-attr]
    assert (t1_change <= 0).all() and t1_change[labels].mean() < 0
    enhancing = painted.enhancing.array > 0  # type: ignore[union-attr]
    patterns = {lesion.enhancement for lesion in painted.lesions}
    assert EnhancementPattern.NONE in patterns and len(patterns) > 1
    assert enhancing.any() and not (enhancing & ~labels).any()
    for lesion in painted.lesions:
        region = enhancing[painted.labels.array == lesion.label]
        if lesion.enhancement is EnhancementPattern.NONE:
            assert not region.any()
        elif lesion.enhancement is EnhancementPattern.NODULAR:
            assert region.all()
        else:
            assert region.any()


def test_lesions_are_ovoid_along_the_chosen_axis(
    brain: dict[str, ImageVolume], tissues: TissueMasks
) -> None:
    elongated = LesionModel(
        median_volume_mm3=150, volume_log_sd=0.2, elongation_range=(2.5, 2.5), irregularity=0.1
    )
    result = add_synthetic_lesions(
        brain["FLAIR"], np.random.default_rng(3), 6, tissues=tissues, model=elongated
    )
    alignments = []
    for lesion in result.lesions:
        points = np.argwhere(result.labels.array == lesion.label)[:, ::-1].astype(float)  # i,j,k
        eigenvalues, eigenvectors = np.linalg.eigh(np.cov(points.T))
        alignments.append(abs(float(eigenvectors[:, -1] @ np.asarray(lesion.long_axis_ijk))))
        assert eigenvalues[-1] > 2.0 * eigenvalues[0]
    assert np.median(alignments) > 0.8


def test_periventricular_lesions_point_away_from_the_ventricles(
    brain: dict[str, ImageVolume], tissues: TissueMasks
) -> None:
    dawson = LesionModel(max_volume_mm3=500.0, periventricular_fraction=1.0)
    result = add_synthetic_lesions(
        brain["FLAIR"], np.random.default_rng(2), 8, tissues=tissues, model=dawson
    )
    _, nearest = ndimage.distance_transform_edt(~tissues.ventricles, return_indices=True)
    cosines = []
    for lesion in result.lesions:
        assert lesion.periventricular
        k, j, i = lesion.centre_ijk[::-1]
        wall = nearest[:, k, j, i][::-1]  # nearest ventricle voxel, (i, j, k)
        outward = np.asarray(lesion.centre_ijk, dtype=float) - wall
        outward /= np.linalg.norm(outward)
        cosines.append(abs(float(outward @ np.asarray(lesion.long_axis_ijk))))
        assert np.linalg.norm(np.asarray(lesion.centre_ijk) - wall) <= 8.0 + 2.0
    assert np.median(cosines) > 0.8  # long axes perpendicular to the wall: Dawson's fingers


def test_same_seed_same_result_other_seed_other_result(
    brain: dict[str, ImageVolume], tissues: TissueMasks, painted: SyntheticLesions
) -> None:
    again = add_synthetic_lesions(
        brain["FLAIR"],
        np.random.default_rng(7),
        12,
        t1=brain["T1"],
        t1_post=brain["T1POST"],
        tissues=tissues,
        model=MODEL,
    )
    assert again.lesions == painted.lesions
    assert np.array_equal(again.labels.array, painted.labels.array)
    assert np.array_equal(again.flair.array, painted.flair.array)
    assert np.array_equal(again.t1_post.array, painted.t1_post.array)  # type: ignore[union-attr]
    other = add_synthetic_lesions(
        brain["FLAIR"], np.random.default_rng(8), 12, tissues=tissues, model=MODEL
    )
    assert not np.array_equal(other.labels.array > 0, painted.labels.array > 0)


def test_new_lesion_ground_truth_is_the_difference_between_time_points(
    brain: dict[str, ImageVolume], tissues: TissueMasks
) -> None:
    still = {
        "max_rotation_deg": 0.0,
        "max_translation_mm": 0.0,
        "intensity_scale_range": (1.0, 1.0),
        "bias_amplitude": 0.0,
    }
    pair = make_new_lesion_pair(
        brain["FLAIR"],
        np.random.default_rng(11),
        4,
        n_shared=8,
        tissues=tissues,
        model=MODEL,
        **still,  # type: ignore[arg-type]
    )
    prior, current = pair.prior.labels.array > 0, pair.current.labels.array > 0
    new = pair.new_lesions.array > 0
    assert np.array_equal(new, current & ~prior)
    assert not pair.enlarged.array.any()
    _, n_new = ndimage.label(new, structure=CUBE)
    assert n_new == 4
    # outside the new lesions and their soft edges both studies are the same image
    untouched = ~ndimage.binary_dilation(new, structure=CUBE, iterations=2)
    assert np.array_equal(pair.prior.flair.array[untouched], pair.current.flair.array[untouched])
    assert (pair.current.flair.array[new] > pair.prior.flair.array[new]).mean() > 0.99

    grown = make_new_lesion_pair(
        brain["FLAIR"],
        np.random.default_rng(11),
        4,
        n_shared=8,
        tissues=tissues,
        model=MODEL,
        grow_fraction=1.0,
        **still,  # type: ignore[arg-type]
    )
    prior, current = grown.prior.labels.array > 0, grown.current.labels.array > 0
    new, enlarged = grown.new_lesions.array > 0, grown.enlarged.array > 0
    assert enlarged.any() and not (new & enlarged).any()
    assert np.array_equal(new | enlarged, current & ~prior)
    assert not (prior & ~current).any()  # lesions only grow
    assert tissues.wm[enlarged].all()


def test_prior_is_moved_rigidly_and_changed_in_intensity(
    brain: dict[str, ImageVolume], tissues: TissueMasks
) -> None:
    pair = make_new_lesion_pair(
        brain["FLAIR"],
        np.random.default_rng(5),
        3,
        n_shared=6,
        tissues=tissues,
        model=MODEL,
        max_rotation_deg=2.0,
        max_translation_mm=2.0,
    )
    matrix = pair.change.current_to_prior_lps
    rotation = matrix[:3, :3]
    assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    assert max(abs(a) for a in pair.change.rotation_deg) <= 2.0
    assert 0.9 <= pair.change.intensity_scale <= 1.1
    current_labels, prior_labels = pair.current.labels, pair.prior.labels
    for lesion in pair.prior.lesions:
        if lesion.volume_mm3 < 30:
            continue  # small lesions lose voxels to nearest-neighbour resampling
        in_current = np.argwhere(current_labels.array == lesion.label)[:, ::-1].mean(axis=0)
        in_prior = np.argwhere(prior_labels.array == lesion.label)[:, ::-1].mean(axis=0)
        expected = matrix @ np.append(current_labels.index_to_lps(in_current), 1.0)
        found = prior_labels.index_to_lps(in_prior)
        assert np.linalg.norm(expected[:3] - found) < 1.0
    assert not np.array_equal(pair.prior.labels.array, pair.current.labels.array)


def test_bad_input_is_refused_with_a_reason(brain: dict[str, ImageVolume]) -> None:
    flair = brain["FLAIR"]
    shifted = ImageVolume(brain["T1"].array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(SyntheticLesionError, match="T1 is not on the FLAIR grid"):
        add_synthetic_lesions(flair, np.random.default_rng(0), 1, t1=shifted)
    with pytest.raises(SyntheticLesionError, match="floating-point"):
        add_synthetic_lesions(
            flair.with_array(flair.array.astype(np.int16)), np.random.default_rng(0)
        )
    tiny_wm = np.zeros(flair.array.shape, dtype=bool)
    tiny_wm[30:33, 30:33, 30:33] = True
    cramped = TissueMasks(
        brain=flair.array > 0,
        csf=~tiny_wm,
        gm=~tiny_wm,
        wm=tiny_wm,
        ventricles=np.zeros_like(tiny_wm),
    )
    with pytest.raises(SyntheticLesionError, match="no room"):
        add_synthetic_lesions(flair, np.random.default_rng(0), 5, tissues=cramped, model=MODEL)


def test_per_case_lesion_load_spans_the_requested_range(
    brain: dict[str, ImageVolume], tissues: TissueMasks
) -> None:
    """A median-volume range gives light and heavy cases; without it the median is fixed."""
    model = LesionModel(median_volume_range_mm3=(5.0, 200.0), max_volume_mm3=2000.0)
    medians = [model.for_case(np.random.default_rng(seed)).median_volume_mm3 for seed in range(40)]
    assert 5.0 <= min(medians) < 15.0 and 100.0 < max(medians) <= 200.0
    assert MODEL.for_case(np.random.default_rng(0)) is MODEL
    loads = []
    for seed in (3, 4, 5, 6):
        painted = add_synthetic_lesions(
            brain["FLAIR"], np.random.default_rng(seed), 6, tissues=tissues, model=model
        )
        loads.append(sum(lesion.volume_mm3 for lesion in painted.lesions))
    assert max(loads) > 4 * min(loads)
    with pytest.raises(ValueError, match="median_volume_range_mm3"):
        LesionModel(median_volume_range_mm3=(50.0, 10.0))


def test_periventricular_lesions_reach_the_ventricular_wall_only_with_a_rim(
    brain: dict[str, ImageVolume], tissues: TissueMasks
) -> None:
    """With ``ependymal_rim_mm`` periventricular lesions grow up to the ventricles (never into
    them); without it they stay in white matter and stop short of the wall."""
    distance = ndimage.distance_transform_edt(~tissues.ventricles)  # 1 mm voxels

    def paint(rim_mm: float) -> np.ndarray:
        model = LesionModel(
            max_volume_mm3=500.0,
            median_volume_mm3=150.0,
            periventricular_fraction=1.0,
            ependymal_rim_mm=rim_mm,
        )
        result = add_synthetic_lesions(
            brain["FLAIR"], np.random.default_rng(11), 8, tissues=tissues, model=model
        )
        return result.labels.array > 0

    plain, rimmed = paint(0.0), paint(3.0)
    assert tissues.wm[plain].all()
    assert not (rimmed & tissues.ventricles).any()
    outside_wm = rimmed & ~tissues.wm
    assert outside_wm.any() and distance[outside_wm].max() <= 3.0
    assert (distance[rimmed] <= 1.5).sum() > 3 * (distance[plain] <= 1.5).sum()
    with pytest.raises(ValueError, match="ependymal_rim_mm"):
        LesionModel(ependymal_rim_mm=-1.0)


def test_confluent_plaques_are_solid_and_lie_along_the_ventricles(
    brain: dict[str, ImageVolume], tissues: TissueMasks
) -> None:
    """Plaques come first (labels 1..n), large, in one solid piece, near the ventricles and
    stretched along their wall; the ovoids painted after them keep clear of them."""
    model = LesionModel(
        max_volume_mm3=300.0,
        confluent_count_range=(1, 1),
        confluent_volume_range_mm3=(1500.0, 2500.0),
    )
    _, nearest = ndimage.distance_transform_edt(~tissues.ventricles, return_indices=True)
    cosines = []
    for seed in (5, 6, 7, 8):
        result = add_synthetic_lesions(
            brain["FLAIR"], np.random.default_rng(seed), 4, tissues=tissues, model=model
        )
        info = result.lesions[0]
        assert len(result.lesions) == 5 and info.periventricular and info.volume_mm3 >= 500.0
        assert max(lesion.volume_mm3 for lesion in result.lesions[1:]) <= 300.0
        plaque = result.labels.array == 1
        assert ndimage.label(plaque, CUBE)[1] == 1
        assert not (plaque & (tissues.ventricles | tissues.csf)).any()
        closed = ndimage.binary_closing(plaque, CUBE) | plaque
        assert closed.sum() < 1.1 * plaque.sum()  # solid, not a lace of white-matter voxels
        assert not ((result.labels.array > 1) & ndimage.binary_dilation(plaque, CUBE)).any()
        k, j, i = info.centre_ijk[::-1]
        outward = np.asarray(info.centre_ijk, dtype=float) - nearest[:, k, j, i][::-1]
        outward /= np.linalg.norm(outward)
        cosines.append(abs(float(outward @ np.asarray(info.long_axis_ijk))))
    assert np.median(cosines) < 0.5  # along the wall, where Dawson's fingers are > 0.8
    with pytest.raises(ValueError, match="confluent_count_range"):
        LesionModel(confluent_count_range=(3, 1))
    with pytest.raises(ValueError, match="confluent_volume_range_mm3"):
        LesionModel(confluent_volume_range_mm3=(0.0, 100.0))
