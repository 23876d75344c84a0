"""`lesionwatch segment flair|new-lesions|enhancing`: one pipeline run offline on one case.

Inputs are NIfTI files or folders holding one DICOM series each; output is the lesion mask on
the grid of the input the pipeline reports on (the FLAIR, the current FLAIR, the T1 post
contrast), optionally the lesion table (CSV) and, for `segment flair` with DICOM input, the
SEG, SR and fallback objects the service would send (``--dicom-out``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import Dataset

from lesionwatch.config.schema import LesionWatchConfig
from lesionwatch.dicom_io.image_volume import ImageVolume

if TYPE_CHECKING:
    from lesionwatch.models.unet3d import UNet3D
    from lesionwatch.models.weights import ModelCard
    from lesionwatch.pipelines.flair import FlairResult
    from lesionwatch.pipelines.lesion_inference import LesionSegmentation

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "SegmentInputError",
    "SegmentOutputs",
    "load_case_image",
    "segment_enhancing",
    "segment_flair",
    "segment_new_lesions",
]

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "models" / "weights"


class SegmentInputError(ValueError):
    """The case cannot be segmented as given (missing file, no weights, DICOM needed, ...)."""


@dataclass(frozen=True)
class CaseImage:
    volume: ImageVolume
    datasets: tuple[Dataset, ...]  # the source DICOM series (empty for NIfTI input)


@dataclass(frozen=True)
class SegmentOutputs:
    mask_path: Path
    lesion_count: int
    total_volume_ml: float
    timings_s: dict[str, float]
    dicom_files: tuple[Path, ...] = ()


def load_case_image(source: Path) -> CaseImage:
    """A NIfTI/NRRD file, or a folder with one DICOM series (its datasets kept for SEG/SR)."""
    from lesionwatch.dicom_io.series_files import read_dicom_file
    from lesionwatch.dicom_io.series_reader import load_series

    if source.is_dir():
        loaded = load_series(source)
        files = [f for f in dict.fromkeys(loaded.slice_files) if f is not None]
        return CaseImage(loaded.volume, tuple(read_dicom_file(f) for f in files))
    if source.is_file():
        return CaseImage(ImageVolume.load(source), ())
    raise SegmentInputError(f"{source} is neither an image file nor a folder of DICOM files")


def weights_for(config: LesionWatchConfig, pipeline: str, override: Path | None) -> Path:
    configured = override or getattr(config.pipelines, pipeline).weights
    path = configured or DEFAULT_WEIGHTS_DIR / f"{pipeline}.pt"
    if not path.is_file():
        raise SegmentInputError(
            f"no weights for the {pipeline} pipeline at {path}: set pipelines.{pipeline}.weights "
            "in the config or pass --weights (train them with `lesionwatch train`)"
        )
    return path


def _load_weights(
    config: LesionWatchConfig, pipeline: str, override: Path | None
) -> tuple[UNet3D, ModelCard]:
    """The pipeline's network, its card checked against the task (channels checked later)."""
    from lesionwatch.models.device import select_device
    from lesionwatch.models.weights import load_model, read_card

    weights_path = weights_for(config, pipeline, override)
    card = read_card(weights_path)
    return load_model(
        weights_path,
        pipeline,
        card.architecture.channels,
        map_location=select_device(config.inference.device),
    )


def _write_outputs(
    result: LesionSegmentation, out_mask: Path, table_csv: Path | None
) -> SegmentOutputs:
    from lesionwatch.pipelines.postprocess import write_lesion_table_csv

    out_mask.parent.mkdir(parents=True, exist_ok=True)
    result.mask_source_grid.save(out_mask)
    if table_csv is not None:
        write_lesion_table_csv(result.lesions, table_csv)
    return SegmentOutputs(
        mask_path=out_mask,
        lesion_count=len(result.lesions),
        total_volume_ml=sum(lesion.volume_ml for lesion in result.lesions),
        timings_s=result.timings_s,
    )


def segment_new_lesions(
    config: LesionWatchConfig,
    prior_source: Path,
    current_source: Path,
    out_mask: Path,
    *,
    table_csv: Path | None = None,
    weights: Path | None = None,
) -> SegmentOutputs:
    """Lesions new on the current FLAIR since the prior one; mask on the current's grid."""
    from lesionwatch.pipelines.new_lesions import run_new_lesions_pipeline

    prior = load_case_image(prior_source)
    current = load_case_image(current_source)
    model, card = _load_weights(config, "new_lesions", weights)
    pipeline_cfg = config.pipelines.new_lesions
    result = run_new_lesions_pipeline(
        prior.volume,
        current.volume,
        model,
        card,
        config.inference,
        pipeline_cfg,
        registration=pipeline_cfg.registration,
    )
    return _write_outputs(result, out_mask, table_csv)


