"""Evaluation of weight files on labelled cases, and the leave-one-out comparison.

`evaluate` runs the pipelines' sliding-window inference (`pipelines.inference`) with a
card-checked model over each case's brain, thresholds the lesion probability and scores it
with `models.metrics.evaluate_case` (Dice, volumes, lesion-wise sensitivity/PPV/F1 under
Anima's MSSEG-2 rule and under any-overlap); the report prints a per-case table and mean ±
SE over cases.

`loocv` is the issue's results table: the cases are split into folds by subject (visits of
one patient never sit on both sides), and for each fold the held-out cases are scored with
(a) the default (pre-trained) model as it is, (b) that model fine-tuned on the other folds,
(c) a network of the same recipe trained from scratch on the other folds only. Every trained
model, the per-case scores and the tables are written under the output folder; a rerun
resumes from the checkpoints it finds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from lesionwatch.config.schema import InferenceConfig
from lesionwatch.models.datasets import CaseSet, TrainingCase
from lesionwatch.models.finetune import FinetuneSettings, finetune
from lesionwatch.models.metrics import (
    AnimaDetectionParams,
    CaseMetrics,
    MeanSE,
    evaluate_case,
    summarize_cases,
)
from lesionwatch.models.train import TrainSettings, train
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import (
    ModelCard,
    WeightsIntegrityError,
    card_path_for,
    file_sha256,
    load_task_model,
    read_card,
)

__all__ = [
    "EvaluateSettings",
    "EvaluationReport",
    "LoocvReport",
    "LoocvSettings",
    "evaluate",
    "evaluate_model",
    "format_score",
    "loocv",
    "markdown_table",
    "predict_probability",
    "record_metrics_in_card",
    "update_card",
]

# (column title, CaseMetrics.as_dict key, summarize_cases key)
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("Dice", "dice", "dice"),
    ("Sens (Anima)", "anima_sensitivity", "anima_sensitivity"),
    ("PPV (Anima)", "anima_ppv", "anima_ppv"),
    ("F1 (Anima)", "anima_f1", "anima_f1"),
    ("Sens (overlap)", "any_overlap_sensitivity", "any_overlap_sensitivity"),
    ("PPV (overlap)", "any_overlap_ppv", "any_overlap_ppv"),
    ("F1 (overlap)", "any_overlap_f1", "any_overlap_f1"),
    ("Vol true mL", "true_volume_ml", "true_volume_ml"),
    ("Vol pred mL", "predicted_volume_ml", "predicted_volume_ml"),
    ("Vol diff mL", "volume_difference_ml", "volume_difference_ml"),
)


class EvaluateSettings(BaseModel):
    """Inference and scoring options (inference defaults follow the `inference` config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int = Field(0, ge=0)
    patch_size_mm: int | None = Field(
        None, ge=16, description="sliding window edge; None: the card's training patch size"
    )
    step_mm: int = Field(32, ge=4, description="sliding-window stride")
    batch_size: int = Field(2, ge=1)
    gaussian_weighting: bool = False
    amp: bool = Field(True, description="float16 autocast; CUDA only")
    threshold: float = Field(0.5, gt=0, lt=1, description="lesion probability threshold")
    min_lesion_volume_mm3: float = Field(3.0, ge=0, description="Anima -v")
    connectivity: Literal[6, 18, 26] = 26
    progress: bool = True


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_score(value: float) -> str:
    """A score to 3 decimals; n/a when undefined."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _mean_se(value: MeanSE) -> str:
    if value.n == 0:
        return "n/a"
    se = "" if not math.isfinite(value.se) else f" ± {value.se:.3f}"
    return f"{value.mean:.3f}{se} (n={value.n})"


@dataclass(frozen=True)
class EvaluationReport:
    """Scores of one model on a list of cases."""

    model: str
    task: str
    cases: tuple[CaseMetrics, ...]

    @property
    def summary(self) -> dict[str, MeanSE]:
        return summarize_cases(self.cases)

    def table(self) -> str:
        """Markdown: one row per case, then mean ± SE."""
        rows = [
            [case.case_id, *(format_score(case.as_dict()[key]) for _, key, _ in _COLUMNS)]
            for case in self.cases
        ]
        summary = self.summary
        rows.append(["**mean ± SE**", *(_mean_se(summary[key]) for _, _, key in _COLUMNS)])
        return f"{self.model} ({self.task})\n\n" + markdown_table(
            ["case", *(title for title, _, _ in _COLUMNS)], rows
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "task": self.task,
            "cases": [case.as_dict() for case in self.cases],
            "summary": {k: vars(v) for k, v in self.summary.items()},
        }


def predict_probability(
    model: UNet3D, card: ModelCard, case: TrainingCase, settings: EvaluateSettings
) -> npt.NDArray[np.float32]:
    """Lesion probability (Z, Y, X) of one case by sliding-window inference over its brain."""
    from lesionwatch.pipelines.inference import SlidingWindowInferer

    if case.channels != card.architecture.channels:
        raise ValueError(
            f"case {case.case_id} provides channels {list(case.channels)}, the model expects "
            f"{list(card.architecture.channels)}"
        )
    config = InferenceConfig(
        device=settings.device,
        cpu_threads=settings.cpu_threads,
        patch_size_mm=settings.patch_size_mm or card.patch_size_mm,
        step_mm=settings.step_mm,
        gaussian_weighting=settings.gaussian_weighting,
        batch_size=settings.batch_size,
        mixed_precision=settings.amp,
    )
    inferer = SlidingWindowInferer(model, config, case.spacing_mm)
    probabilities = inferer(torch.from_numpy(case.image), torch.from_numpy(case.brain))
    lesion = (1.0 - probabilities[0]).clamp_(0.0, 1.0).numpy()
    return np.where(case.brain, lesion, 0.0).astype(np.float32)


def evaluate_model(
    model: UNet3D,
    card: ModelCard,
    cases: CaseSet,
    settings: EvaluateSettings,
    *,
    label: str = "",
) -> EvaluationReport:
    """Score ``model`` on every case of ``cases``."""
    params = AnimaDetectionParams(min_lesion_volume_mm3=settings.min_lesion_volume_mm3)
    results = []
    for index in tqdm(range(len(cases)), desc="evaluate", disable=not settings.progress):
        case = cases.load(index)
        probability = predict_probability(model, card, case, settings)
        predicted = (probability >= settings.threshold).astype(np.uint8)
        results.append(
            evaluate_case(
                case.label_volume(predicted),
                case.label_volume(),
                case_id=case.case_id,
                params=params,
                connectivity=settings.connectivity,
            )
        )
    return EvaluationReport(label or card.version, card.task, tuple(results))


def evaluate(
    weights: Path, cases: CaseSet, settings: EvaluateSettings, *, task: str | None = None
) -> EvaluationReport:
    """Load ``weights`` (card-checked against ``task``, default: the card's task, and any of
    its allowed channel sets) and score it on ``cases``, which must carry the same channels."""
    weights = Path(weights)
    task = task or read_card(weights).task
    model, card = load_task_model(weights, task)
    return evaluate_model(model, card, cases, settings, label=f"{weights.name} {card.version}")


def record_metrics_in_card(
    weights: Path,
    report: EvaluationReport | LoocvReport,
    *,
    prefix: str = "",
    arm: str | None = None,
    evaluation: str | None = None,
    extra_metrics: Mapping[str, float] | None = None,
) -> ModelCard:
    """Store the report's means (``<prefix><metric>_mean``, ``_se``, ``_n``) in the card of
    ``weights``. Only for data the model was not trained on: the card's metrics field is
    "measured on held-out data". For a `LoocvReport`, ``arm`` names the column whose
    held-out scores are stored; ``evaluation`` (markdown) replaces the card's results text;
    ``extra_metrics`` are stored as they are (e.g. a `SeedSpread`'s)."""
    weights = Path(weights)
    if isinstance(report, LoocvReport):
        if arm is None or arm not in report.arms:
            raise ValueError(f"name one of the arms {sorted(report.arms)} to record")
        summary = summarize_cases(report.arms[arm])
    else:
        summary = report.summary
    card = read_card(weights)
    if file_sha256(weights) != card.sha256:
        raise WeightsIntegrityError(f"{weights} does not match its card; not updating it")
    metrics = dict(card.metrics)
    for name, value in summary.items():
        if value.n:
            metrics[f"{prefix}{name}_mean"] = value.mean
            metrics[f"{prefix}{name}_n"] = float(value.n)
            if math.isfinite(value.se):
                metrics[f"{prefix}{name}_se"] = value.se
    metrics.update(extra_metrics or {})
    return update_card(weights, metrics=metrics, evaluation=evaluation)


def update_card(
    weights: Path, *, metrics: Mapping[str, float] | None = None, evaluation: str | None = None
) -> ModelCard:
    """Replace the metrics and/or the results text of the card of ``weights`` (atomically)."""
    weights = Path(weights)
    card = read_card(weights)
    if file_sha256(weights) != card.sha256:
        raise WeightsIntegrityError(f"{weights} does not match its card; not updating it")
    update: dict[str, Any] = {}
    if metrics is not None:
        update["metrics"] = dict(metrics)
    if evaluation is not None:
        update["evaluation"] = evaluation
    updated = card.model_copy(update=update)
    path = card_path_for(weights)
    tmp = path.with_name(path.name + ".writing")
    tmp.write_text(updated.model_dump_json(indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return updated


# --- leave one out ----------------------------------------------------------------------------


class LoocvSettings(BaseModel):
    """The three arms of the comparison and how folds are formed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    scratch: TrainSettings | None = Field(
        default_factory=TrainSettings, description="from-scratch arm's recipe; None skips it"
    )
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)  # type: ignore[arg-type]
    fold_by: Literal["subject", "case"] = "subject"


@dataclass
class LoocvReport:
    task: str
    folds: list[list[str]] = field(default_factory=list)  # held-out case ids per fold
    arms: dict[str, list[CaseMetrics]] = field(default_factory=dict)  # arm -> held-out scores

    def comparison_table(self) -> str:
        """Markdown: one row per arm, mean ± SE over the held-out cases."""
        rows = []
        for arm, results in self.arms.items():
            summary = summarize_cases(results)
            rows.append([arm, *(_mean_se(summary[key]) for _, _, key in _COLUMNS)])
        return markdown_table(["model", *(title for title, _, _ in _COLUMNS)], rows)

    def per_case_table(self) -> str:
        rows = [
            [arm, case.case_id, *(format_score(case.as_dict()[key]) for _, key, _ in _COLUMNS)]
            for arm, results in self.arms.items()
            for case in results
        ]
        return markdown_table(["model", "held-out case", *(t for t, _, _ in _COLUMNS)], rows)

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "folds": self.folds,
            "arms": {arm: [c.as_dict() for c in results] for arm, results in self.arms.items()},
            "summary": {
                arm: {k: vars(v) for k, v in summarize_cases(results).items()}
                for arm, results in self.arms.items()
            },
        }

    @classmethod
    def read(cls, out_dir: Path) -> LoocvReport:
        """The report `write` left in ``out_dir``."""
        saved = json.loads((Path(out_dir) / "loocv.json").read_text(encoding="utf-8"))
        return cls(
            task=saved["task"],
            folds=saved["folds"],
            arms={
                arm: [CaseMetrics.from_dict(row) for row in rows]
                for arm, rows in saved["arms"].items()
            },
        )

    def write(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "loocv.json").write_text(
            json.dumps(self.as_dict(), indent=2, default=str) + "\n", encoding="utf-8"
        )
        (out_dir / "loocv.md").write_text(
            f"# Leave-one-out results, task {self.task}\n\n"
            f"Folds (held out): {self.folds}\n\n## Mean ± SE over held-out cases\n\n"
            f"{self.comparison_table()}\n\n## Per case\n\n{self.per_case_table()}\n",
            encoding="utf-8",
        )


def _folds(cases: CaseSet, fold_by: str) -> list[list[int]]:
    keys = cases.subjects if fold_by == "subject" else cases.case_ids
    order: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        order.setdefault(key, []).append(index)
    return list(order.values())


def loocv(
    default_weights: Path | None,
    cases: CaseSet,
    out_dir: Path,
    settings: LoocvSettings,
    *,
    task: str,
    rehearsal: CaseSet | None = None,
) -> LoocvReport:
    """Leave-one-subject-out (or -case-out) comparison of default, fine-tuned and scratch.

    ``default_weights`` None leaves out the default and fine-tuned arms. ``rehearsal``: the
    pre-training cases fine-tuning rehearses (when its settings ask for rehearsal).
    """
    out_dir = Path(out_dir)
    folds = _folds(cases, settings.fold_by)
    if len(folds) < 2:
        raise ValueError(f"leave-one-out needs cases of at least 2 {settings.fold_by}s")
    report = LoocvReport(task=task)
    default_model: tuple[UNet3D, ModelCard] | None = None
    if default_weights is not None:
        default_model = load_task_model(default_weights, task)
    scratch = settings.scratch
    if scratch is not None and scratch.task != task:
        scratch = scratch.model_copy(update={"task": task})
    for number, held in enumerate(folds):
        rest = [i for i in range(len(cases)) if i not in held]
        held_set = cases.subset(held)
        rest_set = cases.subset(rest)
        fold_dir = out_dir / f"fold_{number:02d}"
        report.folds.append([cases.case_ids[i] for i in held])
        if default_model is not None and default_weights is not None:
            model, card = default_model
            scores = evaluate_model(model, card, held_set, settings.evaluate, label="default")
            report.arms.setdefault("default", []).extend(scores.cases)
            tuned = finetune(
                default_weights,
                rest_set,
                fold_dir / "finetuned",
                settings.finetune,
                resume=True,
                rehearsal=rehearsal,
            )
            scores = evaluate(tuned.weights_path, held_set, settings.evaluate, task=task)
            report.arms.setdefault("fine-tuned", []).extend(scores.cases)
        if scratch is not None:
            trained = train(scratch, rest_set, fold_dir / "scratch", resume=True)
            scores = evaluate(trained.weights_path, held_set, settings.evaluate, task=task)
            report.arms.setdefault("from scratch", []).extend(scores.cases)
        report.write(out_dir)  # after every fold, so a long run shows progress
    return report
