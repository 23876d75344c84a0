"""Weight files and their model cards: saving, loading, and refusing what does not fit.

A model is two files side by side: ``NAME.pt`` (a torch ``state_dict``, loaded with
``weights_only=True`` so a weight file can never run code) and ``NAME.card.json`` (a
`ModelCard`: what the network is, what it expects as input, how it was trained and measured,
and the sha256 of the weight file). `load_model` checks the file against the card and the
card against what the calling pipeline is about to feed it; any mismatch is an error that
names the field, both values and the file, never a model silently run on the wrong input.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lesionwatch.models.unet3d import UNet3D
from lesionwatch.pipelines.channels import channel_options

__all__ = [
    "ARCHITECTURE_NAME",
    "Architecture",
    "ModelCard",
    "ModelCardMismatchError",
    "WeightsIntegrityError",
    "build_model",
    "card_path_for",
    "file_sha256",
    "load_model",
    "load_task_model",
    "read_card",
    "save_model",
]

ARCHITECTURE_NAME = "unet3d_duong2019"
Task = Literal["flair", "new_lesions", "enhancing"]


class ModelCardMismatchError(ValueError):
    """The model card does not match what the pipeline needs (task, inputs, spacing, ...)."""


class WeightsIntegrityError(ValueError):
    """The weight file or its card is missing, unreadable, or not the file the card describes."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Architecture(_Frozen):
    """Enough to rebuild the network before loading its weights."""

    name: Literal["unet3d_duong2019"] = "unet3d_duong2019"
    depth: Literal[3, 4, 5] = 4
    base_width: int = Field(8, ge=1)
    dilation: int = Field(2, ge=1)
    in_channels: int = Field(ge=1)
    channels: tuple[str, ...] = Field(
        min_length=1, description='input channel names in order, e.g. ["flair"]'
    )
    out_classes: int = Field(2, ge=2)
    class_names: tuple[str, ...] = ("background", "lesion")

    @model_validator(mode="after")
    def _consistent(self) -> Architecture:
        if len(self.channels) != self.in_channels:
            raise ValueError(
                f"in_channels is {self.in_channels} but {len(self.channels)} channel names "
                f"are given: {list(self.channels)}"
            )
        if len(self.class_names) != self.out_classes:
            raise ValueError(
                f"out_classes is {self.out_classes} but class_names has {len(self.class_names)}"
            )
        return self


