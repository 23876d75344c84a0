"""Weight files plus model cards: round trip, and refusal of anything that does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import (
    Architecture,
    ModelCardMismatchError,
    WeightsIntegrityError,
    card_path_for,
    file_sha256,
    load_model,
    save_model,
)


def _save(
    path: Path, *, depth: int = 3, base_width: int = 2, channels: tuple[str, ...] = ("flair",)
) -> UNet3D:
    torch.manual_seed(0)
    model = UNet3D(in_channels=len(channels), depth=depth, base_width=base_width)
    # non-default BatchNorm statistics, so the round trip covers buffers too
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    save_model(
        model, path, task="flair", channels=channels, version="0.1.0",
        training_data="open_ms_data cross-sectional patient07 (CC-BY)", recipe="test",
        metrics={"dice": 0.5},
    )  # fmt: skip
    return model.eval()


def test_round_trip_restores_the_network_and_the_card(tmp_path: Path) -> None:
    weights = tmp_path / "flair.pt"
    model = _save(weights)
    assert card_path_for(weights) == tmp_path / "flair.card.json"
    loaded, card = load_model(weights, "flair", ["flair"], expected_spacing_mm=(1.0, 1.0, 1.0))
    assert card.sha256 == file_sha256(weights)
    assert card.architecture.depth == 3 and card.architecture.channels == ("flair",)
    assert card.normalisation == "zscore_brain" and card.metrics == {"dice": 0.5}
    assert not loaded.training
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_default_size_weight_file_is_small(tmp_path: Path) -> None:
    weights = tmp_path / "flair.pt"
    save_model(
        UNet3D(1, 2), weights, task="flair", channels=["flair"], version="1", training_data="none"
    )
    assert weights.stat().st_size < 20 * 2**20


def test_other_task_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "flair.pt"
    _save(weights)
    with pytest.raises(
        ModelCardMismatchError, match=r"task is 'flair', the pipeline runs 'enhancing'"
    ):
        load_model(weights, "enhancing", ["flair"])


def test_channel_names_and_order_must_match(tmp_path: Path) -> None:
    weights = tmp_path / "new.pt"
    _save(weights, channels=("prior_flair", "current_flair", "difference"))
    load_model(weights, "flair", ("prior_flair", "current_flair", "difference"))
    with pytest.raises(ModelCardMismatchError, match="names and order must match") as info:
        load_model(weights, "flair", ("current_flair", "prior_flair", "difference"))
    assert str(weights) in str(info.value)


def test_other_spacing_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "flair.pt"
    _save(weights)
    with pytest.raises(
        ModelCardMismatchError, match=r"spacing \(1.0, 1.0, 1.0\) mm.*\(0.5, 0.5, 0.5\)"
    ):
        load_model(weights, "flair", ["flair"], expected_spacing_mm=(0.5, 0.5, 0.5))


def test_changed_weight_file_fails_the_checksum(tmp_path: Path) -> None:
    weights = tmp_path / "flair.pt"
    _save(weights)
    with weights.open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(WeightsIntegrityError, match="sha256 .* but its card says"):
        load_model(weights, "flair", ["flair"])


def test_missing_files_are_named(tmp_path: Path) -> None:
    weights = tmp_path / "flair.pt"
    with pytest.raises(WeightsIntegrityError, match="does not exist"):
        load_model(weights, "flair", ["flair"])
    _save(weights)
    card_path_for(weights).unlink()
    with pytest.raises(WeightsIntegrityError, match=r"flair.card.json is missing"):
        load_model(weights, "flair", ["flair"])


def test_invalid_card_is_reported(tmp_path: Path) -> None:
    weights = tmp_path / "flair.pt"
    _save(weights)
    card = json.loads(card_path_for(weights).read_text())
    card["normalisation"] = "minmax"
    card_path_for(weights).write_text(json.dumps(card))
    with pytest.raises(WeightsIntegrityError, match="normalisation"):
        load_model(weights, "flair", ["flair"])


def test_card_describing_another_architecture_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "flair.pt"
    _save(weights, base_width=2)
    card = json.loads(card_path_for(weights).read_text())
    card["architecture"]["base_width"] = 4
    card_path_for(weights).write_text(json.dumps(card))
    with pytest.raises(WeightsIntegrityError, match="does not fit the architecture"):
        load_model(weights, "flair", ["flair"])


def test_weight_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "flair.pt"
    _save(weights)
    torch.save({"payload": Path("/")}, weights)  # an arbitrary object, not tensors
    card = json.loads(card_path_for(weights).read_text())
    card["sha256"] = file_sha256(weights)
    card_path_for(weights).write_text(json.dumps(card))
    with pytest.raises(WeightsIntegrityError, match="cannot read weight file"):
        load_model(weights, "flair", ["flair"])


def test_architecture_checks_its_own_consistency() -> None:
    with pytest.raises(ValidationError, match="in_channels is 2 but 1 channel names"):
        Architecture(in_channels=2, channels=("flair",))
