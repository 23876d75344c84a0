"""Each pipeline's network, loaded once per process and verified against its model card.

A worker process keeps its models for its whole life (loading costs seconds; a job should
not). The weight file is `pipelines.<name>.weights` when configured, else the shipped default
in ``models/weights/<name>.pt``; its card must be for the pipeline's task.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lesionwatch.config.schema import PipelinesConfig
from lesionwatch.dicom_io.seg import AlgorithmIdentity
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import (
    ModelCard,
    WeightsIntegrityError,
    card_path_for,
    file_sha256,
    load_model,
    read_card,
)
from lesionwatch.pipelines.registry import PipelineSpec

__all__ = ["SHIPPED_WEIGHTS_DIR", "LoadedModel", "ModelCache", "weights_path"]

SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "models" / "weights"


def weights_path(pipelines: PipelinesConfig, name: str, override: Path | None = None) -> Path:
    """The weight file a pipeline uses: `override`, else the configured one, else shipped."""
    configured = override or getattr(pipelines, name).weights
    path = configured or SHIPPED_WEIGHTS_DIR / f"{name}.pt"
    if not path.is_file():
        raise WeightsIntegrityError(
            f"no weights for the {name} pipeline at {path}: set pipelines.{name}.weights in "
            "the config (train them with `lesionwatch train` or `lesionwatch finetune`)"
        )
    return path


@dataclass(frozen=True)
class LoadedModel:
    network: UNet3D
    card: ModelCard
    path: Path
    algorithm: AlgorithmIdentity  # how SEG and SR name it (version and card hash)


class ModelCache:
    """Loads each pipeline's model on first use and keeps it; thread-safe."""

    def __init__(
        self,
        pipelines: PipelinesConfig,
        device: torch.device,
        overrides: dict[str, Path] | None = None,
    ) -> None:
        self._pipelines = pipelines
        self._device = device
        self._overrides = overrides or {}
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self._device

    def get(self, spec: PipelineSpec) -> LoadedModel:
        with self._lock:
            if spec.name not in self._loaded:
                self._loaded[spec.name] = self._load(spec)
            return self._loaded[spec.name]

    def _load(self, spec: PipelineSpec) -> LoadedModel:
        path = weights_path(self._pipelines, spec.name, self._overrides.get(spec.name))
        card = read_card(path)
        network, card = load_model(
            path, spec.task, card.architecture.channels, map_location=self._device
        )
        algorithm = AlgorithmIdentity(
            name=spec.algorithm_name,
            version=card.version,
            model_card_sha256=file_sha256(card_path_for(path)),
        )
        return LoadedModel(network, card, path, algorithm)
