"""Sliding-window plumbing, checked against analytic results with fake predictors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lesionwatch.config.schema import InferenceConfig
from lesionwatch.models.device import (
    DeviceUnavailableError,
    configure_cpu_threads,
    select_device,
    use_mixed_precision,
)
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.pipelines.inference import (
    SlidingWindowInferer,
    gaussian_weight_map,
    patch_size_voxels,
    sliding_window_predict,
    window_starts,
)


def double(batch: torch.Tensor) -> torch.Tensor:
    return 2 * batch


@pytest.mark.parametrize("gaussian", [False, True])
@pytest.mark.parametrize(
    ("shape", "patch", "step", "batch_size"),
    [
        ((23, 31, 19), (8, 8, 8), (3, 5, 8), 1),  # steps that do not divide: end-aligned windows
        ((16, 16, 16), (16, 16, 16), (4, 4, 4), 2),  # exactly one window
        ((5, 40, 7), (8, 12, 16), (8, 4, 2), 3),  # thinner than the window on two axes: padded
        ((2, 3, 4), (96, 96, 96), (32, 32, 32), 2),  # far smaller than the seed's 96 mm cube
    ],
)
def test_double_is_reproduced_everywhere_including_borders(
    shape: tuple[int, int, int],
    patch: tuple[int, int, int],
    step: tuple[int, int, int],
    batch_size: int,
    gaussian: bool,
) -> None:
    torch.manual_seed(0)
    image = torch.randn(2, *shape)
    out = sliding_window_predict(
        image, double, patch, step, batch_size=batch_size, gaussian=gaussian
    )
    assert out.shape == (2, *shape) and out.dtype == torch.float32
    torch.testing.assert_close(out, 2 * image, rtol=1e-5, atol=1e-5)


def test_overlaps_are_averaged() -> None:
    """Each window predicts one number (its own start); voxels get the mean over their windows."""
    shape, patch, step = (10, 7, 9), (4, 4, 4), (3, 2, 4)
    image = torch.zeros(1, *shape)
    image[0, :, :, :] = torch.arange(np.prod(shape), dtype=torch.float32).reshape(shape)

    def window_id(batch: torch.Tensor) -> torch.Tensor:
        first_voxel = batch[:, :, :1, :1, :1]  # unique per window: its start's linear index
        return first_voxel.expand_as(batch).clone()

    out = sliding_window_predict(image, window_id, patch, step, batch_size=4)[0].numpy()
    total = np.zeros(shape)
    count = np.zeros(shape)
    starts = [window_starts(n, p, s) for n, p, s in zip(shape, patch, step, strict=True)]
    for z, y, x in itertools.product(*starts):
        region = (slice(z, z + 4), slice(y, y + 4), slice(x, x + 4))
        total[region] += image[0, z, y, x].item()
        count[region] += 1
    assert count.min() >= 1
    np.testing.assert_allclose(out, total / count, rtol=1e-6)


def test_window_starts_cover_the_axis_and_end_on_it() -> None:
    assert window_starts(182, 96, 32) == [0, 32, 64, 86]
    assert window_starts(218, 96, 32) == [0, 32, 64, 96, 122]
    assert window_starts(96, 96, 32) == [0]
    assert window_starts(50, 96, 32) == [0]
    for length, patch, step in [(100, 7, 3), (33, 8, 8), (9, 8, 1)]:
        starts = window_starts(length, patch, step)
        covered = np.zeros(length, dtype=bool)
        for start in starts:
            covered[start : start + patch] = True
        assert covered.all() and starts[-1] == length - patch
        assert all(b - a <= step for a, b in itertools.pairwise(starts))


def test_windows_outside_the_region_are_skipped_and_left_background() -> None:
    shape, patch, step = (24, 24, 24), (8, 8, 8), (8, 8, 8)  # 27 disjoint windows
    image = torch.rand(1, *shape) + 1.0
    region = torch.zeros(shape, dtype=torch.bool)
    region[2, 3, 4] = True  # inside window (0, 0, 0)
    region[20, 10, 17] = True  # inside window (2, 1, 2)
    seen: list[int] = []

    def two_classes(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.shape[0])
        return torch.cat((1 - batch / 4, batch / 4), dim=1)

    out = sliding_window_predict(
        image, two_classes, patch, step, batch_size=4, region_mask=region, background_class=0
    )
    assert sum(seen) == 2
    run = torch.zeros(shape, dtype=torch.bool)
    run[0:8, 0:8, 0:8] = True
    run[16:24, 8:16, 16:24] = True
    torch.testing.assert_close(out[1][run], image[0][run] / 4)
    torch.testing.assert_close(out[0][run], 1 - image[0][run] / 4)
    assert torch.all(out[1][~run] == 0) and torch.all(out[0][~run] == 1)


def test_empty_region_runs_nothing() -> None:
    calls: list[int] = []

    def never(batch: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return batch

    region = torch.zeros((8, 8, 8), dtype=torch.bool)
    out = sliding_window_predict(
        torch.ones(1, 8, 8, 8), never, 4, 4, region_mask=region, background_class=0
    )
    assert calls == [] and torch.all(out[0] == 1)


def test_gaussian_map_is_centred_symmetric_and_floored() -> None:
    weights = gaussian_weight_map((96, 96, 96))
    assert weights.shape == (96, 96, 96)
    assert weights[47, 47, 47] == weights.max() and weights.max() <= 1.0
    torch.testing.assert_close(weights, weights.flip(0).flip(1).flip(2))
    assert weights.min() == pytest.approx(1e-3)
    ratio = weights[47, 47, 47] / weights[47, 47, 47 - 12]  # one sigma = 96 / 8 voxels
    assert ratio.item() == pytest.approx(float(np.exp(0.5 * ((12.5 / 12) ** 2 - (0.5 / 12) ** 2))))


def test_invalid_arguments_are_refused() -> None:
    image = torch.zeros(1, 8, 8, 8)
    with pytest.raises(ValueError, match="larger than the patch"):
        sliding_window_predict(image, double, 4, 5)
    with pytest.raises(ValueError, match=r"\(C, Z, Y, X\)"):
        sliding_window_predict(image[0], double, 4, 4)
    with pytest.raises(ValueError, match="only supported on CUDA"):
        sliding_window_predict(image, double, 4, 4, device="cpu", amp=True)
    with pytest.raises(ValueError, match="region_mask shape"):
        sliding_window_predict(
            image, double, 4, 4, region_mask=torch.ones(8, 8, 9, dtype=torch.bool)
        )


def test_patch_size_in_voxels_follows_spacing_and_network_multiple() -> None:
    assert patch_size_voxels(96, (1.0, 1.0, 1.0), 16) == (96, 96, 96)
    # spacing is (i, j, k); the result is (Z, Y, X) = (k, j, i)
    assert patch_size_voxels(96, (0.5, 1.0, 3.0), 16) == (32, 96, 192)
    assert patch_size_voxels(32, (1.0, 1.0, 1.0)) == (32, 32, 32)


def test_inferer_with_a_real_network_matches_a_direct_forward_pass() -> None:
    torch.manual_seed(0)
    model = UNet3D(in_channels=1, out_classes=2, depth=3, base_width=2)
    config = InferenceConfig(device="cpu", patch_size_mm=16, step_mm=8, batch_size=3)
    inferer = SlidingWindowInferer(model, config)
    assert inferer.patch_vox == (16, 16, 16) and inferer.step_vox == (8, 8, 8)
    image = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    out = inferer(image)
    with torch.inference_mode():
        direct = model.predict_proba(torch.from_numpy(image)[None, None])[0]
    torch.testing.assert_close(out, direct)
    bigger = np.random.default_rng(1).normal(size=(20, 30, 17)).astype(np.float32)
    probabilities = inferer(bigger, region_mask=np.ones(bigger.shape, dtype=bool))
    assert probabilities.shape == (2, 20, 30, 17)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(20, 30, 17))


def test_cpu_thread_count_is_applied() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        assert configure_cpu_threads(0) == 1  # 0 keeps what is in effect
        SlidingWindowInferer(
            UNet3D(depth=3, base_width=2), InferenceConfig(device="cpu", cpu_threads=1)
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_device_selection() -> None:
    has_gpu = torch.cuda.is_available()
    assert select_device("auto").type == ("cuda" if has_gpu else "cpu")
    assert select_device("cpu").type == "cpu"
    assert use_mixed_precision(torch.device("cpu"), True) is False
    assert use_mixed_precision(torch.device("cuda"), True) is True
    assert use_mixed_precision(torch.device("cuda"), False) is False
    if not has_gpu:
        with pytest.raises(DeviceUnavailableError, match="torch sees no CUDA GPU"):
            select_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_precision_agrees_with_float32() -> None:
    torch.manual_seed(0)
    model = UNet3D(in_channels=1, out_classes=2, depth=3, base_width=4)
    image = torch.randn(1, 40, 36, 33)
    cpu = SlidingWindowInferer(model, InferenceConfig(device="cpu", patch_size_mm=16, step_mm=8))(
        image
    )
    gpu = SlidingWindowInferer(model, InferenceConfig(device="auto", patch_size_mm=16, step_mm=8))
    assert gpu.device.type == "cuda" and gpu.amp
    torch.testing.assert_close(gpu(image), cpu, atol=2e-2, rtol=0)
    doubled = sliding_window_predict(image, double, 16, 5, device="cuda", gaussian=True)
    torch.testing.assert_close(doubled.cpu(), 2 * image, rtol=1e-5, atol=1e-5)
