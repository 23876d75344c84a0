"""Fine-tuning: continue training a card-checked model on a few real cases (the seeds' idea).

The parent model is loaded through `models.weights.load_model`, so its sha256 and card are
verified; its card's channels must be one of the task's allowed sets, and the fine-tuning
cases must carry the same. Optionally the encoder (stem and down blocks,
their BatchNorm statistics included) stays frozen for the first steps, so the decoder adapts
to the new data before the pre-trained features move. The new card records the parent's
version and sha256 next to the fine-tuning data.

Rehearsal: a few real studies from one or two scanners pull the model towards them and away
from what pre-training taught it (measured here: fine-tuning on mostly one subject's visits
lifted that subject's Dice to 0.8 and dropped the other subjects' to under 0.15). With
``rehearsal_fraction`` a share of the patches keeps coming from synthetic pre-training cases,
and ``balance_subjects`` stops one patient's follow-ups from outweighing the others. Neither
is a sure win: on this project's 4-subject leave-one-out they rescued one subject and made
the model over-call another scanner's studies (models/reproduce.py has the figures).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic import Field

from lesionwatch.models.datasets import CaseSet
from lesionwatch.models.patch_sampling import subject_balanced_weights
from lesionwatch.models.train import (
    OptimisationSettings,
    TrainingError,
    TrainResult,
    run_training,
    seed_everything,
)
from lesionwatch.models.weights import load_model, read_card
from lesionwatch.pipelines.channels import channel_options

__all__ = ["FinetuneSettings", "finetune"]


class FinetuneSettings(OptimisationSettings):
    """Optimisation for fine-tuning; the network's shape and task come from the parent card."""

    steps: int = Field(2_000, ge=1)
    freeze_encoder_steps: int = Field(0, ge=0, description="steps with the encoder fixed")
    rehearsal_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of patches from the rehearsal (synthetic) cases"
    )


def finetune(
    from_weights: Path,
    cases: CaseSet,
    out_dir: Path,
    settings: FinetuneSettings,
    *,
    resume: bool = False,
    rehearsal: CaseSet | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Fine-tune the model at ``from_weights`` on ``cases``; writes weights + card in
    ``out_dir`` (same task and channels as the parent). ``rehearsal``: the cases that
    ``settings.rehearsal_fraction`` of the patches come from; ``on_step(step, loss)`` is
    called after every step."""
    from_weights = Path(from_weights)
    if settings.rehearsal_fraction > 0 and rehearsal is None:
        raise TrainingError(
            f"rehearsal_fraction {settings.rehearsal_fraction} needs rehearsal cases "
            "(e.g. synthetic lesions in the site's own brains)"
        )
    parent_card = read_card(from_weights)
    task = parent_card.task
    channels = parent_card.architecture.channels
    if channels not in channel_options(task):
        raise TrainingError(
            f"{from_weights}: card channels {list(channels)} are none of the {task} task's "
            f"{[list(option) for option in channel_options(task)]}; it cannot be fine-tuned here"
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
    weights = None
    if rehearsal is not None and settings.rehearsal_fraction > 0:
        share = settings.rehearsal_fraction
        own = (
            subject_balanced_weights(cases.subjects)
            if settings.balance_subjects
            else np.full(len(cases), 1.0 / len(cases))
        )
        weights = [*(own * (1.0 - share)), *([share / len(rehearsal)] * len(rehearsal))]
        training_data += f" | rehearsal, {share:.0%} of patches: {rehearsal.description}"
        note += f", {share:.0%} of patches rehearsing {len(rehearsal)} pre-training cases"
        cases = CaseSet.concat([cases, rehearsal])
    return run_training(
        model,
        task=task,
        cases=cases,
        case_weights=weights,
        out_dir=out_dir,
        settings=settings,
        resume=resume,
        freeze_encoder_steps=settings.freeze_encoder_steps,
        training_data=training_data,
        recipe_note=note,
        on_step=on_step,
        channels=channels,
    )
