"""Training and evaluation cases for the three tasks: real labelled studies and synthetic ones.

A `TrainingCase` is what the training loop and the evaluation driver consume: the network's
input channels (z-scored inside the brain, the pipelines' ``zscore_brain`` normalisation), a
binary label, the brain mask, and the grid (an `ImageVolume`) the arrays live on.

Real cases come from a data root (default ``../shared/data`` next to the repository, never a
machine path baked in):

- ``flair``: open_ms_data cross-sectional patients and every MSLesSeg visit with a mask
  (all MNI space, 1 mm, skull-stripped; N4-corrected at the source).
- ``new_lesions``: open_ms_data longitudinal patients. Both raw FLAIRs are N4-corrected and
  mapped into the common space with the provided ITK transforms (used as given in
  ``sitk.Resample``: they map common-space points into the raw FLAIR, checked by the brain
  mask capturing the head), then, with the change mask ``gt`` and the brain mask, onto a
  1 mm isotropic grid (the masks linearly interpolated and thresholded at 0.5, so 3 mm
  slices do not turn into staircases).
- ``enhancing``: no real enhancing-lesion masks exist; only synthetic cases.

Synthetic cases paint lesions (`models.synthetic_lesions`) into real brains, deterministic
per (seed, case index). Real lesions of the base brain are handled by ``real_lesions``:
``inpaint`` (default) fills them with the surrounding tissue first, so neither unlabelled
lesions nor the real labels of a case reach the pre-training data (which would leak a
held-out case's labels into leave-one-out results); ``label`` keeps them and adds them to the
label; ``avoid`` keeps them unlabelled and only stops synthetic lesions from overlapping them.

`build_channels` is the single definition of each task's input channels; pipelines feeding
the same networks should call it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.synthetic_lesions import (
    LesionModel,
    TissueMasks,
    add_synthetic_lesions,
    estimate_tissues,
    make_new_lesion_pair,
)
from lesionwatch.pipelines.channels import TASK_CHANNELS, build_channels, resolve_channels
from lesionwatch.pipelines.steps.bias_correction import correct_bias_field
from lesionwatch.pipelines.steps.resampling import (
    Grid,
    Interpolation,
    isotropic_grid,
    resample_to_grid,
)

__all__ = [
    "TASK_CHANNELS",
    "BrainImages",
    "BrainLoader",
    "CaseSet",
    "CaseSpec",
    "DatasetError",
    "RealLesionHandling",
    "TaskName",
    "TrainingCase",
    "build_channels",
    "crop_volume",
    "default_data_root",
    "find_real_cases",
    "inpaint_real_lesions",
    "load_brain",
    "load_real_case",
    "real_case_set",
    "synthetic_brains",
    "synthetic_case",
    "synthetic_case_set",
]

TaskName = Literal["flair", "new_lesions", "enhancing"]
RealLesionHandling = Literal["inpaint", "label", "avoid"]


_REPO_ROOT = Path(__file__).resolve().parents[1]
_OPEN_MS_CITATION = "open_ms_data (Lesjak et al., Neuroinformatics 2016/2017, CC-BY)"
_MSLESSEG_CITATION = "MSLesSeg (Sci Data 2025, CC BY 4.0; training/evaluation only)"


class DatasetError(ValueError):
    """A data root, case folder or case does not hold what the task needs."""


def default_data_root() -> Path:
    """``../shared/data`` relative to the repository root."""
    return _REPO_ROOT.parent / "shared" / "data"


# --- cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingCase:
    """Network input and truth of one case, all on one grid (arrays indexed [k, j, i])."""

    case_id: str
    subject: str
    channels: tuple[str, ...]
    image: npt.NDArray[np.float32]  # (C, Z, Y, X), z-scored in the brain, 0 outside
    label: npt.NDArray[np.uint8]  # (Z, Y, X), 1 = lesion
    brain: npt.NDArray[np.bool_]  # (Z, Y, X)
    grid: ImageVolume  # carries the geometry; its array is the label

    def __post_init__(self) -> None:
        shape = self.label.shape
        if self.image.ndim != 4 or self.image.shape[1:] != shape or self.brain.shape != shape:
            raise DatasetError(
                f"case {self.case_id}: image {self.image.shape}, label {shape} and brain "
                f"{self.brain.shape} do not share one grid"
            )
        if self.image.shape[0] != len(self.channels):
            raise DatasetError(
                f"case {self.case_id}: {self.image.shape[0]} image channels but names "
                f"{list(self.channels)}"
            )

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return self.grid.spacing_mm

    def label_volume(self, array: npt.NDArray[np.generic] | None = None) -> ImageVolume:
        """`array` (default: the label) as an ImageVolume on this case's grid."""
        return self.grid.with_array(self.label if array is None else array)


