"""New-lesion methods compared on the real longitudinal pairs, through the whole pipeline.

For each open_ms_data longitudinal patient, the RAW baseline FLAIR (prior) and follow-up FLAIR
(current), each in its own native space, go through the pipeline's own steps
(`pipelines.new_lesions.register_prior` -> `analyse_change` -> `select_new_lesions` ->
`lesions_to_source_grid`). The new-lesion mask on the current FLAIR's source grid is then
mapped into the data set's common space with the provided transform and scored against the
consensus change mask `gt` (lesion-wise, MSSEG-2/Anima rule, 26-connectivity).

Methods (see NewLesionsPipelineConfig.method):
- subtraction: the new-lesion U-Net (prior, current, difference);
- two-channel U-Net (prior, current) with the same steps;
- tracking: FLAIR model at both time points, current lesions touching no prior lesion;
- confirmed: subtraction candidates inside a current FLAIR lesion;
- tracking_confirmed: tracked new FLAIR lesions that a subtraction candidate touches.

Trained methods are scored leave-one-subject-out: fold models from
`tests/benchmarks/train_new_lesion_folds.py` (pre-trained on synthetic pairs, fine-tuned on
the other two patients), one row per fine-tuning seed. The shipped new-lesion model was
fine-tuned on all three pairs, so its rows are in-sample (marked). The FLAIR model never saw
these patients (it was trained on open_ms_data cross-sectional and MSLesSeg cases).

Also per pair: time of each step, and the registration kinds (rigid, affine, SyN) with their
similarity and their effect on the tracking method. Results go to --out as JSON and markdown.

    python tests/benchmarks/eval_new_lesions.py [--registrations affine,rigid,syn]
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import SimpleITK as sitk
import torch

from lesionwatch.config.schema import InferenceConfig, NewLesionsPipelineConfig, PipelineConfig
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.metrics import evaluate_case
from lesionwatch.models.weights import load_model, load_task_model, read_card
from lesionwatch.pipelines.lesion_inference import HelperModel, lesions_to_source_grid
from lesionwatch.pipelines.lesion_tracking import TrackingSettings, track_lesions
from lesionwatch.pipelines.new_lesions import (
    analyse_change,
    register_prior,
    select_new_lesions,
    subtraction_candidates,
)
from lesionwatch.pipelines.postprocess import label_lesions

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "models" / "weights"
PATIENTS = ("patient01", "patient03", "patient19")


def _to_common(mask: ImageVolume, folder: Path, gt: sitk.Image) -> np.ndarray:
    """The current-FLAIR mask in the common space of `gt` (linear, thresholded at 0.5)."""
    transform = sitk.ReadTransform(str(folder / "study2_FLAIR_to_common_space.txt"))
    image = mask.with_array(mask.array.astype(np.float32)).to_sitk()
    common = sitk.Resample(image, gt, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(common) > 0.5


def _score(mask: ImageVolume, folder: Path, gt: sitk.Image) -> dict[str, float]:
    truth = sitk.GetArrayFromImage(gt) > 0
    predicted = _to_common(mask, folder, gt)
    metrics = evaluate_case(predicted, truth, gt.GetSpacing())
    a = metrics.anima
    return {
        "sens": a.sensitivity,
        "ppv": a.ppv,
        "f1": a.f1,
        "true": a.n_true_lesions,
        "pred": a.n_predicted_lesions,
        "detected": a.n_true_detected,
        "correct": a.n_predicted_correct,
        "dice": metrics.dice,
        "true_ml": metrics.true_volume_ml,
        "pred_ml": metrics.predicted_volume_ml,
    }


# Tracking settings compared: plain (a current lesion touching no prior lesion is new), and the
# two stricter checks for "new" with values fixed beforehand (not fitted to these pairs):
# absent before = prior probability under half the detection threshold; brightened = mean
# difference of at least 1 SD of brain intensity.
TRACKING = {
    "plain": TrackingSettings(),
    "prior p<0.25": TrackingSettings(new_max_prior_probability=0.25),
    "brightened 1 SD": TrackingSettings(new_min_difference_sd=1.0),
    "both": TrackingSettings(new_max_prior_probability=0.25, new_min_difference_sd=1.0),
}


def _retracked(evidence: Any, settings: TrackingSettings) -> Any:
    tracking = track_lesions(
        evidence.current_labels,
        evidence.current_lesions,
        evidence.prior_labels,
        evidence.prior_lesions,
        settings,
        prior_probability=evidence.prior_probability,
        difference=evidence.difference,
    )
    return replace(evidence, tracking=tracking)


def _with_growth(evidence: Any) -> ImageVolume:
    """Labels of the new lesions plus the part of each enlarging lesion outside the prior
    lesions (grown by the tracking margin): the change mask tracking implies."""
    from scipy import ndimage

    statuses = {t.lesion_id: t.status.value for t in evidence.tracking.lesions}
    labels = evidence.current_labels.array
    new = np.isin(labels, [i for i, s in statuses.items() if s == "new"])
    enlarging = np.isin(labels, [i for i, s in statuses.items() if s == "enlarging"])
    margin = evidence.tracking.settings.match_margin_mm
    prior = ndimage.distance_transform_edt(evidence.prior_labels.array == 0) <= max(margin, 0.5)
    change = new | (enlarging & ~prior)
    return evidence.current_labels.with_array(change.astype(np.int32))


def _subtraction_models(folds: Path, patient: str) -> list[tuple[str, Path]]:
    """(label, weight file): LOSO fold models for this held-out patient, then shipped."""
    models = []
    for variant in ("subtraction", "two_channel"):
        for path in sorted((folds / variant).glob(f"ft_seed*/heldout_{patient}.pt")):
            models.append((f"{variant}/{path.parent.name}", path))
    models.append(("subtraction/shipped (in-sample)", WEIGHTS / "new_lesions.pt"))
    return models


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _pickled(path: Path, compute: Callable[[], T]) -> T:
    """`compute()`, kept in `path` as a pickle and read from there when it exists."""
    if path.is_file():
        return pickle.loads(path.read_bytes())  # type: ignore[no-any-return]
    value = compute()
    path.write_bytes(pickle.dumps(value))
    return value


def _cached_evidence(
    folder: Path,
    registration: str,
    flair: HelperModel,
    inference: InferenceConfig,
    cache: Path,
) -> tuple[Any, dict[str, float], float]:
    """(evidence, timings, similarity) of one pair and registration kind, computed once
    (registration, both FLAIR inferences, tracking) and kept in `cache` as a pickle."""

    def compute() -> tuple[Any, dict[str, float], float]:
        prior = ImageVolume.load(folder / "study1_FLAIR.nii.gz")
        current = ImageVolume.load(folder / "study2_FLAIR.nii.gz")
        config = NewLesionsPipelineConfig(registration=registration)  # type: ignore[arg-type]
        card = read_card(WEIGHTS / "new_lesions.pt")
        started = time.perf_counter()
        pair, analysis = register_prior(prior, current, card, config)
        timings = dict(pair.timings_s)
        timings["register_prior (total)"] = time.perf_counter() - started
        evidence = analyse_change(pair, None, card, flair, inference, config)
        timings.update(evidence.timings_s)
        return evidence, timings, analysis.similarity

    return _pickled(cache / f"{folder.name}_{registration}.pkl", compute)


def _cached_subtraction(
    evidence: Any,
    label: str,
    weights: Path,
    folder: Path,
    registration: str,
    cache: Path,
    inference: InferenceConfig,
) -> tuple[ImageVolume, float]:
    """The probability of one subtraction model on this pair (cached) and its seconds."""
    name = label.replace("/", "_").replace(" ", "_").replace("(", "").replace(")", "")

    def compute() -> tuple[ImageVolume, float]:
        network, card = load_task_model(weights, "new_lesions")
        started = time.perf_counter()
        probability, _ = subtraction_candidates(
            evidence.pair, network, card, inference, NewLesionsPipelineConfig()
        )
        return probability, time.perf_counter() - started

    return _pickled(cache / f"{folder.name}_{registration}_{name}.pkl", compute)


def evaluate_pair(
    folder: Path,
    registration: str,
    flair: HelperModel,
    folds: Path,
    inference: InferenceConfig,
    full: bool,
    cache: Path,
) -> dict[str, Any]:
    patient = folder.name
    gt = sitk.ReadImage(str(folder / "gt.nii.gz"))
    config = NewLesionsPipelineConfig(registration=registration)  # type: ignore[arg-type]
    evidence, timings, similarity = _cached_evidence(folder, registration, flair, inference, cache)
    rows: list[dict[str, Any]] = []

    def score(method: str, model_label: str, chosen: Any) -> None:
        probability, labels, lesions = select_new_lesions(chosen, method)
        threshold = flair.config.threshold if method.startswith("tracking") else config.threshold
        result = lesions_to_source_grid(
            probability, labels, lesions, evidence.pair.fixed, threshold, {}
        )
        rows.append(
            {"method": method, "model": model_label, **_score(result.mask_source_grid, folder, gt)}
        )

    variants = {name: _retracked(evidence, settings) for name, settings in TRACKING.items()}
    for name, tracked in variants.items():
        score("tracking", f"FLAIR model, {name}", tracked)
        # diagnostic: `gt` marks lesion CHANGE (new lesions and the new part of enlarging ones)
        active = _with_growth(tracked)
        result = lesions_to_source_grid(
            tracked.current_probability, active, [], evidence.pair.fixed, 0.5, {}
        )
        rows.append(
            {
                "method": "tracking+growth",
                "model": f"FLAIR model, {name}",
                **_score(result.mask_source_grid, folder, gt),
            }
        )
    models = _subtraction_models(folds, patient)
    if full or models:
        # other registration kinds: the shipped model only, to compare the kinds
        for label, path in models if full else models[-1:]:
            probability, seconds = _cached_subtraction(
                evidence, label, path, folder, registration, cache, inference
            )
            timings[f"inference.subtraction[{label}]"] = seconds
            candidates, _ = label_lesions(
                probability, config.threshold, config.min_lesion_volume_mm3
            )
            chosen = replace(
                evidence, subtraction_probability=probability, subtraction_labels=candidates
            )
            score("subtraction", label, chosen)
            score("confirmed", label, chosen)
            for name, tracked in variants.items():
                with_candidates = replace(
                    tracked, subtraction_probability=probability, subtraction_labels=candidates
                )
                score("tracking_confirmed", f"{label}, {name}", with_candidates)
    return {
        "patient": patient,
        "registration": registration,
        "similarity": similarity,
        "timings_s": timings,
        "tracking_counts": {name: t.tracking.counts for name, t in variants.items()},
        "rows": rows,
    }


def _unregistered_similarity(folder: Path) -> float:
    """The check's figure when registration is skipped (identity): what a failed one scores."""
    from lesionwatch.pipelines.preprocess import preprocess
    from lesionwatch.pipelines.steps.registration import similarity_in_mask
    from lesionwatch.pipelines.steps.resampling import Grid, Interpolation, resample_to_grid

    current = preprocess(ImageVolume.load(folder / "study2_FLAIR.nii.gz"), spacing_mm=1.0)
    prior = ImageVolume.load(folder / "study1_FLAIR.nii.gz")
    assert current.bias_corrected is not None
    moved = resample_to_grid(prior, Grid.of(current.image), interpolation=Interpolation.LINEAR)
    return similarity_in_mask(current.bias_corrected, moved, current.brain_mask)