def segment_enhancing(
    config: LesionWatchConfig,
    t1_pre_source: Path,
    t1_post_source: Path,
    out_mask: Path,
    *,
    table_csv: Path | None = None,
    weights: Path | None = None,
) -> SegmentOutputs:
    """Gadolinium-enhancing lesions; mask on the T1 post-contrast grid."""
    from lesionwatch.pipelines.enhancing import run_enhancing_pipeline

    t1_pre = load_case_image(t1_pre_source)
    t1_post = load_case_image(t1_post_source)
    model, card = _load_weights(config, "enhancing", weights)
    result = run_enhancing_pipeline(
        t1_pre.volume, t1_post.volume, model, card, config.inference, config.pipelines.enhancing
    )
    return _write_outputs(result, out_mask, table_csv)


def segment_flair(
    config: LesionWatchConfig,
    flair_source: Path,
    out_mask: Path,
    *,
    t1_source: Path | None = None,
    table_csv: Path | None = None,
    weights: Path | None = None,
    dicom_out: Path | None = None,
) -> SegmentOutputs:
    from lesionwatch.models.device import select_device
    from lesionwatch.models.weights import card_path_for, file_sha256, load_model, read_card
    from lesionwatch.pipelines.flair import run_flair_pipeline
    from lesionwatch.pipelines.postprocess import write_lesion_table_csv

    flair = load_case_image(flair_source)
    t1 = load_case_image(t1_source) if t1_source is not None else None
    if dicom_out is not None and not flair.datasets:
        raise SegmentInputError(
            "--dicom-out needs the FLAIR as a DICOM series folder, not a NIfTI file"
        )
    weights_path = weights_for(config, "flair", weights)
    card = read_card(weights_path)
    model, card = load_model(
        weights_path,
        "flair",
        card.architecture.channels,
        map_location=select_device(config.inference.device),
    )
    result = run_flair_pipeline(
        flair.volume,
        t1.volume if t1 else None,
        model,
        card,
        config.inference,
        config.pipelines.flair,
    )
    out_mask.parent.mkdir(parents=True, exist_ok=True)
    result.mask_source_grid.save(out_mask)
    if table_csv is not None:
        write_lesion_table_csv(result.lesions, table_csv)
    files: tuple[Path, ...] = ()
    if dicom_out is not None:
        card_sha256 = file_sha256(card_path_for(weights_path))
        files = _write_dicom_results(config, flair.datasets, result, card, card_sha256, dicom_out)
    return SegmentOutputs(
        mask_path=out_mask,
        lesion_count=len(result.lesions),
        total_volume_ml=sum(lesion.volume_ml for lesion in result.lesions),
        timings_s=result.timings_s,
        dicom_files=files,
    )


def _write_dicom_results(
    config: LesionWatchConfig,
    datasets: tuple[Dataset, ...],
    result: FlairResult,
    card: ModelCard,
    card_sha256: str,
    out_dir: Path,
) -> tuple[Path, ...]:
    from lesionwatch.dicom_io.codes import FindingType
    from lesionwatch.dicom_io.results import FindingInput, JobIdentity, build_result_objects
    from lesionwatch.dicom_io.seg import AlgorithmIdentity
    from lesionwatch.dicom_io.sr import AnalysisNote, AnalysisState

    study_uid = str(datasets[0].StudyInstanceUID)
    algorithm = AlgorithmIdentity(
        name="LesionWatch FLAIR lesion U-Net", version=card.version, model_card_sha256=card_sha256
    )
    finding = FindingInput(
        FindingType.MS_LESION, datasets, result.mask_source_grid, result.lesions, algorithm
    )
    objects = build_result_objects(
        [finding],
        job=JobIdentity(f"offline/{study_uid}/flair/{card_sha256}"),
        config=config.results,
        notes=[
            AnalysisNote(
                AnalysisState.NO_PRIOR_AVAILABLE,
                "offline run of the FLAIR pipeline: no prior compared",
            )
        ],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for ds in objects.datasets:
        path = out_dir / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    if objects.json is not None:
        path = out_dir / "lesionwatch-results.json"
        path.write_text(json.dumps(objects.json, indent=2))
        written.append(path)
    return tuple(written)