# --- real data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseSpec:
    """Where one real case lives. ``subject`` groups visits of one person (for leave-one-out)."""

    case_id: str
    subject: str
    dataset: Literal["open_ms_cross_sectional", "open_ms_longitudinal", "mslesseg"]
    folder: Path


def _require_root(data_root: Path) -> Path:
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise DatasetError(
            f"data root {data_root} does not exist; pass the folder holding open_ms_data/ "
            "and mslesseg/ (default ../shared/data next to the repository)"
        )
    return data_root


def find_real_cases(
    task: str, data_root: Path | None = None, datasets: Sequence[str] | None = None
) -> list[CaseSpec]:
    """Labelled real cases of ``task`` under ``data_root``, in a stable order.

    ``datasets`` restricts the sources (``open_ms_cross_sectional``, ``mslesseg``,
    ``open_ms_longitudinal``); folders lacking an image or mask are skipped.
    """
    root = _require_root(data_root or default_data_root())
    specs: list[CaseSpec] = []
    if task == "flair":
        for folder in sorted((root / "open_ms_data" / "cross_sectional").glob("patient*")):
            if (folder / "FLAIR.nii.gz").is_file() and (folder / "lesion_mask.nii.gz").is_file():
                specs.append(
                    CaseSpec(
                        f"open_ms_data/cross_sectional/{folder.name}",
                        f"open_ms_cross_sectional/{folder.name}",
                        "open_ms_cross_sectional",
                        folder,
                    )
                )
        for folder in sorted((root / "mslesseg").glob("P*/T*")):
            if (folder / "FLAIR.nii.gz").is_file() and (folder / "MASK.nii.gz").is_file():
                subject = folder.parent.name
                specs.append(
                    CaseSpec(
                        f"mslesseg/{subject}/{folder.name}",
                        f"mslesseg/{subject}",
                        "mslesseg",
                        folder,
                    )
                )
    elif task == "new_lesions":
        for folder in sorted((root / "open_ms_data" / "longitudinal").glob("patient*")):
            needed = [
                "gt.nii.gz",
                "brainmask_common_space.nii.gz",
                *(
                    f"study{n}_FLAIR{suffix}"
                    for n in (1, 2)
                    for suffix in (".nii.gz", "_to_common_space.txt")
                ),
            ]
            if all((folder / name).is_file() for name in needed):
                specs.append(
                    CaseSpec(
                        f"open_ms_data/longitudinal/{folder.name}",
                        f"open_ms_longitudinal/{folder.name}",
                        "open_ms_longitudinal",
                        folder,
                    )
                )
    elif task == "enhancing":
        raise DatasetError(
            "no real enhancing-lesion masks exist in the data; train and evaluate the "
            "enhancing task on synthetic cases (synthetic_case_set)"
        )
    else:
        raise DatasetError(f"unknown task {task!r}; use one of {sorted(TASK_CHANNELS)}")
    if datasets is not None:
        specs = [spec for spec in specs if spec.dataset in set(datasets)]
    if not specs:
        raise DatasetError(f"no labelled {task} cases found under {root} (datasets={datasets})")
    return specs


def _binary(volume: ImageVolume) -> ImageVolume:
    return volume.with_array((volume.array > 0).astype(np.uint8))