SECTION = "## Methods through the whole pipeline"


def _cell(row: dict[str, Any]) -> str:
    return (
        f"{_fmt(row['sens'])} / {_fmt(row['ppv'])} / {_fmt(row['f1'])} "
        f"({row['detected']}/{row['true']}, {row['correct']}/{row['pred']})"
    )


def method_table(results: list[dict[str, Any]], registration: str = "affine") -> str:
    """Per method and model: each pair's sens / PPV / F1, the mean F1 over pairs, and for
    models trained with several fine-tuning seeds the mean ± SD of that mean across seeds."""
    from lesionwatch.models.evaluate import markdown_table

    patients = sorted({r["patient"] for r in results})
    cells: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for result in results:
        if result["registration"] != registration:
            continue
        for row in result["rows"]:
            cells.setdefault((row["method"], row["model"]), {})[result["patient"]] = row
    body = []
    spread: dict[tuple[str, str], list[float]] = {}
    for (method, model), by_patient in cells.items():
        if len(by_patient) != len(patients):
            continue
        mean_f1 = float(np.nanmean([by_patient[p]["f1"] for p in patients]))
        body.append([method, model, *[_cell(by_patient[p]) for p in patients], f"{mean_f1:.2f}"])
        if "/ft_seed" in model:
            key = (
                method,
                model.replace("/ft_seed0", "/ft_seed*").replace("/ft_seed1", "/ft_seed*"),
            )
            spread.setdefault(key, []).append(mean_f1)
    for (method, model), values in spread.items():
        if len(values) > 1:
            sd = float(np.std(values, ddof=1))
            body.append([method, f"{model} (over {len(values)} seeds)", *["" for _ in patients],
                         f"{np.mean(values):.2f} ± {sd:.2f}"])  # fmt: skip
    headers = ["method", "model", *[f"{p}: sens / PPV / F1 (found, correct)" for p in patients]]
    return markdown_table([*headers, "mean F1"], body)


