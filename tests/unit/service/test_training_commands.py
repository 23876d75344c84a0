"""`lesionwatch train` / `finetune` options: checks that fail before training starts, and
options reaching the training settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from lesionwatch.service.cli import main
from lesionwatch.service.segment_command import DEFAULT_WEIGHTS_DIR


def test_rehearsal_without_synthetic_cases_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--rehearsal-fraction needs --synthetic"):
        main(
            [
                "finetune",
                "--from",
                str(DEFAULT_WEIGHTS_DIR / "flair.pt"),
                "--real",
                "--rehearsal-fraction",
                "0.5",
                "--out",
                str(tmp_path / "run"),
            ]
        )
    assert not (tmp_path / "run").exists()


def test_lesion_balance_reaches_the_training_settings_and_the_card(tmp_path: Path) -> None:
    from lesionwatch.models.train import TrainSettings, describe_recipe
    from lesionwatch.service.cli import build_parser
    from lesionwatch.service.training_commands import _optimisation

    args = build_parser().parse_args(
        ["train", "--task", "flair", "--lesion-balance", "0.5", "--out", str(tmp_path)]
    )
    settings = TrainSettings(task="flair", **_optimisation(args))
    assert settings.lesion_balance == 0.5
    assert "50% of them per lesion" in describe_recipe(settings, (32, 32, 32))
    default = TrainSettings(
        task="flair",
        **_optimisation(
            build_parser().parse_args(["train", "--task", "flair", "--out", str(tmp_path)])
        ),
    )
    assert default.lesion_balance == 0.0
    assert "per lesion" not in describe_recipe(default, (32, 32, 32))
