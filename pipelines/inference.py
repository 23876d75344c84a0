"""Sliding-window inference: a pure function plus a thin class binding a model to the config.

The seed's scheme: cubes of 96 mm moved in 32 mm steps, overlapping predictions averaged
(optionally weighted by a Gaussian that trusts patch centres more than edges). The last
window on each axis is aligned to the end of the volume, so borders get full patches and no
voxel is predicted from padding unless the volume is smaller than one patch (then it is
zero-padded at the end and cropped back). Windows that contain no voxel of `region_mask`
(the brain) are not run at all; voxels that no run window covers are background.

Speed: one preallocated batch buffer and two accumulators on the target device, in-place
adds of whole patches, `torch.inference_mode`, float16 autocast on CUDA; there is no Python
work per voxel, only per window.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from lesionwatch.config.schema import InferenceConfig
from lesionwatch.models.device import configure_cpu_threads, select_device, use_mixed_precision
from lesionwatch.models.unet3d import UNet3D

__all__ = [
    "Predictor",
    "SlidingWindowInferer",
    "gaussian_weight_map",
    "patch_size_voxels",
    "sliding_window_predict",
    "window_starts",
]

Predictor = Callable[[torch.Tensor], torch.Tensor]
Size3 = int | Sequence[int]

_GAUSSIAN_SIGMA_SCALE = 0.125  # sigma = patch size / 8, as nnU-Net and MONAI use
_GAUSSIAN_FLOOR = 1e-3  # edge weights never reach zero, so every covered voxel has weight


def _triple(value: Size3, name: str) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{name} must be one positive int or three, got {value!r}")
    return values  # type: ignore[return-value]


def window_starts(length: int, patch: int, step: int) -> list[int]:
    """Start indices along one axis: every `step`, the last one aligned to the end."""
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch + 1, step))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def gaussian_weight_map(
    patch: tuple[int, int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Separable Gaussian importance map of shape `patch` (max 1, floor 1e-3)."""
    axes = []
    for size in patch:
        x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0
        axes.append(torch.exp(-(x**2) / (2 * (_GAUSSIAN_SIGMA_SCALE * size) ** 2)))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return weights.clamp_(min=_GAUSSIAN_FLOOR)


