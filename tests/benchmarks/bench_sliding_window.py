"""Benchmark: our sliding window against MONAI's `sliding_window_inference`, same run.

Both run the same randomly initialised (fixed seed) 3D U-Net on the same real FLAIR volume
(open_ms_data cross-sectional patient07, 182x218x182 at 1 mm, z-scored inside the brain) with
the same window (96 voxels), the same overlap (our 32-voxel step == MONAI overlap 2/3), the
same batch size and uniform ("constant") blending, on the same device and thread count.
Prints both times, the ratio (target: ours <= MONAI) and the largest difference between the
two outputs. MONAI is a benchmark-only dependency (``pip install monai``).

Run:  .venv/bin/python tests/benchmarks/bench_sliding_window.py [--base-width 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.device import configure_cpu_threads, select_device, use_mixed_precision
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.pipelines.inference import sliding_window_predict, window_starts

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_IMAGE = REPO_ROOT / "tests/data/open_ms_data/cross_sectional/patient07/FLAIR.nii.gz"


def _load(path: Path, crop: bool) -> tuple[torch.Tensor, torch.Tensor]:
    array = ImageVolume.load(path).array.astype(np.float32)
    brain = array > 0  # the volume is skull-stripped: non-zero voxels are the brain
    if crop:
        bounds = [
            np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)
        ]
        region = tuple(slice(b[0], b[-1] + 1) for b in bounds)
        array, brain = array[region], brain[region]
    values = array[brain]
    array = np.where(brain, (array - values.mean()) / values.std(), 0.0).astype(np.float32)
    return torch.from_numpy(array)[None], torch.from_numpy(brain)


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--base-width", type=int, default=2, help="small keeps CPU time bearable")
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--step", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating runs of each; min is reported"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--cpu-threads", type=int, default=0)
    parser.add_argument("--amp", action="store_true", help="float16 autocast for both (CUDA only)")
    parser.add_argument(
        "--crop", action="store_true", help="crop to the brain's bounding box first"
    )
    args = parser.parse_args(argv)

    from monai.inferers import sliding_window_inference  # benchmark-only dependency

    device = select_device(args.device)
    amp = use_mixed_precision(device, args.amp)
    threads = configure_cpu_threads(args.cpu_threads)
    image, brain = _load(args.image, args.crop)
    torch.manual_seed(0)
    model = (
        UNet3D(image.shape[0], 2, depth=args.depth, base_width=args.base_width).to(device).eval()
    )
    image = image.to(device)
    patch = (args.patch,) * 3
    # MONAI's stride is int(patch * (1 - overlap)); 1 - 32/96 rounds to a stride of 31 (more
    # windows for MONAI), so aim half a voxel above the step to land on it exactly
    overlap = 1.0 - (args.step + 0.5) / args.patch
    monai_stride = int(args.patch * (1.0 - overlap))
    if monai_stride != args.step:
        raise SystemExit(f"MONAI stride would be {monai_stride}, not {args.step}")
    n_windows = int(
        np.prod([len(window_starts(n, args.patch, args.step)) for n in image.shape[1:]])
    )

    network_s = [0.0]  # time inside the network, to separate it from the plumbing

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = model.predict_proba(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        network_s[0] += time.perf_counter() - start
        return result

    def ours() -> torch.Tensor:
        return sliding_window_predict(
            image, predictor, patch, args.step, batch_size=args.batch_size, device=device, amp=amp
        )

    def ours_brain_only() -> torch.Tensor:
        return sliding_window_predict(
            image,
            predictor,
            patch,
            args.step,
            batch_size=args.batch_size,
            device=device,
            amp=amp,
            region_mask=brain,
            background_class=0,
        )

    def monai() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, torch.float16, enabled=amp):
            return sliding_window_inference(
                image[None],
                patch,
                args.batch_size,
                predictor,
                overlap=overlap,
                mode="constant",
                padding_mode="constant",
                cval=0.0,
                device=device,
                sw_device=device,
            )[0].float()

    print(
        f"volume {tuple(image.shape[1:])} (Z, Y, X) from {args.image.name}; device {device}, "
        f"threads {threads}, amp {amp}; U-Net depth {args.depth} width {args.base_width}; "
        f"patch {args.patch}, step {args.step} (MONAI overlap {overlap:.4f}), batch "
        f"{args.batch_size}, {n_windows} windows"
    )
    with torch.inference_mode():  # warm-up: allocator, oneDNN/cuDNN kernel choice
        model.predict_proba(torch.zeros((args.batch_size, image.shape[0], *patch), device=device))

    times: dict[str, list[float]] = {"ours": [], "monai": []}
    plumbing: dict[str, list[float]] = {"ours": [], "monai": []}
    outputs: dict[str, torch.Tensor] = {}
    for repeat in range(args.repeats):
        order = ("ours", "monai") if repeat % 2 == 0 else ("monai", "ours")
        for name in order:
            network_s[0] = 0.0
            seconds, outputs[name] = _timed(ours if name == "ours" else monai, device)
            times[name].append(seconds)
            plumbing[name].append(seconds - network_s[0])
            print(
                f"  run {repeat + 1} {name:5s} {seconds:8.2f} s "
                f"(network {network_s[0]:.2f} s, rest {seconds - network_s[0]:.2f} s)"
            )
    seconds_brain, _ = _timed(ours_brain_only, device)

    # The plumbing alone (windows, batching, blending), with a predictor that costs ~nothing:
    # on a shared CPU the network's time varies more between runs than the plumbing costs.
    def cheap(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat((batch, 1.0 - batch), dim=1)

    cheap_s: dict[str, list[float]] = {"ours": [], "monai": []}
    for _ in range(7):
        cheap_s["ours"].append(
            _timed(
                lambda: sliding_window_predict(
                    image, cheap, patch, args.step, batch_size=args.batch_size, device=device
                ),
                device,
            )[0]
        )
        with torch.inference_mode():
            cheap_s["monai"].append(
                _timed(
                    lambda: sliding_window_inference(
                        image[None],
                        patch,
                        args.batch_size,
                        cheap,
                        overlap=overlap,
                        mode="constant",
                        device=device,
                        sw_device=device,
                    ),
                    device,
                )[0]
            )

    best = {name: min(values) for name, values in times.items()}
    diff = (outputs["ours"] - outputs["monai"].to(outputs["ours"].device)).abs().max().item()
    print(f"ours   min {best['ours']:.2f} s  median {statistics.median(times['ours']):.2f} s")
    print(f"MONAI  min {best['monai']:.2f} s  median {statistics.median(times['monai']):.2f} s")
    print(f"ratio ours/MONAI (min) = {best['ours'] / best['monai']:.3f}  (target <= 1)")
    print(
        f"outside the network: ours min {min(plumbing['ours']):.2f} s, "
        f"MONAI min {min(plumbing['monai']):.2f} s"
    )
    print(f"max |ours - MONAI| = {diff:.2e}")
    print(f"ours, skipping windows without brain: {seconds_brain:.2f} s")
    ours_cheap, monai_cheap = min(cheap_s["ours"]), min(cheap_s["monai"])
    print(
        f"plumbing only (cheap predictor, min of 7): ours {ours_cheap:.3f} s, MONAI "
        f"{monai_cheap:.3f} s, ratio {ours_cheap / monai_cheap:.3f}"
    )


if __name__ == "__main__":
    main()
