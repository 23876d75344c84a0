"""Training loop: patches -> elastic augmentation -> 3D U-Net -> loss -> Adam; checkpoints.

The seeds' recipe is the default: 96 mm patches, half centred near a lesion and half on
lesion-free brain, elastic augmentation, cross-entropy, Adam at 1e-5. Every choice is a
field of `TrainSettings` so measurements can change it (``loss="dice_ce"``, learning rate,
patch size, lesion fraction).

Reproducibility: the randomness of step ``n`` (which cases, which patches, which transforms)
comes from generators seeded with ``(seed, n)``, never from a stream carried across steps;
the model, Adam and grad-scaler states are in every checkpoint. So a run stopped after a
checkpoint and resumed takes exactly the steps an uninterrupted run takes (bit-identical on
the same device and thread count; the smoke test checks this on CPU).

Cases come from a `CaseSet` (real or synthetic, built on demand). Synthetic generation takes
about a second per brain, so steps draw from a pool of ``pool_size`` cases that changes every
``pool_refresh_steps`` steps, and the pool's tensors stay on the training device (patch
extraction and augmentation then run on the GPU too).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from lesionwatch.models.augmentation import (
    INTENSITY_OFF,
    AugmentationSettings,
    augment_intensity,
    extract_patch,
    random_transform,
)
from lesionwatch.models.datasets import CaseSet, TaskName, TrainingCase
from lesionwatch.models.device import (
    configure_cpu_threads,
    cpu_supports_bfloat16,
    select_device,
    use_mixed_precision,
)
from lesionwatch.models.patch_sampling import PatchSampler, subject_balanced_weights
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import ModelCard, save_model
from lesionwatch.pipelines.channels import ChannelInputError, resolve_channels

__all__ = [
    "OptimisationSettings",
    "TrainResult",
    "TrainSettings",
    "TrainingError",
    "compute_loss",
    "latest_checkpoint",
    "run_training",
    "seed_everything",
    "train",
]

CHECKPOINT_FORMAT = 1
# settings that may differ between a checkpoint and the run resuming it
_RESUMABLE_CHANGES = {
    "steps",
    "progress",
    "checkpoint_every",
    "keep_checkpoints",
    "device",
    "cpu_threads",
    "version",
    "name",
}


# settings added after checkpoints were written: left out of the fingerprint while off
_NEWER_FIELDS_OFF: dict[str, Any] = {
    "balance_subjects": False,
    "rehearsal_fraction": 0.0,
    "lesion_balance": 0.0,
    "channels": None,
}


class TrainingError(RuntimeError):
    """Training cannot start or continue (bad checkpoint, settings changed, no data)."""


class OptimisationSettings(BaseModel):
    """How the weights are optimised (shared by training from scratch and fine-tuning)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(20_000, ge=1, description="optimiser steps in total (a resume continues)")
    batch_size: int = Field(2, ge=1)
    patch_size_mm: int = Field(96, ge=8, description="cube edge; rounded to the net's multiple")
    spacing_mm: float = Field(1.0, gt=0, description="grid the cases are on (isotropic)")
    learning_rate: float = Field(1e-5, gt=0, description="Adam; the seeds used 1e-5")
    weight_decay: float = Field(0.0, ge=0)
    loss: Literal["ce", "dice_ce"] = "ce"
    lesion_fraction: float = Field(0.5, ge=0, le=1, description="share of lesion patches")
    lesion_balance: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of lesion patches centred on a lesion drawn uniformly over lesions "
        "(otherwise over lesion voxels, which favours large lesions)",
    )
    augmentation: AugmentationSettings = Field(default_factory=AugmentationSettings)
    seed: int = 0
    deterministic: bool = Field(True, description="deterministic kernels (slower on GPU)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="float16 autocast; used only on CUDA")
    cpu_bfloat16: bool = Field(
        True, description="bfloat16 autocast on CPUs with native bfloat16 (1.5-1.9x faster)"
    )
    cpu_threads: int = Field(0, ge=0, description="0 keeps torch's default")
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    balance_subjects: bool = Field(
        False, description="every subject (person) gets an equal share of patches"
    )
    pool_size: int = Field(8, ge=1, description="cases held at once")
    pool_refresh_steps: int = Field(250, ge=1, description="steps before the pool changes")
    prefetch: bool = Field(True, description="build the next pool in a background thread")
    progress: bool = True
    version: str = Field("0.1.0-dev", min_length=1)
    name: str | None = Field(None, description="weight file stem; default: the task")


class TrainSettings(OptimisationSettings):
    """Training from scratch: the task and the network's shape on top of the optimisation."""

    task: TaskName = "flair"
    channels: tuple[str, ...] | None = Field(
        None, description="input channels, one of the task's allowed sets; None: its default"
    )
    depth: Literal[3, 4, 5] = 4
    base_width: int = Field(8, ge=1)
    dilation: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _channels_allowed(self) -> TrainSettings:
        resolve_channels(self.task, self.channels)  # a ChannelInputError is a ValueError
        return self

    @property
    def input_channels(self) -> tuple[str, ...]:
        """The channels the network is fed (the task's default when ``channels`` is None)."""
        return resolve_channels(self.task, self.channels)


@dataclass(frozen=True)
class TrainResult:
    weights_path: Path
    card: ModelCard
    steps_done: int
    losses: list[float]  # one per step since step 0 (resumed runs include the history)
    resumed_from_step: int | None
    seconds: float


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compute_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Cross-entropy, or cross-entropy plus the soft Dice loss of the lesion class."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    if kind == "ce":
        return ce
    if kind == "dice_ce":
        lesion = torch.softmax(logits, dim=1)[:, 1:].sum(dim=1)  # any non-background class
        truth = (target > 0).float()
        overlap = (lesion * truth).sum()
        dice = (2.0 * overlap + 1.0) / (lesion.sum() + truth.sum() + 1.0)
        return ce + (1.0 - dice)
    raise ValueError(f"unknown loss {kind!r}; use 'ce' or 'dice_ce'")


def describe_recipe(settings: OptimisationSettings, patch_vox: tuple[int, int, int]) -> str:
    aug = settings.augmentation
    augmentation = (
        f"elastic augmentation on {aug.probability:.0%} of patches (rotation ±{aug.rotation_deg}°, "
        f"translation ±{aug.translation_mm} mm, scale {aug.scale_range[0]}-{aug.scale_range[1]}, "
        f"free-form deformation SD {aug.deformation_sd_mm} mm on a {aug.control_spacing_mm} mm "
        f"control grid); intensity x{aug.intensity_scale_range[0]}-{aug.intensity_scale_range[1]}"
        f" and ±{aug.intensity_shift} z offset on every patch"
        if aug.enabled
        else "no augmentation"
    )
    per_lesion = (
        f" ({settings.lesion_balance:.0%} of them per lesion)" if settings.lesion_balance else ""
    )
    return (
        f"{settings.steps} steps x batch {settings.batch_size} of {settings.patch_size_mm} mm "
        f"patches ({'x'.join(map(str, patch_vox))} voxels at {settings.spacing_mm} mm), "
        f"{settings.lesion_fraction:.0%} centred near a lesion"
        f"{per_lesion}"
        f"{', each subject an equal share' if settings.balance_subjects else ''}; "
        f"{augmentation}; loss "
        f"{settings.loss}; Adam lr {settings.learning_rate:g}, weight decay "
        f"{settings.weight_decay:g}; seed {settings.seed}"
    )


def _fingerprint(settings: OptimisationSettings, model: UNet3D, cases: CaseSet) -> dict[str, Any]:
    dumped = settings.model_dump(mode="json", exclude=_RESUMABLE_CHANGES)
    augmentation = dumped.get("augmentation", {})
    for key, off in INTENSITY_OFF.items():  # newer fields: older checkpoints stay resumable
        if augmentation.get(key) == off:
            augmentation.pop(key)
    for key, off in _NEWER_FIELDS_OFF.items():
        if dumped.get(key) == off:
            dumped.pop(key, None)
    return {
        "settings": dumped,
        "architecture": [model.in_channels, model.out_classes, model.depth, model.base_width],
        "cases": list(cases.case_ids),
    }


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint with the most steps in ``out_dir/checkpoints``, if any."""
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def _save_checkpoint(path: Path, payload: dict[str, Any], keep: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".writing")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    for old in sorted(path.parent.glob("step_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def _encoder(model: UNet3D) -> list[torch.nn.Module]:
    return [model.stem, *model.down]


def _set_encoder_frozen(model: UNet3D, frozen: bool) -> None:
    for module in _encoder(model):
        module.train(not frozen)  # frozen BatchNorm keeps its running statistics too
        for parameter in module.parameters():
            parameter.requires_grad_(not frozen)


def _case_weights(
    cases: CaseSet, settings: OptimisationSettings, given: Sequence[float] | None
) -> npt.NDArray[np.float64] | None:
    if given is not None:
        weights = np.asarray(given, dtype=np.float64)
        if weights.shape != (len(cases),) or (weights < 0).any() or weights.sum() <= 0:
            raise TrainingError(
                f"need {len(cases)} non-negative case weights, not all zero; got {weights.shape}"
            )
        return weights / weights.sum()
    if settings.balance_subjects:
        return subject_balanced_weights(cases.subjects)
    return None


def run_training(
    model: UNet3D,
    *,
    task: str,
    cases: CaseSet,
    out_dir: Path,
    settings: OptimisationSettings,
    resume: bool = False,
    freeze_encoder_steps: int = 0,
    training_data: str | None = None,
    recipe_note: str = "",
    on_step: Callable[[int, float], None] | None = None,
    case_weights: Sequence[float] | None = None,
    channels: Sequence[str] | None = None,
) -> TrainResult:
    """Optimise ``model`` on ``cases``; write checkpoints, a log and the final weights + card.

    ``freeze_encoder_steps``: the encoder (stem and down blocks, BatchNorm statistics
    included) stays fixed for the first steps (fine-tuning). ``training_data`` (default: the
    case set's description) and ``recipe_note`` go into the model card. ``case_weights``
    (one per case) skews which cases patches come from; by default cases are drawn
    uniformly, or per subject with ``settings.balance_subjects``. ``channels``: the input
    set, one allowed for the task (default: its `TASK_CHANNELS`); every case must carry it.
    """
    try:
        channels = resolve_channels(task, channels)
    except ChannelInputError as exc:
        raise TrainingError(str(exc)) from exc
    if model.in_channels != len(channels):
        raise TrainingError(
            f"task {task} feeds {len(channels)} channels {list(channels)}, the network takes "
            f"{model.in_channels}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(settings.device)
    amp = use_mixed_precision(device, settings.amp)
    cpu_bf16 = device.type == "cpu" and settings.cpu_bfloat16 and cpu_supports_bfloat16()
    configure_cpu_threads(settings.cpu_threads)
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    if settings.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not settings.deterministic

    from lesionwatch.pipelines.inference import patch_size_voxels

    spacing = (settings.spacing_mm,) * 3
    patch_vox = patch_size_voxels(settings.patch_size_mm, spacing, model.size_multiple)
    sampler = PatchSampler(
        patch_vox,
        lesion_fraction=settings.lesion_fraction,
        lesion_balance=settings.lesion_balance,
    )
    shifted_channels = [name != "difference" for name in channels]
    # channels-last 3D: oneDNN's fast layout on CPU (1.4-1.8x per step measured), harmless on CUDA
    model.to(device=device, memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    fingerprint = _fingerprint(settings, model, cases)
    losses: list[float] = []
    start_step = 0
    resumed_from: int | None = None
    if not resume and latest_checkpoint(out_dir) is not None:
        raise TrainingError(
            f"{out_dir} holds checkpoints of an earlier run: resume it, or use a new folder"
        )
    if resume and (checkpoint := latest_checkpoint(out_dir)) is not None:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"checkpoint {checkpoint} has an unknown format")
        saved = json.loads(state["fingerprint"])
        if saved != fingerprint:
            changes = _diff(saved["settings"], fingerprint["settings"])
            if saved["architecture"] != fingerprint["architecture"]:
                changes.append("network architecture")
            if saved["cases"] != fingerprint["cases"]:
                changes.append("training cases")
            raise TrainingError(
                f"cannot resume from {checkpoint}: the run changed ({'; '.join(changes)}). "
                "Use another output folder, or the settings of the checkpoint."
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        losses = [float(v) for v in state["losses"]]
        start_step = resumed_from = int(state["step"])
        if start_step > settings.steps:
            raise TrainingError(
                f"checkpoint {checkpoint} is at step {start_step}, beyond the {settings.steps} "
                "steps asked for; ask for at least as many steps"
            )

    log_path = out_dir / "training_log.jsonl"
    if log_path.is_file():  # drop records of steps after the checkpoint (a crashed run's)
        records = log_path.read_text(encoding="utf-8").splitlines()
        kept = [r for r in records if r and json.loads(r)["step"] <= start_step]
        log_path.write_text("".join(f"{r}\n" for r in kept), encoding="utf-8")
    pool_block = -1
    pool_cases: list[tuple[int, TrainingCase]] = []
    tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    # the case set's cache must hold this pool and the next one being prefetched
    cases.cache_size = max(cases.cache_size, 2 * settings.pool_size)
    prefetcher = ThreadPoolExecutor(1, "case-prefetch") if settings.prefetch else None
    prefetching: Future[None] | None = None

    weights = _case_weights(cases, settings, case_weights)

    def pool_indices(block: int) -> list[int]:
        pool_rng = np.random.default_rng([settings.seed, 1, block])
        size = min(settings.pool_size, len(cases))
        if weights is None:
            chosen = pool_rng.choice(len(cases), size, replace=False)
        else:  # cases with zero weight never enter a pool
            size = min(size, int(np.count_nonzero(weights)))
            chosen = pool_rng.choice(len(cases), size, replace=False, p=weights)
        return sorted(int(i) for i in chosen)

    def prefetch(block: int) -> None:
        for index in pool_indices(block):
            cases.load(index)

    def load_pool(block: int) -> None:
        nonlocal pool_cases, tensors, prefetching
        if prefetching is not None:
            prefetching.result()  # surfaces a loader error; cases are deterministic anyway
        chosen = pool_indices(block)
        kept = {i: tensors[i] for i in chosen if i in tensors}
        tensors = {}  # release the old pool before loading the new one
        pool_cases = []
        if prefetcher is not None and (block + 1) * settings.pool_refresh_steps < settings.steps:
            prefetching = prefetcher.submit(prefetch, block + 1)
        for index in chosen:
            case = cases.load(index)
            if case.channels != channels:
                raise TrainingError(
                    f"case {case.case_id} carries channels {list(case.channels)}, the network "
                    f"is trained on {list(channels)}"
                )
            if not np.allclose(case.spacing_mm, spacing, atol=1e-3):
                raise TrainingError(
                    f"case {case.case_id} has spacing {case.spacing_mm} mm, training runs at "
                    f"{spacing} mm; resample the case first"
                )
            pool_cases.append((index, case))
            tensors[index] = kept.get(index) or (
                torch.from_numpy(case.image).to(device),
                torch.from_numpy(case.label).to(device),
            )

    started = time.perf_counter()
    model.train()
    frozen = False
    progress = tqdm(
        total=settings.steps,
        initial=start_step,
        desc=f"train {task}",
        disable=not settings.progress,
        dynamic_ncols=True,
    )
    try:
        with log_path.open("a", encoding="utf-8") as log:
            for step in range(start_step, settings.steps):
                if (step < freeze_encoder_steps) != frozen:
                    frozen = step < freeze_encoder_steps
                    _set_encoder_frozen(model, frozen)
                if step // settings.pool_refresh_steps != pool_block:
                    pool_block = step // settings.pool_refresh_steps
                    progress.set_postfix_str("loading cases")
                    load_pool(pool_block)
                rng = np.random.default_rng([settings.seed, 2, step])
                generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
                patches = sampler.sample_batch(
                    pool_cases,
                    settings.batch_size,
                    rng,
                    None if weights is None else [weights[i] for i, _ in pool_cases],
                )
                images, labels = [], []
                for patch in patches:
                    image, label = tensors[patch.case_index]
                    transform = None
                    aug = settings.augmentation
                    if aug.enabled and float(torch.rand(1, generator=generator)) < aug.probability:
                        transform = random_transform(aug, patch_vox, spacing, generator)
                    x, y = extract_patch(image, label, patch.start_kji, patch_vox, transform)
                    if aug.enabled:
                        x = augment_intensity(x, aug, shifted_channels, generator)
                    images.append(x)
                    labels.append(y)
                inputs = torch.stack(images).contiguous(memory_format=torch.channels_last_3d)
                targets = torch.stack(labels)
                with torch.autocast(
                    device.type,
                    dtype=torch.bfloat16 if cpu_bf16 else torch.float16,
                    enabled=amp or cpu_bf16,
                ):
                    logits = model(inputs)
                loss = compute_loss(logits, targets, settings.loss)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                value = float(loss.detach())
                if not np.isfinite(value):
                    raise TrainingError(f"loss became {value} at step {step + 1}")
                losses.append(value)
                done = step + 1
                record = {
                    "step": done,
                    "loss": value,
                    "lesion_patches": sum(p.has_lesion for p in patches),
                    "cases": [cases.case_ids[p.case_index] for p in patches],
                    "lesion_voxel_share": float((targets > 0).float().mean()),
                    "seconds": round(time.perf_counter() - started, 3),
                }
                log.write(json.dumps(record) + "\n")
                progress.update(1)
                progress.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
                if on_step is not None:
                    on_step(done, value)
                if done % settings.checkpoint_every == 0 or done == settings.steps:
                    log.flush()
                    _save_checkpoint(
                        out_dir / "checkpoints" / f"step_{done:08d}.pt",
                        {
                            "format": CHECKPOINT_FORMAT,
                            "step": done,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scaler": scaler.state_dict(),
                            "losses": losses,
                            "fingerprint": json.dumps(fingerprint),
                        },
                        settings.keep_checkpoints,
                    )
    finally:
        progress.close()
        if prefetcher is not None:
            prefetcher.shutdown(wait=True, cancel_futures=True)
        torch.use_deterministic_algorithms(previous_deterministic)
        if frozen:
            _set_encoder_frozen(model, False)

    recipe = describe_recipe(settings, patch_vox)
    if recipe_note:
        recipe = f"{recipe_note}; {recipe}"
    if resumed_from is not None:
        recipe += f" (resumed at step {resumed_from})"
    model.eval()
    name = settings.name or task
    card = save_model(
        model,
        out_dir / f"{name}.pt",
        task=task,  # type: ignore[arg-type]
        channels=channels,
        version=settings.version,
        training_data=training_data or cases.description,
        recipe=recipe,
        spacing_mm=spacing,
        patch_size_mm=settings.patch_size_mm,
    )
    return TrainResult(
        weights_path=out_dir / f"{name}.pt",
        card=card,
        steps_done=max(settings.steps, start_step),
        losses=losses,
        resumed_from_step=resumed_from,
        seconds=time.perf_counter() - started,
    )


def train(
    settings: TrainSettings,
    cases: CaseSet,
    out_dir: Path,
    *,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a freshly initialised network (seeded by ``settings.seed``) on ``cases``, fed
    ``settings.input_channels``; ``on_step(step, loss)`` is called after every step."""
    seed_everything(settings.seed)
    model = UNet3D(
        len(settings.input_channels),
        2,
        depth=settings.depth,
        base_width=settings.base_width,
        dilation=settings.dilation,
    )
    return run_training(
        model,
        task=settings.task,
        cases=cases,
        out_dir=out_dir,
        settings=settings,
        resume=resume,
        recipe_note="trained from scratch",
        on_step=on_step,
        channels=settings.input_channels,
    )