def _cross_sectional_case(spec: CaseSpec, channels: tuple[str, ...]) -> TrainingCase:
    mask_name = "MASK.nii.gz" if spec.dataset == "mslesseg" else "lesion_mask.nii.gz"
    flair = ImageVolume.load(spec.folder / "FLAIR.nii.gz")
    label = _binary(ImageVolume.load(spec.folder / mask_name))
    if not flair.same_grid(label):
        raise DatasetError(f"{spec.folder}: FLAIR and {mask_name} are on different grids")
    brain = _binary(flair)  # skull-stripped data: the brain is the nonzero region
    image = build_channels("flair", {"flair": flair}, brain, channels)
    return TrainingCase(
        spec.case_id,
        spec.subject,
        channels,
        image,
        label.array,
        brain.array > 0,
        label,
    )


def _to_common_space(folder: Path, study: int, reference: sitk.Image) -> ImageVolume:
    raw = ImageVolume.load(folder / f"study{study}_FLAIR.nii.gz")
    corrected = correct_bias_field(raw).to_sitk()
    transform = sitk.ReadTransform(str(folder / f"study{study}_FLAIR_to_common_space.txt"))
    moved = sitk.Resample(corrected, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return ImageVolume.from_sitk(moved)


def _soft_mask_to_grid(mask: ImageVolume, grid: Grid) -> ImageVolume:
    soft = resample_to_grid(
        mask.with_array((mask.array > 0).astype(np.float32)),
        grid,
        interpolation=Interpolation.LINEAR,
    )
    return soft.with_array((soft.array >= 0.5).astype(np.uint8))


def _longitudinal_case(
    spec: CaseSpec, channels: tuple[str, ...], spacing_mm: float = 1.0
) -> TrainingCase:
    gt = ImageVolume.load(spec.folder / "gt.nii.gz")
    brain_common = ImageVolume.load(spec.folder / "brainmask_common_space.nii.gz")
    reference = gt.to_sitk()
    grid = isotropic_grid(Grid.of(gt), spacing_mm)
    prior = resample_to_grid(
        _to_common_space(spec.folder, 1, reference), grid, interpolation=Interpolation.LINEAR
    )
    current = resample_to_grid(
        _to_common_space(spec.folder, 2, reference), grid, interpolation=Interpolation.LINEAR
    )
    brain = _soft_mask_to_grid(brain_common, grid)
    label = _soft_mask_to_grid(gt, grid)
    image = build_channels(
        "new_lesions", {"prior_flair_registered": prior, "current_flair": current}, brain, channels
    )
    return TrainingCase(
        spec.case_id,
        spec.subject,
        channels,
        image,
        label.array,
        brain.array > 0,
        label,
    )


def load_real_case(
    spec: CaseSpec, task: str, channels: Sequence[str] | None = None
) -> TrainingCase:
    """Read, map and normalise one real case for ``task`` (``channels``: one of the task's
    allowed sets, default its `TASK_CHANNELS`)."""
    if task == "flair" and spec.dataset in ("open_ms_cross_sectional", "mslesseg"):
        return _cross_sectional_case(spec, resolve_channels(task, channels))
    if task == "new_lesions" and spec.dataset == "open_ms_longitudinal":
        return _longitudinal_case(spec, resolve_channels(task, channels))
    raise DatasetError(f"case {spec.case_id} ({spec.dataset}) cannot serve task {task!r}")


# --- brains for synthetic lesions -------------------------------------------------------------


@dataclass(frozen=True)
class BrainImages:
    """A real skull-stripped brain to paint synthetic lesions into (all on the FLAIR grid)."""

    subject: str
    flair: ImageVolume
    t1: ImageVolume | None = None
    t1_post: ImageVolume | None = None
    lesions: ImageVolume | None = None  # real lesion mask, when known
    source: str = ""  # dataset and licence, for model cards


def crop_volume(volume: ImageVolume, box: tuple[slice, slice, slice]) -> ImageVolume:
    """The sub-volume ``array[box]`` (box in k, j, i order) with its geometry kept exact."""
    origin = volume.index_to_lps([s.start or 0 for s in box[::-1]])
    return ImageVolume(
        np.ascontiguousarray(volume.array[box]), volume.spacing_mm, tuple(origin), volume.direction
    )


@dataclass(frozen=True)
class BrainLoader:
    """Loads one real brain when called (so a case set holds only the brains it uses)."""

    spec: CaseSpec

    @property
    def name(self) -> str:
        citation = _MSLESSEG_CITATION if self.spec.dataset == "mslesseg" else _OPEN_MS_CITATION
        return f"{self.spec.case_id} [{citation}]"

    def __call__(self) -> BrainImages:
        return load_brain(self.spec)


def load_brain(spec: CaseSpec) -> BrainImages:
    """FLAIR (+ T1, T1-post, real lesion mask where present) of a cross-sectional case."""
    if spec.dataset not in ("open_ms_cross_sectional", "mslesseg"):
        raise DatasetError(
            f"{spec.case_id}: synthetic lesions need a skull-stripped MNI brain "
            "(open_ms_data cross-sectional or MSLesSeg)"
        )

    def optional(name: str) -> ImageVolume | None:
        path = spec.folder / name
        if not path.is_file():
            return None
        volume = ImageVolume.load(path)
        return volume.with_array(volume.array.astype(np.float32))

    flair = ImageVolume.load(spec.folder / "FLAIR.nii.gz")
    flair = flair.with_array(flair.array.astype(np.float32))
    t1 = optional("T1.nii.gz")
    t1_post = optional("T1POST.nii.gz")
    lesions = optional("MASK.nii.gz" if spec.dataset == "mslesseg" else "lesion_mask.nii.gz")
    citation = _MSLESSEG_CITATION if spec.dataset == "mslesseg" else _OPEN_MS_CITATION
    return BrainImages(spec.subject, flair, t1, t1_post, lesions, f"{spec.case_id} [{citation}]")


def _inpaint(
    image: npt.NDArray[np.float32],
    region: npt.NDArray[np.bool_],
    source: npt.NDArray[np.bool_],
    rng: np.random.Generator,
) -> npt.NDArray[np.float32]:
    """Fill ``region`` from the ``source`` voxels around it: normalised convolution at growing
    scales (large confluent lesions need the wider ones), plus noise of the fine texture."""
    valid = source & ~region
    out = image.copy()
    todo = region.copy()
    for sigma in (1.5, 3.0, 6.0, 12.0, 24.0):
        weight = ndimage.gaussian_filter(valid.astype(np.float32), sigma)
        value = ndimage.gaussian_filter(np.where(valid, image, 0.0).astype(np.float32), sigma)
        ready = todo & (weight > 0.2)
        out[ready] = value[ready] / weight[ready]
        todo &= ~ready
        if not todo.any():
            break
    if todo.any():
        out[todo] = float(np.median(image[valid]))
    fine = image - ndimage.gaussian_filter(image, 1.0)
    noise_sd = float(np.std(fine[valid])) if valid.any() else 0.0
    out[region] += rng.normal(0.0, noise_sd, int(region.sum())).astype(np.float32)
    return out.astype(np.float32)


def inpaint_real_lesions(brain: BrainImages, rng: np.random.Generator) -> BrainImages:
    """The brain with its real lesions (dilated by a voxel for their partial-volume rim)
    filled from the surrounding white matter, and ``lesions`` set to None.

    Lesions sit in white matter; filling from all tissue would pull in the dark ventricles
    next to periventricular lesions. Measured on patient19 (49.8 mL of lesions): mean FLAIR
    in the filled region 65.4 against a white-matter median of 68.1 (89.8 before), T1 223.5
    against 218.6 (146.9 before). Takes 5-25 s per brain, so case sets do it once per brain.
    """
    if brain.lesions is None:
        return brain
    inside = brain.flair.array != 0
    region = ndimage.binary_dilation(brain.lesions.array > 0, iterations=1) & inside
    white_matter = estimate_tissues(brain.flair, None, brain.t1).wm

    def fill(volume: ImageVolume | None) -> ImageVolume | None:
        if volume is None:
            return None
        return volume.with_array(
            _inpaint(volume.array.astype(np.float32), region, white_matter, rng)
        )

    filled = fill(brain.flair)
    assert filled is not None
    return replace(
        brain, flair=filled, t1=fill(brain.t1), t1_post=fill(brain.t1_post), lesions=None
    )


def _registered_prior(
    prior: ImageVolume, current: ImageVolume, current_to_prior: npt.NDArray[np.float64]
) -> ImageVolume:
    """The moved prior brought back onto the current grid (a perfect rigid registration)."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in current_to_prior[:3, :3].ravel()))
    transform.SetTranslation(tuple(float(v) for v in current_to_prior[:3, 3]))
    moved = sitk.Resample(
        prior.to_sitk(), current.to_sitk(), transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    return ImageVolume.from_sitk(moved)


def synthetic_case(
    task: str,
    brain: BrainImages,
    rng: np.random.Generator,
    *,
    case_id: str,
    lesion_model: LesionModel | None = None,
    tissues: TissueMasks | None = None,
    real_lesions: RealLesionHandling = "inpaint",
    new_lesion_range: tuple[int, int] = (1, 6),
    channels: Sequence[str] | None = None,
) -> TrainingCase:
    """One synthetic case of ``task`` painted into ``brain`` (deterministic given ``rng``).

    flair: all lesions labelled; new_lesions: a prior/current pair from
    `make_new_lesion_pair`, the prior registered back onto the current grid, label = new
    lesions; enhancing: T1 pre/post with enhancing lesions, label = enhancing voxels.
    ``channels``: one of the task's allowed sets (default: its `TASK_CHANNELS`); the lesions
    painted do not depend on it.
    """
    model = lesion_model or LesionModel()
    if real_lesions == "inpaint" and brain.lesions is not None:
        brain = inpaint_real_lesions(brain, rng)
        tissues = None  # the images changed
    avoid = brain.lesions
    brain_mask = _binary(brain.flair)
    real_label = (
        (brain.lesions.array > 0)
        if (real_lesions == "label" and brain.lesions is not None)
        else None
    )
    if task == "flair":
        painted = add_synthetic_lesions(
            brain.flair,
            rng,
            brain_mask=brain_mask,
            t1=brain.t1,
            tissues=tissues,
            avoid_mask=avoid,
            model=model,
        )
        label = painted.labels.array > 0
        volumes = {"flair": painted.flair}
    elif task == "enhancing":
        if brain.t1 is None or brain.t1_post is None:
            raise DatasetError(f"{brain.source}: the enhancing task needs T1 and T1-post images")
        painted = add_synthetic_lesions(
            brain.flair,
            rng,
            brain_mask=brain_mask,
            t1=brain.t1,
            t1_post=brain.t1_post,
            tissues=tissues,
            avoid_mask=avoid,
            model=model,
        )
        assert painted.enhancing is not None and painted.t1 is not None
        assert painted.t1_post is not None
        label = painted.enhancing.array > 0
        real_label = None  # real lesions carry no enhancement label
        volumes = {"t1_pre": painted.t1, "t1_post": painted.t1_post}
    elif task == "new_lesions":
        n_new = int(rng.integers(new_lesion_range[0], new_lesion_range[1] + 1))
        pair = make_new_lesion_pair(
            brain.flair,
            rng,
            n_new,
            brain_mask=brain_mask,
            t1=brain.t1,
            tissues=tissues,
            avoid_mask=avoid,
            model=model,
            grow_fraction=0.2,
        )
        prior = _registered_prior(
            pair.prior.flair, pair.current.flair, pair.change.current_to_prior_lps
        )
        label = pair.new_lesions.array > 0
        real_label = None  # real lesions are present at both time points: not new
        volumes = {"prior_flair_registered": prior, "current_flair": pair.current.flair}
    else:
        raise DatasetError(f"unknown task {task!r}; use one of {sorted(TASK_CHANNELS)}")
    if real_label is not None:
        label = label | real_label
    chosen = resolve_channels(task, channels)
    image = build_channels(task, volumes, brain_mask, chosen)
    label_volume = brain.flair.with_array(label.astype(np.uint8))
    return TrainingCase(
        case_id,
        brain.subject,
        chosen,
        image,
        label_volume.array,
        brain_mask.array > 0,
        label_volume,
    )


# --- case sets --------------------------------------------------------------------------------


class CaseSet:
    """Cases by index, built on demand by ``loader`` and kept in a small LRU cache.

    A loader must be deterministic per index (real files, or synthetic cases seeded by
    index), so the cache size never changes what training sees.
    """

    def __init__(
        self,
        case_ids: Sequence[str],
        subjects: Sequence[str],
        loader: Callable[[int], TrainingCase],
        description: str,
        *,
        cache_size: int = 8,
    ) -> None:
        if len(case_ids) != len(subjects):
            raise ValueError("case_ids and subjects must have the same length")
        if not case_ids:
            raise DatasetError(f"empty case set: {description}")
        self.case_ids = tuple(case_ids)
        self.subjects = tuple(subjects)
        self.description = description
        self.cache_size = max(1, cache_size)
        self._loader = loader
        self._cache: OrderedDict[int, TrainingCase] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.case_ids)

    def load(self, index: int) -> TrainingCase:
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
        case = self._loader(index)
        with self._lock:
            self._cache[index] = case
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return case

    def subset(self, indices: Sequence[int], description: str | None = None) -> CaseSet:
        """The cases at ``indices`` (sharing this set's loader, not its cache)."""
        chosen = [int(i) for i in indices]
        return CaseSet(
            [self.case_ids[i] for i in chosen],
            [self.subjects[i] for i in chosen],
            lambda i: self.load(chosen[i]),
            description or f"{self.description}; cases {[self.case_ids[i] for i in chosen]}",
            cache_size=self.cache_size,
        )

    @classmethod
    def concat(cls, sets: Sequence[CaseSet]) -> CaseSet:
        """All cases of ``sets`` in order (e.g. synthetic plus real)."""
        owners = [(s, i) for s in sets for i in range(len(s))]
        return cls(
            [s.case_ids[i] for s, i in owners],
            [s.subjects[i] for s, i in owners],
            lambda k: owners[k][0].load(owners[k][1]),
            " + ".join(s.description for s in sets),
            cache_size=max((s.cache_size for s in sets), default=1),
        )

    @classmethod
    def of_cases(cls, cases: Sequence[TrainingCase], description: str) -> CaseSet:
        """A set of cases already in memory."""
        held = list(cases)
        return cls(
            [c.case_id for c in held],
            [c.subject for c in held],
            lambda i: held[i],
            description,
            cache_size=len(held),
        )


def real_case_set(
    task: str,
    data_root: Path | None = None,
    datasets: Sequence[str] | None = None,
    *,
    cache_size: int = 8,
    channels: Sequence[str] | None = None,
) -> CaseSet:
    """The labelled real cases of ``task`` (loaded lazily) with ``channels`` (default: the
    task's `TASK_CHANNELS`)."""
    specs = find_real_cases(task, data_root, datasets)
    chosen = resolve_channels(task, channels)
    sources = sorted({spec.dataset for spec in specs})
    citations = [_MSLESSEG_CITATION if s == "mslesseg" else _OPEN_MS_CITATION for s in sources]
    description = (
        f"real labelled {task} cases: {', '.join(s.case_id for s in specs)} "
        f"[{'; '.join(sorted(set(citations)))}]"
    )
    if chosen != TASK_CHANNELS[task]:
        description += f", input channels {list(chosen)}"
    return CaseSet(
        [s.case_id for s in specs],
        [s.subject for s in specs],
        lambda i: load_real_case(specs[i], task, chosen),
        description,
        cache_size=cache_size,
    )


def synthetic_brains(
    task: str,
    data_root: Path | None = None,
    *,
    datasets: Sequence[str] | None = None,
    exclude_subjects: Sequence[str] = (),
) -> list[BrainLoader]:
    """Loaders of the real skull-stripped brains that can carry synthetic ``task`` lesions:
    every cross-sectional open_ms_data patient and MSLesSeg visit (for ``enhancing`` only
    those with a T1-post image). ``exclude_subjects`` keeps held-out people out."""
    specs = [
        spec
        for spec in find_real_cases("flair", data_root, datasets)
        if spec.subject not in set(exclude_subjects)
        and (task != "enhancing" or (spec.folder / "T1POST.nii.gz").is_file())
    ]
    if not specs:
        raise DatasetError(f"no brain under {data_root} can carry synthetic {task} lesions")
    return [BrainLoader(spec) for spec in specs]


def synthetic_case_set(
    task: str,
    brains: Sequence[BrainImages] | Sequence[Callable[[], BrainImages]],
    n_cases: int,
    seed: int,
    *,
    lesion_model: LesionModel | None = None,
    real_lesions: RealLesionHandling = "inpaint",
    cache_size: int = 8,
    channels: Sequence[str] | None = None,
) -> CaseSet:
    """``n_cases`` synthetic cases; case ``i`` uses brain ``i % len(brains)`` and the random
    stream ``(seed, i)``, so any case can be rebuilt alone. ``brains`` may be loaders.
    ``channels`` (default: the task's `TASK_CHANNELS`) changes the input, not the lesions."""
    chosen = resolve_channels(task, channels)
    if n_cases < 1 or not brains:
        raise DatasetError("a synthetic case set needs n_cases >= 1 and at least one brain")
    if lesion_model is None and task == "enhancing":
        lesion_model = LesionModel(enhancing_fraction=0.6)
    prepared: dict[int, tuple[BrainImages, TissueMasks]] = {}
    lock = threading.Lock()

    def brain_at(b: int) -> tuple[BrainImages, TissueMasks]:
        # once per brain: load, inpaint real lesions (when asked), estimate tissues
        with lock:
            if b not in prepared:
                item = brains[b]
                brain = item if isinstance(item, BrainImages) else item()
                if real_lesions == "inpaint" and brain.lesions is not None:
                    brain = inpaint_real_lesions(brain, np.random.default_rng([seed, 0, b]))
                prepared[b] = (brain, estimate_tissues(brain.flair, None, brain.t1))
            return prepared[b]

    def load(i: int) -> TrainingCase:
        brain, tissues = brain_at(i % len(brains))
        rng = np.random.default_rng([seed, i])
        return synthetic_case(
            task,
            brain,
            rng,
            case_id=f"synthetic-{task}-{seed}-{i:05d}",
            lesion_model=lesion_model,
            tissues=tissues,
            real_lesions=real_lesions,
            channels=chosen,
        )

    names = [
        (b.source or b.subject) if isinstance(b, BrainImages) else getattr(b, "name", f"brain {k}")
        for k, b in enumerate(brains)
    ]
    load_text = ""
    if lesion_model is not None and lesion_model.median_volume_range_mm3 is not None:
        low, high = lesion_model.median_volume_range_mm3
        load_text = (
            f", {lesion_model.count_range[0]}-{lesion_model.count_range[1]} lesions per case "
            f"with a per-case median volume of {low:g}-{high:g} mm3"
        )
    if lesion_model is not None and lesion_model.ependymal_rim_mm > 0:
        load_text += (
            f", periventricular lesions reaching the ventricular wall "
            f"(rim {lesion_model.ependymal_rim_mm:g} mm)"
        )
    if lesion_model is not None and lesion_model.confluent_count_range[1] > 0:
        count_low, count_high = lesion_model.confluent_count_range
        volume_low, volume_high = lesion_model.confluent_volume_range_mm3
        load_text += (
            f", plus {count_low}-{count_high} confluent periventricular plaques of "
            f"{volume_low:g}-{volume_high:g} mm3"
        )
    if chosen != TASK_CHANNELS[task]:
        load_text += f", input channels {list(chosen)}"
    description = (
        f"{n_cases} synthetic {task} cases (models.synthetic_lesions, seed {seed}, real "
        f"lesions: {real_lesions}{load_text}) in real brains: {'; '.join(names)}"
    )
    subjects = [f"synthetic/{i % len(brains)}" for i in range(n_cases)]
    ids = [f"synthetic-{task}-{seed}-{i:05d}" for i in range(n_cases)]
    return CaseSet(ids, subjects, load, description, cache_size=cache_size)
