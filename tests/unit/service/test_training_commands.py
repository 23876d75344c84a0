"""`lesionwatch finetune` option checks that must fail before any training starts."""

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