class ModelCard(_Frozen):
    """What a weight file is and what it expects (stored as ``NAME.card.json``)."""

    task: Task
    version: str = Field(min_length=1)
    architecture: Architecture
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    patch_size_mm: int = Field(96, ge=16)
    normalisation: Literal["zscore_brain"] = "zscore_brain"
    training_data: str = Field(min_length=1, description="datasets, cases, licences")
    recipe: str = Field("", description="loss, optimiser, epochs, augmentation")
    metrics: dict[str, float] = Field(default_factory=dict, description="measured on held-out data")
    evaluation: str = Field(
        "", description="how the metrics were measured, with the per-case results (markdown)"
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created: datetime


def card_path_for(weights_path: Path) -> Path:
    """``flair.pt`` -> ``flair.card.json`` (same folder)."""
    return weights_path.with_name(weights_path.stem + ".card.json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_model(architecture: Architecture) -> UNet3D:
    """A freshly initialised network of the card's architecture."""
    return UNet3D(
        architecture.in_channels,
        architecture.out_classes,
        depth=architecture.depth,
        base_width=architecture.base_width,
        dilation=architecture.dilation,
    )


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(
    model: UNet3D,
    weights_path: str | Path,
    *,
    task: Task,
    channels: tuple[str, ...] | list[str],
    version: str,
    training_data: str,
    recipe: str = "",
    metrics: dict[str, float] | None = None,
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0),
    patch_size_mm: int = 96,
    class_names: tuple[str, ...] = ("background", "lesion"),
) -> ModelCard:
    """Write ``weights_path`` (state_dict) and its card next to it; return the card."""
    weights_path = Path(weights_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights_path.with_name(weights_path.name + ".writing")
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    torch.save(state, tmp)
    os.replace(tmp, weights_path)
    card = ModelCard(
        task=task,
        version=version,
        architecture=Architecture(
            depth=model.depth,  # type: ignore[arg-type]
            base_width=model.base_width,
            dilation=model.dilation,
            in_channels=model.in_channels,
            channels=tuple(channels),
            out_classes=model.out_classes,
            class_names=class_names,
        ),
        spacing_mm=spacing_mm,
        patch_size_mm=patch_size_mm,
        training_data=training_data,
        recipe=recipe,
        metrics=metrics or {},
        sha256=file_sha256(weights_path),
        created=datetime.now(UTC),
    )
    _atomic_write(card_path_for(weights_path), card.model_dump_json(indent=2).encode() + b"\n")
    return card


def read_card(weights_path: Path) -> ModelCard:
    card_path = card_path_for(weights_path)
    if not card_path.is_file():
        raise WeightsIntegrityError(
            f"model card {card_path} is missing: every weight file needs its card next to it "
            f"(weights {weights_path})"
        )
    try:
        return ModelCard.model_validate_json(card_path.read_bytes())
    except ValidationError as exc:
        raise WeightsIntegrityError(f"model card {card_path} is not valid:\n{exc}") from exc


def _check_card(
    card: ModelCard,
    where: Path,
    expected_task: str,
    expected_channels: tuple[str, ...],
    expected_spacing_mm: tuple[float, float, float] | None,
) -> None:
    problems = []
    if card.task != expected_task:
        problems.append(f"task is {card.task!r}, the pipeline runs {expected_task!r}")
    if card.architecture.channels != expected_channels:
        problems.append(
            f"input channels are {list(card.architecture.channels)}, the pipeline provides "
            f"{list(expected_channels)} (names and order must match)"
        )
    if expected_spacing_mm is not None and any(
        abs(a - b) > 1e-6 for a, b in zip(card.spacing_mm, expected_spacing_mm, strict=True)
    ):
        problems.append(
            f"trained at spacing {card.spacing_mm} mm, the pipeline resamples to "
            f"{tuple(expected_spacing_mm)} mm"
        )
    if problems:
        raise ModelCardMismatchError(
            f"weights {where} do not fit this pipeline: "
            + "; ".join(problems)
            + ". Configure the weight file made for this pipeline."
        )


def load_model(
    weights_path: str | Path,
    expected_task: str,
    expected_channels: tuple[str, ...] | list[str],
    *,
    expected_spacing_mm: tuple[float, float, float] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[UNet3D, ModelCard]:
    """Load a weight file after verifying its card; return the network in eval mode and the card.

    Raises `WeightsIntegrityError` when a file is missing, the sha256 differs from the card or
    the tensors do not fit the card's architecture, and `ModelCardMismatchError` when the card
    describes another task, other input channels or another spacing than the pipeline uses.
    """
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise WeightsIntegrityError(f"weight file {weights_path} does not exist")
    card = read_card(weights_path)
    _check_card(card, weights_path, expected_task, tuple(expected_channels), expected_spacing_mm)
    actual = file_sha256(weights_path)
    if actual != card.sha256:
        raise WeightsIntegrityError(
            f"weight file {weights_path} has sha256 {actual} but its card says {card.sha256}: "
            "the file was changed or replaced after the card was written"
        )
    try:
        state = torch.load(weights_path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe pickles
        raise WeightsIntegrityError(f"cannot read weight file {weights_path}: {exc}") from exc
    model = build_model(card.architecture)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise WeightsIntegrityError(
            f"weight file {weights_path} does not fit the architecture in its card "
            f"({card.architecture.model_dump()}): {exc}"
        ) from exc
    return model.to(map_location).eval(), card


def load_task_model(
    weights_path: str | Path,
    task: str,
    *,
    expected_spacing_mm: tuple[float, float, float] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[UNet3D, ModelCard]:
    """`load_model` for a caller that can build any channel set allowed for ``task``
    (`pipelines.channels.channel_options`): the card's set is accepted when allowed, anything
    else is refused as by `load_model` against the task's default set."""
    weights_path = Path(weights_path)
    options = channel_options(task)
    channels = options[0]
    if weights_path.is_file():
        named = read_card(weights_path).architecture.channels
        channels = named if named in options else channels
    return load_model(
        weights_path,
        task,
        channels,
        expected_spacing_mm=expected_spacing_mm,
        map_location=map_location,
    )
