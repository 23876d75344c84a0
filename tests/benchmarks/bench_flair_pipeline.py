"""Per-step time breakdown of the FLAIR pipeline on a real clinical case.

Runs `run_flair_pipeline` on open_ms_data longitudinal patient01's follow-up FLAIR (raw
scanner space, 2-D FLAIR with thick slices) and prints the wall time of every step. Until
trained weights ship, a seeded random network of the default shape stands in (timing does
not depend on the weights). Usage:

    .venv/bin/python tests/benchmarks/bench_flair_pipeline.py [--weights W.pt] [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lesionwatch.config.schema import InferenceConfig, PipelineConfig
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import load_model, save_model
from lesionwatch.pipelines.flair import run_flair_pipeline

CASE = Path(__file__).resolve().parents[1] / "data/open_ms_data/longitudinal/patient01"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--base-width", type=int, default=8)
    parser.add_argument(
        "--with-t1", action="store_true", help="also register the T1 (model must take it)"
    )
    args = parser.parse_args()

    weights = args.weights
    if weights is None:
        torch.manual_seed(0)
        weights = Path(tempfile.gettempdir()) / f"lesionwatch-bench-flair-w{args.base_width}.pt"
        save_model(
            UNet3D(1, 2, depth=4, base_width=args.base_width), weights,
            task="flair", channels=("flair",),
            version="bench-random", training_data="none: random weights for timing only",
        )  # fmt: skip
    model, card = load_model(weights, "flair", ("flair",))
    flair = ImageVolume.load(CASE / "study2_FLAIR.nii.gz")
    print(f"case: {CASE.name} study2 FLAIR, {flair.shape_ijk} voxels at {flair.spacing_mm} mm")
    inference = InferenceConfig(device=args.device)
    start = time.perf_counter()
    result = run_flair_pipeline(flair, None, model, card, inference, PipelineConfig())
    total = time.perf_counter() - start
    print(f"{'step':<32}{'seconds':>10}{'share':>8}")
    for name, seconds in result.timings_s.items():
        print(f"{name:<32}{seconds:>10.2f}{seconds / total:>8.0%}")
    print(f"{'total':<32}{total:>10.2f}")
    print(
        f"device {inference.device}, torch threads {torch.get_num_threads()}, "
        f"{len(result.lesions)} lesions"
    )


if __name__ == "__main__":
    main()
