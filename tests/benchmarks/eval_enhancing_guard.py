"""The enhancing guard on real post-contrast studies and on the held-out synthetic cases.

Real studies: open_ms_data cross-sectional patients 07 and 19 (T1, T1POST, FLAIR and the
expert consensus T2/FLAIR lesion mask, MNI 1 mm). No real enhancing-lesion masks exist, so a
candidate is judged by whether it touches an expert FLAIR lesion: an enhancing MS lesion is
always a FLAIR lesion, so a candidate outside every expert lesion is a false positive. The
shipped models run as the worker runs them:

- "no guard": the enhancing model's candidates as they were before the guard;
- "guard, no FLAIR": size floor and brain-surface rule only (a study without FLAIR);
- "guard": all rules, against the lesions the shipped FLAIR model finds in the same study
  (what the service does);
- "guard, expert FLAIR": all rules against the expert mask (the guard's ceiling).

Synthetic cases: the shipped model's 4 held-out synthetic cases (the reproduce plan's stream,
seed + 1000, as in models/weights/enhancing.RESULTS.md), scored with and without the size and
surface rules (synthetic cases have no FLAIR), so the guard's cost on true lesions shows.

    .venv/bin/python tests/benchmarks/eval_enhancing_guard.py [--data-root DIR] [--markdown]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lesionwatch.config.schema import EnhancingPipelineConfig, InferenceConfig, PipelinesConfig
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.datasets import default_data_root
from lesionwatch.models.device import select_device
from lesionwatch.pipelines.enhancing import run_enhancing_pipeline
from lesionwatch.pipelines.enhancing_guard import GuardSettings, guard_candidates
from lesionwatch.pipelines.flair import run_flair_pipeline
from lesionwatch.pipelines.model_cache import ModelCache
from lesionwatch.pipelines.postprocess import label_lesions
from lesionwatch.pipelines.registry import PIPELINES
from lesionwatch.pipelines.steps.resampling import Grid, Interpolation, resample_to_grid

PATIENTS = ("patient07", "patient19")
OFF = EnhancingPipelineConfig(
    require_flair_lesion=False, guard_min_volume_mm3=0.0, surface_margin_mm=0.0
)
ON = EnhancingPipelineConfig()


@dataclass(frozen=True)
class Row:
    study: str
    arm: str
    lesions: int
    in_known_lesion: int
    volume_ml: float
    removed: str


def _in_known(mask: ImageVolume, expert: ImageVolume, lesions: list) -> int:  # type: ignore[type-arg]
    """How many of the mask's lesions touch an expert FLAIR lesion."""
    expert_on_grid = (
        resample_to_grid(
            expert.with_array((expert.array > 0).astype(np.uint8)),
            Grid.of(mask),
            interpolation=Interpolation.NEAREST,
        ).array
        > 0
    )
    labels, _ = label_lesions(mask.with_array(mask.array.astype(np.float32)), 0.5)
    touched = set(np.unique(labels.array[expert_on_grid & (labels.array > 0)])) - {0}
    return len(touched)


