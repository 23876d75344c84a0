"""Fine-tuning: continue training a card-checked model on a few real cases (the seeds' idea).

The parent model is loaded through `models.weights.load_model`, so its sha256 and card are
verified and its task and channels must match. Optionally the encoder (stem and down blocks,
their BatchNorm statistics included) stays frozen for the first steps, so the decoder adapts
to the new data before the pre-trained features move. The new card records the parent's
version and sha256 next to the fine-tuning data.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from lesionwatch.models.datasets import TASK_CHANNELS, CaseSet
from lesionwatch.models.train import (
    OptimisationSettings,
    TrainingError,
    TrainResult,
    run_training,
    seed_everything,
)
from lesionwatch.models.weights import load_model, read_card

__all__ = ["FinetuneSettings", "finetune"]


class FinetuneSettings(OptimisationSettings):
    """Optimisation for fine-tuning; the network's shape and task come from the parent card."""

    steps: int = Field(2_000, ge=1)
    freeze_encoder_steps: int = Field(0, ge=0, description="steps with the encoder fixed")


def finetune(
    from_weights: Path,
    cases: CaseSet,
    out_dir: Path,
    settings: FinetuneSettings,
    *,
    resume: bool = False,
) -> TrainResult:
    """Fine-tune the model at ``from_weights`` on ``cases``; writes weights + card in
    ``out_dir`` (same task and channels as the parent)."""
    from_weights = Path(from_weights)
    parent_card = read_card(from_weights)
    task = parent_card.task
    channels = TASK_CHANNELS[task]
    if parent_card.architecture.channels != channels:
        raise TrainingError(
            f"{from_weights}: card channels {list(parent_card.architecture.channels)} differ "
            f"from the {task} task's {list(channels)}; it cannot be fine-tuned here"
        )
    if abs(parent_card.spacing_mm[0] - settings.spacing_mm) > 1e-6:
        raise TrainingError(
            f"{from_weights} was trained at {parent_card.spacing_mm} mm, fine-tuning runs at "
            f"{settings.spacing_mm} mm"
        )
    seed_everything(settings.seed)
    model, card = load_model(from_weights, task, channels)
    note = (
        f"fine-tuned from {from_weights.name} (version {card.version}, sha256 {card.sha256}; "
        f"its recipe: {card.recipe})"
        + (
            f", encoder frozen for the first {settings.freeze_encoder_steps} steps"
            if settings.freeze_encoder_steps
            else ""
        )
    )
    training_data = f"pre-training: {card.training_data} | fine-tuning: {cases.description}"
    return run_training(
        model,
        task=task,
        cases=cases,
        out_dir=out_dir,
        settings=settings,
        resume=resume,
        freeze_encoder_steps=settings.freeze_encoder_steps,
        training_data=training_data,
        recipe_note=note,
    )
