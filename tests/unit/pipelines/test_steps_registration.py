"""Rigid/affine registration with antspyx on a small real brain with a known displacement."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.steps.registration import (
    RegistrationError,
    RegistrationKind,
    register,
)
from lesionwatch.pipelines.steps.resampling import Grid, Interpolation, resample_to_grid

# The displacement used to make the moving image: 8 deg about z, 4 deg about x, shifted.
ROTATION_RAD = (np.deg2rad(4.0), 0.0, np.deg2rad(8.0))
TRANSLATION_MM = (6.0, -4.0, 3.0)


def known_transform(centre: tuple[float, float, float]) -> sitk.Euler3DTransform:
    transform = sitk.Euler3DTransform()
    transform.SetCenter(centre)
    transform.SetRotation(*ROTATION_RAD)
    transform.SetTranslation(TRANSLATION_MM)
    return transform


def as_matrix(transform: sitk.Euler3DTransform) -> np.ndarray:
    matrix = np.eye(4)
    rotation = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre = np.asarray(transform.GetCenter())
    matrix[:3, :3] = rotation
    matrix[:3, 3] = np.asarray(transform.GetTranslation()) + centre - rotation @ centre
    return matrix


def ideal_warp(moving: ImageVolume, fixed: ImageVolume, transform: sitk.Transform) -> np.ndarray:
    """The moving image put back with the known transform: the best any registration can do
    (the moving image's 4 mm slices blur it, so it never equals the fixed image)."""
    warped = sitk.Resample(
        moving.to_sitk(), fixed.to_sitk(), transform.GetInverse(), sitk.sitkLinear, 0.0
    )
    return sitk.GetArrayFromImage(warped)


@pytest.fixture(scope="module")
def fixed_and_moving(test_data: Path) -> tuple[ImageVolume, ImageVolume, sitk.Transform]:
    t1 = ImageVolume.load(test_data / "open_ms_data/cross_sectional/patient07/T1.nii.gz")
    # 3 mm keeps the test fast; the moving grid differs in spacing and size as well.
    fixed_grid = Grid((61, 73, 61), (3.0, 3.0, 3.0), (-90.0, 126.0, -72.0), t1.direction.flatten())
    fixed = resample_to_grid(t1, fixed_grid, interpolation=Interpolation.LINEAR)
    moving_ref = Grid((70, 80, 45), (2.6, 2.6, 4.0), (-90.0, 120.0, -70.0), t1.direction.flatten())
    centre = tuple(float(c) for c in fixed.index_to_lps(np.asarray(fixed.shape_ijk) / 2.0))
    transform = known_transform(centre)
    # moving(x) = fixed(T(x)): the anatomy moved by T^-1.
    moving_sitk = sitk.Resample(
        sitk.Cast(t1.to_sitk(), sitk.sitkFloat32),
        moving_ref.reference_sitk(),
        transform,
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    return fixed, ImageVolume.from_sitk(moving_sitk), transform


def test_rigid_registration_recovers_the_known_displacement(
    fixed_and_moving: tuple[ImageVolume, ImageVolume, sitk.Euler3DTransform],
) -> None:
    fixed, moving, transform = fixed_and_moving
    result = register(moving, fixed, "rigid")
    try:
        assert result.kind is RegistrationKind.RIGID
        assert result.warped.same_grid(fixed)
        inside = fixed.array > 0.2 * fixed.array.max()
        ideal = ideal_warp(moving, fixed, transform)
        correlation = np.corrcoef(result.warped.array[inside], ideal[inside])[0, 1]
        assert correlation > 0.99, correlation
        # The result maps fixed points to moving points: the inverse of the displacement.
        composed = as_matrix(transform) @ result.affine_matrix
        np.testing.assert_allclose(composed[:3, :3], np.eye(3), atol=0.02)
        np.testing.assert_allclose(composed[:3, 3], 0.0, atol=1.5)

        # The same transform carries a label of the moving series onto the fixed grid.
        moving_label = moving.with_array((moving.array > 0.2 * fixed.array.max()).astype(np.uint8))
        label = result.apply(moving_label, is_label=True)
        assert label.same_grid(fixed) and label.array.dtype == np.uint8
        dice = 2 * (label.array.astype(bool) & inside).sum() / (label.array.sum() + inside.sum())
        assert dice > 0.93, dice
    finally:
        result.close()
    with pytest.raises(RegistrationError, match="closed"):
        result.apply(moving)


def test_affine_registration_and_bad_mask(
    fixed_and_moving: tuple[ImageVolume, ImageVolume, sitk.Euler3DTransform],
) -> None:
    fixed, moving, transform = fixed_and_moving
    with pytest.raises(RegistrationError, match="fixed_mask"):
        register(moving, fixed, "affine", fixed_mask=moving)
    result = register(moving, fixed, RegistrationKind.AFFINE)
    inside = fixed.array > 0.2 * fixed.array.max()
    ideal = ideal_warp(moving, fixed, transform)
    correlation = np.corrcoef(result.warped.array[inside], ideal[inside])[0, 1]
    assert correlation > 0.98, correlation
    directory = result.transform_paths[0].parent
    del result  # the transform files go with the result
    gc.collect()
    assert not directory.exists()


def test_syn_on_a_coarse_working_grid_still_aligns_at_full_resolution(
    fixed_and_moving: tuple[ImageVolume, ImageVolume, sitk.Euler3DTransform],
) -> None:
    fixed, moving, transform = fixed_and_moving
    result = register(moving, fixed, "syn", working_spacing_mm=4.0)
    try:
        assert result.kind is RegistrationKind.SYN
        assert result.warped.same_grid(fixed)  # the fit grid is coarser, the output is not
        assert [p.suffix for p in result.transform_paths] == [".gz", ".mat"]  # warp, affine
        inside = fixed.array > 0.2 * fixed.array.max()
        ideal = ideal_warp(moving, fixed, transform)
        correlation = np.corrcoef(result.warped.array[inside], ideal[inside])[0, 1]
        assert correlation > 0.95, correlation
        composed = as_matrix(transform) @ result.affine_matrix
        np.testing.assert_allclose(composed[:3, :3], np.eye(3), atol=0.03)
    finally:
        result.close()