def real_studies(data_root: Path, inference: InferenceConfig) -> list[Row]:
    models = ModelCache(PipelinesConfig(), select_device(inference.device))
    enhancing, flair = models.get(PIPELINES["enhancing"]), models.get(PIPELINES["flair"])
    rows = []
    for patient in PATIENTS:
        folder = data_root / "open_ms_data" / "cross_sectional" / patient
        t1, t1post, flair_image, expert = (
            ImageVolume.load(folder / f"{name}.nii.gz")
            for name in ("T1", "T1POST", "FLAIR", "lesion_mask")
        )
        started = time.perf_counter()
        flair_lesions = run_flair_pipeline(
            flair_image, None, flair.network, flair.card, inference, PipelinesConfig().flair
        ).mask_source_grid
        arms = [
            ("no guard", OFF, None),
            ("guard, no FLAIR", ON, None),
            ("guard", ON, flair_lesions),
            ("guard, expert FLAIR", ON, expert),
        ]
        for arm, config, reference in arms:
            result = run_enhancing_pipeline(
                t1, t1post, enhancing.network, enhancing.card, inference, config, reference
            )
            review = result.review
            removed = ", ".join(f"{n} {why}" for why, n in review.removed.items() if n) or "-"
            rows.append(
                Row(
                    patient,
                    arm,
                    len(result.lesions),
                    _in_known(result.mask_source_grid, expert, result.lesions),
                    sum(lesion.volume_ml for lesion in result.lesions),
                    removed,
                )
            )
        print(f"  {patient}: {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def synthetic_cases(
    data_root: Path, inference: InferenceConfig
) -> list[tuple[str, dict[str, float]]]:
    """Mean Dice, Anima sensitivity and PPV on the held-out synthetic cases, guard off/on."""
    from lesionwatch.models.evaluate import EvaluateSettings, predict_probability
    from lesionwatch.models.metrics import AnimaDetectionParams, evaluate_case, summarize_cases
    from lesionwatch.models.reproduce import PLANS, _synthetic
    from lesionwatch.models.weights import load_model

    plan = PLANS["enhancing"]
    cases = _synthetic(plan, data_root, plan.held_out_synthetic_cases, plan.synthetic_seed + 1000)
    model, card = load_model(
        Path(__file__).resolve().parents[2] / "models" / "weights" / "enhancing.pt",
        "enhancing",
        ("t1_pre", "t1_post", "difference"),
    )
    settings = plan.evaluate or EvaluateSettings()
    # As the card scored them (Anima -v 3 mm3), and counting only lesions of at least the
    # guard's size floor (about the 3 mm diameter that trials count as enhancing lesions).
    rules = {
        "": AnimaDetectionParams(min_lesion_volume_mm3=settings.min_lesion_volume_mm3),
        ", lesions >= 10 mm3": AnimaDetectionParams(min_lesion_volume_mm3=ON.guard_min_volume_mm3),
    }
    guard = GuardSettings(
        min_volume_mm3=ON.guard_min_volume_mm3, surface_margin_mm=ON.surface_margin_mm
    )
    scored: dict[str, list] = {}  # type: ignore[type-arg]
    for index in range(len(cases)):
        case = cases.load(index)
        probability = case.label_volume(predict_probability(model, card, case, settings))
        # As the card's figures were made: the thresholded map, small ones left to Anima -v.
        unguarded = probability.array >= settings.threshold
        labels, lesions = label_lesions(probability, settings.threshold)
        kept, _, _ = guard_candidates(
            labels, lesions, case.label_volume(case.brain.astype(np.uint8)), None, guard
        )
        for arm, mask in (("no guard", unguarded), ("guard (size, surface)", kept.array > 0)):
            for suffix, params in rules.items():
                scored.setdefault(arm + suffix, []).append(
                    evaluate_case(
                        case.label_volume(mask.astype(np.uint8)), case.label_volume(),
                        case_id=case.case_id, params=params, connectivity=settings.connectivity,
                    )
                )  # fmt: skip
    results = []
    for arm, per_case in scored.items():
        summary = summarize_cases(per_case)
        results.append(
            (
                arm,
                {
                    name: summary[name].mean
                    for name in ("dice", "anima_sensitivity", "anima_ppv", "anima_f1")
                },
            )
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--skip-synthetic", action="store_true")
    args = parser.parse_args()
    inference = InferenceConfig()
    print("real post-contrast studies (shipped FLAIR and enhancing models) ...")
    rows = real_studies(args.data_root, inference)
    print(
        "\n| study | arm | enhancing lesions reported | of them in an expert FLAIR lesion | "
        "volume mL | removed by the guard |\n|---|---|---|---|---|---|"
    )
    for row in rows:
        print(
            f"| {row.study} | {row.arm} | {row.lesions} | {row.in_known_lesion} | "
            f"{row.volume_ml:.3f} | {row.removed} |"
        )
    if args.skip_synthetic:
        return
    print("\nheld-out synthetic cases ...")
    print("\n| synthetic held-out cases (n=4) | Dice | Sens (Anima) | PPV (Anima) | F1 (Anima) |")
    print("|---|---|---|---|---|")
    for arm, values in synthetic_cases(args.data_root, inference):
        print(
            f"| {arm} | {values['dice']:.3f} | {values['anima_sensitivity']:.3f} | "
            f"{values['anima_ppv']:.3f} | {values['anima_f1']:.3f} |"
        )


if __name__ == "__main__":
    main()