def registration_table(results: list[dict[str, Any]]) -> str:
    from lesionwatch.models.evaluate import markdown_table

    body = []
    for result in results:
        timings = result["timings_s"]
        reg = next((v for k, v in timings.items() if k.startswith("registration.")), math.nan)
        f1 = {r["method"]: r["f1"] for r in result["rows"] if "shipped" in r["model"]}
        body.append(
            [result["patient"], result["registration"], f"{result['similarity']:.3f}",
             f"{reg:.1f}", _fmt(f1.get("subtraction", math.nan)),
             _fmt(f1.get("confirmed", math.nan))]
        )  # fmt: skip
    headers = ["pair", "registration", "similarity", "registration s", "F1 subtraction (shipped)",
               "F1 confirmed (shipped)"]  # fmt: skip
    return markdown_table(headers, body)


def write_results_section(results: list[dict[str, Any]], text: str) -> None:
    """Replace the section in models/weights/new_lesions.RESULTS.md and the card's text."""
    from lesionwatch.models.evaluate import update_card

    path = WEIGHTS / "new_lesions.RESULTS.md"
    current = path.read_text(encoding="utf-8")
    kept = current.split("\n" + SECTION)[0].rstrip("\n")
    updated = f"{kept}\n\n{SECTION}\n\n{text.strip()}\n"
    path.write_text(updated, encoding="utf-8")
    update_card(WEIGHTS / "new_lesions.pt", evaluation=updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--folds", type=Path, default=REPO / "build" / "new_lesion_folds")
    parser.add_argument("--registrations", default="affine,rigid,syn")
    parser.add_argument("--patients", default=",".join(PATIENTS))
    parser.add_argument("--out", type=Path, default=REPO / "build" / "eval_new_lesions")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--unregistered", action="store_true", help="also the similarity without registration"
    )
    parser.add_argument(
        "--section", type=Path, help="markdown file: its text becomes the RESULTS.md section"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = args.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    inference = InferenceConfig(device="cpu")
    network, card = load_model(WEIGHTS / "flair.pt", "flair", ("flair",))
    flair = HelperModel(network, card, PipelineConfig())
    registrations = args.registrations.split(",")
    results = []
    for patient in args.patients.split(","):
        folder = args.data_root / "open_ms_data" / "longitudinal" / patient
        for index, registration in enumerate(registrations):
            started = time.perf_counter()
            result = evaluate_pair(
                folder, registration, flair, args.folds, inference, index == 0, cache
            )
            result["total_s"] = time.perf_counter() - started
            if index == 0 and args.unregistered:
                result["unregistered_similarity"] = _unregistered_similarity(folder)
            results.append(result)
            print(
                f"{patient} {registration}: similarity {result['similarity']:.3f}, "
                f"{result['total_s']:.0f} s, tracking {result['tracking_counts']}",
                flush=True,
            )
            for row in result["rows"]:
                print(
                    f"  {row['method']:<19} {row['model']:<48} sens {_fmt(row['sens'])} "
                    f"ppv {_fmt(row['ppv'])} f1 {_fmt(row['f1'])} "
                    f"({row['detected']}/{row['true']} found, {row['correct']}/{row['pred']} "
                    "correct)",
                    flush=True,
                )
            (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "methods.md").write_text(method_table(results) + "\n")
    (args.out / "registration.md").write_text(registration_table(results) + "\n")
    print(method_table(results))
    print(registration_table(results))
    if args.section is not None:
        write_results_section(results, args.section.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
