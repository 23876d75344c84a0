"""Time per step of the new-lesion pipeline on a real longitudinal pair, per registration kind.

Runs `lesionwatch`'s own pipeline (`pipelines.registry` -> `run_pipeline`, the worker's path)
with the shipped FLAIR and new-lesion models on open_ms_data longitudinal patient03 (raw 2D
FLAIRs, 0.57 / 0.72 mm in-plane, 3.3 / 3.0 mm slices), once per registration kind, and prints
each step's seconds and the whole run against the affine default as a ratio.

    python tests/benchmarks/bench_new_lesion_steps.py [--patient P] [--kinds affine,rigid,syn]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lesionwatch.config.schema import (
    InferenceConfig,
    NewLesionsPipelineConfig,
    PipelinesConfig,
    SeriesClass,
)
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.device import select_device
from lesionwatch.pipelines.model_cache import ModelCache
from lesionwatch.pipelines.registry import get_pipeline
from lesionwatch.pipelines.runner import run_pipeline

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--patient", default="patient03")
    parser.add_argument("--kinds", default="affine,rigid,syn")
    args = parser.parse_args()
    folder = args.data_root / "open_ms_data" / "longitudinal" / args.patient
    prior = ImageVolume.load(folder / "study1_FLAIR.nii.gz")
    current = ImageVolume.load(folder / "study2_FLAIR.nii.gz")
    inference = InferenceConfig()
    device = select_device(inference.device)
    print(f"{args.patient}: device {device}, {torch.get_num_threads()} CPU threads")
    totals: dict[str, float] = {}
    for kind in args.kinds.split(","):
        pipelines = PipelinesConfig(new_lesions=NewLesionsPipelineConfig(registration=kind))  # type: ignore[arg-type]
        models = ModelCache(pipelines, device)
        spec = get_pipeline("new_lesions")
        started = time.perf_counter()
        result = run_pipeline(
            spec, {SeriesClass.FLAIR: current}, {SeriesClass.FLAIR: prior}, models, inference,
            pipelines,
        )  # fmt: skip
        totals[kind] = time.perf_counter() - started
        change = result.change
        print(
            f"\n{kind}: {totals[kind]:.1f} s in all, similarity {change.similarity:.3f}, "
            f"{len(result.lesions)} new lesion(s), tracking {change.tracking.counts}"
        )
        for step, seconds in result.timings_s.items():
            print(f"  {step:<40} {seconds:7.1f} s")
    if "affine" in totals:
        print("\nwhole pipeline vs the affine default:")
        for kind, seconds in totals.items():
            print(f"  {kind:<8} {seconds:7.1f} s  x{seconds / totals['affine']:.2f}")


if __name__ == "__main__":
    main()
