"""The default weights in models/weights/: present, small, loadable, documented, and working.

The segmentation check runs the shipped FLAIR model through the real `segment flair` command
on the committed open_ms_data patient07 FLAIR. patient07's brain carried synthetic lesions in
pre-training (and its labels are fine-tuning data whenever the fine-tuned arm ships), so this
is a regression check of the file and the pipeline, not a measure of accuracy (the
leave-one-out figures in the card are that).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.datasets import TASK_CHANNELS
from lesionwatch.models.reproduce import PLANS
from lesionwatch.models.weights import file_sha256, load_model, read_card
from lesionwatch.service.segment_command import DEFAULT_WEIGHTS_DIR

MAX_BYTES = 20 * 1024 * 1024


@pytest.mark.parametrize("task", ["flair", "new_lesions", "enhancing"])
def test_shipped_weights_load_and_carry_their_evidence(task: str) -> None:
    weights = DEFAULT_WEIGHTS_DIR / f"{task}.pt"
    assert weights.is_file(), f"{weights} is missing: run `make weights`"
    assert weights.stat().st_size <= MAX_BYTES
    card = read_card(weights)
    assert card.sha256 == file_sha256(weights)
    model, card = load_model(weights, task, TASK_CHANNELS[task])
    assert model.in_channels == len(TASK_CHANNELS[task])
    assert card.training_data and card.recipe and card.evaluation
    results = DEFAULT_WEIGHTS_DIR / f"{task}.RESULTS.md"
    assert results.is_file()
    if task == "enhancing":
        assert "SYNTHETIC" in card.evaluation
        assert card.metrics["synthetic_held_out_dice_n"] >= 1
        # Marked as unvalidated on real lesions, with the false positives measured on real
        # post-contrast studies before and after the plausibility guard.
        assert "not validated on real enhancing lesions" in card.evaluation
        assert (
            card.metrics["real_false_positives_guard"]
            < card.metrics["real_false_positives_no_guard"]
        )
        assert card.evaluation == results.read_text(encoding="utf-8")
    else:
        # the leave-one-subject-out table of all three arms, and which one shipped
        assert "from scratch" in card.evaluation and "## Shipped" in card.evaluation
        assert card.metrics["dice_n"] >= 3  # the shipped arm's held-out scores
        # a plan with spread seeds reports how far its scores move by the seed alone
        spread_runs = 1 + len(PLANS[task].spread_seeds)
        if spread_runs > 1:
            assert "Training-seed spread" in card.evaluation
            assert card.metrics["seed_spread_anima_f1_n"] == spread_runs
        assert card.evaluation == results.read_text(encoding="utf-8")


def test_shipped_flair_model_finds_the_lesions_of_a_real_flair(
    test_data: Path, tmp_path: Path
) -> None:
    from lesionwatch.service.cli import main

    folder = test_data / "open_ms_data" / "cross_sectional" / "patient07"
    config = tmp_path / "lesionwatch.yaml"
    config.write_text("inference: {device: cpu}\n")
    out = tmp_path / "mask.nii.gz"
    code = main(
        [
            "segment",
            "flair",
            "--flair",
            str(folder / "FLAIR.nii.gz"),
            "--out",
            str(out),
            "--config",
            str(config),
        ]
    )
    assert code == 0
    predicted = ImageVolume.load(out).array > 0
    truth = ImageVolume.load(folder / "lesion_mask.nii.gz").array > 0
    dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert dice > 0.3, f"Dice {dice:.3f} of the shipped FLAIR model on patient07"
    assert np.count_nonzero(predicted) < 10 * np.count_nonzero(truth)
