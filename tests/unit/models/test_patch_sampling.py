"""Patch sampling on the real patient07 lesion mask (a 96 x 96 x 80 crop of it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.datasets import TrainingCase
from lesionwatch.models.patch_sampling import (
    PatchSampler,
    PatchSamplingError,
    subject_balanced_weights,
)


@pytest.fixture(scope="module")
def case(test_data: Path) -> TrainingCase:
    folder = test_data / "open_ms_data" / "cross_sectional" / "patient07"
    flair = ImageVolume.load(folder / "FLAIR.nii.gz")
    mask = ImageVolume.load(folder / "lesion_mask.nii.gz")
    centre = np.round(ndimage.center_of_mass(flair.array > 0)).astype(int)
    box = tuple(slice(int(c) - h, int(c) + h) for c, h in zip(centre, (48, 48, 40), strict=True))
    label = (mask.array[box] > 0).astype(np.uint8)
    brain = flair.array[box] > 0
    image = flair.array[box][None].astype(np.float32)
    grid = ImageVolume(label, mask.spacing_mm, mask.origin_mm, mask.direction)
    return TrainingCase("p07-crop", "p07", ("flair",), image, label, brain, grid)


def test_half_the_patches_hold_lesions_and_all_lie_inside(case: TrainingCase):
    sampler = PatchSampler(32)
    rng = np.random.default_rng(0)
    patches = sampler.sample_batch([(0, case)], 400, rng)
    requested = np.mean([p.lesion_requested for p in patches])
    assert 0.43 < requested < 0.57
    shape = case.label.shape
    for patch in patches:
        assert patch.size_kji == (32, 32, 32)
        ends = np.asarray(patch.start_kji) + np.asarray(patch.size_kji)
        assert min(patch.start_kji) >= 0 and np.all(ends <= np.asarray(shape))
        holds = bool(case.label[patch.slices].any())
        assert holds == patch.has_lesion
        if patch.lesion_requested:
            assert holds
        else:  # centred on brain outside lesions
            assert case.brain[patch.centre_kji] and not case.label[patch.centre_kji]
    negatives = [p for p in patches if not p.lesion_requested]
    assert np.mean([not p.has_lesion for p in negatives]) > 0.5  # mostly lesion-free


def test_lesion_fraction_zero_and_one(case: TrainingCase):
    rng = np.random.default_rng(1)
    assert all(
        p.has_lesion
        for p in PatchSampler(24, lesion_fraction=1.0).sample_batch([(0, case)], 50, rng)
    )
    assert not any(
        p.lesion_requested
        for p in PatchSampler(24, lesion_fraction=0.0).sample_batch([(0, case)], 50, rng)
    )


def test_same_seed_same_patches(case: TrainingCase):
    a = PatchSampler(32).sample_batch([(0, case)], 20, np.random.default_rng(5))
    b = PatchSampler(32).sample_batch([(0, case)], 20, np.random.default_rng(5))
    assert a == b


def test_case_without_lesions_gives_negatives(case: TrainingCase):
    empty = TrainingCase(
        "empty",
        "p07",
        case.channels,
        case.image,
        np.zeros_like(case.label),
        case.brain,
        case.grid.with_array(np.zeros_like(case.label)),
    )
    patches = PatchSampler(32, lesion_fraction=1.0).sample_batch(
        [(0, empty)], 10, np.random.default_rng(2)
    )
    assert not any(p.lesion_requested or p.has_lesion for p in patches)


def test_patch_larger_than_volume_starts_at_zero(case: TrainingCase):
    patch = PatchSampler((128, 32, 32)).sample(case, np.random.default_rng(3), want_lesion=True)
    assert patch.start_kji[0] == 0


def test_bad_parameters():
    with pytest.raises(PatchSamplingError, match="lesion_fraction"):
        PatchSampler(32, lesion_fraction=1.5)
    with pytest.raises(PatchSamplingError, match="patch size"):
        PatchSampler((32, 32))  # type: ignore[arg-type]


def test_subject_balanced_weights_give_each_person_an_equal_share():
    weights = subject_balanced_weights(["P14", "P14", "P14", "p07", "p19"])
    assert weights.sum() == pytest.approx(1.0)
    assert weights[:3].sum() == pytest.approx(weights[3]) == pytest.approx(weights[4])
    with pytest.raises(PatchSamplingError):
        subject_balanced_weights([])


def test_weighted_batches_follow_the_case_weights(case: TrainingCase):
    sampler = PatchSampler(32)
    pool = [(0, case), (1, case), (2, case)]
    rng = np.random.default_rng(5)
    drawn = [
        p.case_index for _ in range(300) for p in sampler.sample_batch(pool, 2, rng, [3, 1, 0])
    ]
    counts = np.bincount(drawn, minlength=3)
    assert counts[2] == 0 and 0.65 < counts[0] / len(drawn) < 0.85
    with pytest.raises(PatchSamplingError, match="weight"):
        sampler.sample_batch(pool, 2, rng, [1, 1])


def test_lesion_balance_draws_lesions_not_voxels():
    """One 1000-voxel plaque and nine 8-voxel lesions: voxel draws centre ~93 % of positive
    patches on the plaque, per-lesion draws ~10 %; off, the random stream is unchanged."""
    label = np.zeros((64, 64, 64), dtype=np.uint8)
    label[10:20, 10:20, 10:20] = 1
    for n in range(9):
        k = 8 + 5 * n
        label[k : k + 2, 44:46, 44:46] = 1
    grid = ImageVolume(label, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    brain = np.ones_like(label, dtype=bool)
    case = TrainingCase(
        "toy", "toy", ("flair",), label[None].astype(np.float32), label, brain, grid
    )
    plaque = np.zeros_like(label, dtype=bool)
    plaque[10:20, 10:20, 10:20] = True

    def plaque_share(balance: float, seed: int = 0) -> float:
        sampler = PatchSampler(8, lesion_fraction=1.0, jitter_fraction=0.0, lesion_balance=balance)
        patches = sampler.sample_batch([(0, case)], 400, np.random.default_rng(seed))
        assert all(label[p.centre_kji] for p in patches)
        return float(np.mean([plaque[p.centre_kji] for p in patches]))

    assert plaque_share(0.0) > 0.85
    assert 0.04 < plaque_share(1.0) < 0.18
    assert 0.4 < plaque_share(0.5) < 0.65
    plain = PatchSampler(8).sample_batch([(0, case)], 50, np.random.default_rng(3))
    off = PatchSampler(8, lesion_balance=0.0).sample_batch(
        [(0, case)], 50, np.random.default_rng(3)
    )
    assert plain == off
    with pytest.raises(PatchSamplingError, match="lesion_balance"):
        PatchSampler(8, lesion_balance=1.5)