@torch.inference_mode()
def sliding_window_predict(
    image: torch.Tensor,
    predictor: Predictor,
    patch_size_vox: Size3,
    step_vox: Size3,
    *,
    batch_size: int = 2,
    gaussian: bool = False,
    region_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    amp: bool = False,
    background_class: int | None = None,
) -> torch.Tensor:
    """Run `predictor` over overlapping windows of `image` and blend the results.

    Parameters
    ----------
    image:
        Tensor (C, Z, Y, X).
    predictor:
        Maps a batch (B, C, pz, py, px) to (B, K, pz, py, px), e.g. a network's softmax.
    patch_size_vox, step_vox:
        Window size and stride in voxels (one int or three, in Z, Y, X order).
    batch_size:
        Windows per predictor call.
    gaussian:
        Weight each window by a Gaussian centred on it instead of uniformly.
    region_mask:
        Bool tensor (Z, Y, X); windows without a single True voxel are skipped.
    device:
        Where the predictor and accumulators run (default: the image's device).
    amp:
        Run the predictor under float16 autocast (CUDA only).
    background_class:
        Channel set to 1 where no window was run (all channels are 0 there otherwise).

    Returns
    -------
    Tensor (K, Z, Y, X), float32, on `device`.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (C, Z, Y, X), got shape {tuple(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    patch = _triple(patch_size_vox, "patch_size_vox")
    step = _triple(step_vox, "step_vox")
    if any(s > p for s, p in zip(step, patch, strict=True)):
        raise ValueError(f"step {step} is larger than the patch {patch}: voxels would be skipped")
    device = torch.device(device) if device is not None else image.device
    if amp and device.type != "cuda":
        raise ValueError("amp (float16 autocast) is only supported on CUDA devices")

    spatial = tuple(int(s) for s in image.shape[1:])
    image = image.to(device=device, dtype=torch.float32)
    pad = [max(p - s, 0) for p, s in zip(patch, spatial, strict=True)]
    if any(pad):  # smaller than one window: zero-pad at the end, crop at the end
        image = F.pad(image, (0, pad[2], 0, pad[1], 0, pad[0]))
    padded = tuple(int(s) for s in image.shape[1:])

    axis_starts = [window_starts(n, p, s) for n, p, s in zip(padded, patch, step, strict=True)]
    windows = [
        tuple(slice(a, a + p) for a, p in zip(start, patch, strict=True))
        for start in itertools.product(*axis_starts)
    ]
    n_windows = len(windows)
    if region_mask is not None:
        if tuple(region_mask.shape) != spatial:
            raise ValueError(
                f"region_mask shape {tuple(region_mask.shape)} does not match image {spatial}"
            )
        mask = region_mask.to(device="cpu", dtype=torch.bool)
        if any(pad):
            mask = F.pad(mask, (0, pad[2], 0, pad[1], 0, pad[0]))
        windows = [w for w in windows if bool(mask[w].any())]

    weight = gaussian_weight_map(patch, device) if gaussian else None
    # Uniform weights over the full window grid: the normaliser is the outer product of the
    # per-axis window counts, so it needs no per-window work at all.
    separable = weight is None and len(windows) == n_windows
    norm = (
        _separable_counts(padded, patch, axis_starts, device)
        if separable
        else torch.zeros(padded, dtype=torch.float32, device=device)
    )
    buffer = torch.empty((batch_size, image.shape[0], *patch), dtype=torch.float32, device=device)
    output: torch.Tensor | None = None
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        for n, window in enumerate(chunk):
            buffer[n].copy_(image[(slice(None), *window)])
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            predicted = predictor(buffer[: len(chunk)])
        if output is None:
            output = torch.zeros((predicted.shape[1], *padded), dtype=torch.float32, device=device)
        for n, window in enumerate(chunk):
            target = output[(slice(None), *window)]
            if weight is None:
                target.add_(predicted[n])
                if not separable:
                    norm[window].add_(1.0)
            else:
                target.addcmul_(predicted[n], weight)
                norm[window].add_(weight)

    if output is None:  # no window touched the region: everything is background
        channels = 1 if background_class is None else background_class + 1
        output = torch.zeros((channels, *padded), dtype=torch.float32, device=device)
    if separable:  # every voxel is covered by at least one window
        output.div_(norm)
    else:
        uncovered = norm == 0
        output.div_(norm.clamp_(min=torch.finfo(torch.float32).tiny))
        if background_class is not None and bool(uncovered.any()):
            output[background_class].masked_fill_(uncovered, 1.0)
    return output[:, : spatial[0], : spatial[1], : spatial[2]]


def _separable_counts(
    shape: tuple[int, ...],
    patch: tuple[int, int, int],
    axis_starts: list[list[int]],
    device: torch.device,
) -> torch.Tensor:
    """How many windows cover each voxel, for windows on the full grid of `axis_starts`."""
    counts = []
    for length, size, starts in zip(shape, patch, axis_starts, strict=True):
        count = torch.zeros(length, dtype=torch.float32, device=device)
        for start in starts:
            count[start : start + size] += 1.0
        counts.append(count)
    return counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]


def patch_size_voxels(
    patch_size_mm: float, spacing_mm: Sequence[float], multiple: int = 1
) -> tuple[int, int, int]:
    """Window size in voxels for a cube of `patch_size_mm`, rounded to `multiple` (Z, Y, X).

    `spacing_mm` is in (i, j, k) order, as `ImageVolume` stores it.
    """
    sizes = []
    for spacing in reversed(tuple(spacing_mm)):
        voxels = max(multiple, round(patch_size_mm / spacing / multiple) * multiple)
        sizes.append(int(voxels))
    return sizes[0], sizes[1], sizes[2]


@dataclass
class SlidingWindowInferer:
    """A network bound to the `inference` config: device, threads, window, batching, precision."""

    model: UNet3D
    config: InferenceConfig
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        self.device = select_device(self.config.device)
        self.amp = use_mixed_precision(self.device, self.config.mixed_precision)
        self.cpu_threads = configure_cpu_threads(self.config.cpu_threads)
        self.patch_vox = patch_size_voxels(
            self.config.patch_size_mm, self.spacing_mm, self.model.size_multiple
        )
        self.step_vox = patch_size_voxels(self.config.step_mm, self.spacing_mm)
        self.step_vox = tuple(min(s, p) for s, p in zip(self.step_vox, self.patch_vox, strict=True))  # type: ignore[assignment]
        self.model = self.model.to(self.device).eval()

    def __call__(
        self,
        image: torch.Tensor | npt.NDArray[np.floating],
        region_mask: torch.Tensor | npt.NDArray[np.bool_] | None = None,
    ) -> torch.Tensor:
        """Class probabilities (K, Z, Y, X) on the CPU for an image (C, Z, Y, X) or (Z, Y, X)."""
        tensor = torch.as_tensor(image, dtype=torch.float32)
        if tensor.ndim == 3:
            tensor = tensor[None]
        mask = None if region_mask is None else torch.as_tensor(region_mask, dtype=torch.bool)
        probabilities = sliding_window_predict(
            tensor,
            self.model.predict_proba,
            self.patch_vox,
            self.step_vox,
            batch_size=self.config.batch_size,
            gaussian=self.config.gaussian_weighting,
            region_mask=mask,
            device=self.device,
            amp=self.amp,
            background_class=0,
        )
        return probabilities.cpu()
