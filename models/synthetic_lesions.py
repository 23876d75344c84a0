"""Synthetic MS lesions painted into real brain images, for pre-training before fine-tuning.

The training idea: plentiful synthetic lesions with exact labels, then a few real studies.
Everything here is deterministic given a ``numpy.random.Generator``.

How a lesion is made (all on the image grid, 1 mm FLAIR in mind but any spacing works):

1. Tissues: a 3-class k-means on the brain's intensities (T1 and FLAIR when both are given,
   FLAIR alone otherwise) gives CSF / grey matter / white matter; the white matter is opened
   to drop thin partial-volume rims. Ventricles are the large CSF components deep in the brain.
   (Atropos, ``ants.kmeans_segmentation``, gives similar classes but took 17 s per brain here,
   against well under a second for this.)
2. Place: sizes are log-normal (many lesions of a few tens of mm3, a tail up to a few mL);
   a share of lesions sits within ``periventricular_distance_mm`` of the ventricles with its
   long axis along the gradient of the distance to them, i.e. perpendicular to the
   ventricular wall (Dawson's fingers); the others get a random orientation.
3. Shape: a priority flood from the centre through white matter only, ordered by an
   ellipsoidal distance plus a smoothed random field, stops at exactly the requested number
   of voxels: ovoid but irregular, one connected piece, never touching another lesion.
   Optional confluent plaques (``confluent_count_range``) are placed first: several mL,
   stretched along the ventricular wall, grown through white matter with its small gaps
   closed, so they come out solid like the plaques of heavily affected patients.
   With ``ependymal_rim_mm`` set, periventricular lesions may also grow through the
   partial-volume rim along the ventricles (never into them), so that like real
   periventricular lesions they reach the ventricular wall.
4. Intensity: FLAIR is raised towards (1 + c) times the local white-matter median
   (c in ``flair_contrast``); T1 is lowered; on T1-post a share of lesions enhances as a
   nodule or a ring. A smoothed copy of the mask gives partial-volume edges: voxels inside
   the label get at least ``1/2`` of the contrast, voxels outside at most ``1/2``.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from lesionwatch.dicom_io.image_volume import ImageVolume

__all__ = [
    "EnhancementPattern",
    "LesionModel",
    "NewLesionPair",
    "SyntheticLesion",
    "SyntheticLesionError",
    "SyntheticLesions",
    "TimePointChange",
    "TissueMasks",
    "add_synthetic_lesions",
    "estimate_tissues",
    "make_new_lesion_pair",
]

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]
_LOW_RES_FACTOR = 2  # distance maps are computed on every 2nd voxel: 8x fewer voxels
_EDGE_SHARE = 0.45  # most contrast a voxel outside the label gets (inside: at least 0.55)
_MARGIN_VOXELS = 4  # room around a lesion for soft edges and growth


class SyntheticLesionError(ValueError):
    """Bad input for lesion synthesis, or no room left in the white matter."""


class EnhancementPattern(Enum):
    NONE = "none"
    NODULAR = "nodular"
    RING = "ring"


@dataclass(frozen=True)
class LesionModel:
    """Distributions lesions are drawn from; defaults after typical relapsing MS on 1.5-3 T."""

    count_range: tuple[int, int] = (5, 40)
    median_volume_mm3: float = 30.0
    volume_log_sd: float = 1.2
    min_volume_mm3: float = 4.0  # above the 3 mm3 detection limit of the MSSEG scoring
    max_volume_mm3: float = 3000.0
    # When set, each case draws its own median lesion volume log-uniformly from this range:
    # lesion load varies ~50-fold between MS patients (under 1 mL to confluent tens of mL),
    # and a model that only saw light loads under-calls heavy ones.
    median_volume_range_mm3: tuple[float, float] | None = None
    periventricular_fraction: float = 0.5
    periventricular_distance_mm: float = 8.0
    # Periventricular lesions may grow this far (mm) from the ventricles into voxels k-means
    # did not call white matter (the ependymal partial-volume rim). Off by default; 3 mm did
    # not raise the FLAIR model's held-out scores (see models/reproduce.py).
    ependymal_rim_mm: float = 0.0
    # Confluent periventricular lesions (caps and bands along the ventricles, several mL each),
    # placed first and stretched along the ventricular wall. Real heavy loads are mostly such
    # plaques (one 47 mL band in open_ms patient19, 10 mL plaques in MSLesSeg P14); scattered
    # ovoids alone taught the FLAIR model to leave them out. Off by default: (0, 0).
    confluent_count_range: tuple[int, int] = (0, 0)
    confluent_volume_range_mm3: tuple[float, float] = (2000.0, 20000.0)
    confluent_elongation_range: tuple[float, float] = (2.0, 4.0)
    elongation_range: tuple[float, float] = (1.0, 2.5)
    irregularity: float = 0.35
    flair_contrast: tuple[float, float] = (0.3, 0.8)
    t1_hypointensity: tuple[float, float] = (0.05, 0.35)
    enhancing_fraction: float = 0.3
    ring_fraction: float = 0.4
    t1_post_enhancement: tuple[float, float] = (0.3, 0.9)
    texture_sd: float = 0.05
    edge_sigma_mm: float = 0.6
    max_attempts: int = 40

    def __post_init__(self) -> None:
        if not 0 < self.min_volume_mm3 <= self.max_volume_mm3:
            raise ValueError("need 0 < min_volume_mm3 <= max_volume_mm3")
        for name in ("periventricular_fraction", "enhancing_fraction", "ring_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        low_high = self.median_volume_range_mm3
        if low_high is not None and not 0 < low_high[0] <= low_high[1]:
            raise ValueError("need 0 < median_volume_range_mm3[0] <= median_volume_range_mm3[1]")
        if self.ependymal_rim_mm < 0:
            raise ValueError(f"ependymal_rim_mm must be >= 0, got {self.ependymal_rim_mm}")
        count_low, count_high = self.confluent_count_range
        if not 0 <= count_low <= count_high:
            raise ValueError("confluent_count_range must be (low, high) with 0 <= low <= high")
        volume_low, volume_high = self.confluent_volume_range_mm3
        if not 0 < volume_low <= volume_high:
            raise ValueError("confluent_volume_range_mm3 must be (low, high), 0 < low <= high")
        if not 1.0 <= self.confluent_elongation_range[0] <= self.confluent_elongation_range[1]:
            raise ValueError("confluent_elongation_range must be (low, high), 1 <= low <= high")

    def for_case(self, rng: np.random.Generator) -> LesionModel:
        """This model with the case's own median lesion volume drawn (when a range is set)."""
        if self.median_volume_range_mm3 is None:
            return self
        low, high = (math.log(v) for v in self.median_volume_range_mm3)
        return replace(self, median_volume_mm3=math.exp(rng.uniform(low, high)))


@dataclass(frozen=True)
class TissueMasks:
    """Boolean masks on the image grid (array order k, j, i)."""

    brain: BoolArray
    csf: BoolArray
    gm: BoolArray
    wm: BoolArray
    ventricles: BoolArray


@dataclass(frozen=True)
class SyntheticLesion:
    label: int
    centre_ijk: tuple[int, int, int]
    requested_volume_mm3: float
    volume_mm3: float
    long_axis_ijk: tuple[float, float, float]
    periventricular: bool
    flair_contrast: float
    t1_hypointensity: float
    enhancement: EnhancementPattern
    enhancement_strength: float
    texture_seed: int


@dataclass(frozen=True)
class SyntheticLesions:
    """Images with lesions painted in, and the exact labels (lesion ``n`` has label ``n``)."""

    flair: ImageVolume
    labels: ImageVolume
    lesions: tuple[SyntheticLesion, ...]
    tissues: TissueMasks
    t1: ImageVolume | None = None
    t1_post: ImageVolume | None = None
    enhancing: ImageVolume | None = None


@dataclass(frozen=True)
class TimePointChange:
    """What differs between prior and current besides lesions."""

    current_to_prior_lps: npt.NDArray[np.float64]  # 4x4: a current point -> the prior's point
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    intensity_scale: float
    bias_amplitude: float


@dataclass(frozen=True)
class NewLesionPair:
    """A prior/current pair. Ground truth lives on the current grid.

    ``prior`` images, labels and enhancing mask are moved and intensity-changed; its
    ``lesions`` (centres) and ``tissues`` describe the brain before the motion, i.e. on the
    current grid.
    """

    prior: SyntheticLesions
    current: SyntheticLesions
    new_lesions: ImageVolume  # uint8 mask of lesions present only in the current study
    enlarged: ImageVolume  # uint8 mask of voxels by which shared lesions grew
    change: TimePointChange


# --- tissues ----------------------------------------------------------------------------------


def _kmeans(features: FloatArray, n_classes: int, iterations: int = 30) -> FloatArray:
    """Lloyd's k-means with quantile initialisation along the first feature (deterministic)."""
    order = np.argsort(features[:, 0])
    picks = order[((np.arange(n_classes) + 0.5) / n_classes * len(order)).astype(int)]
    centres = features[picks].copy()
    for _ in range(iterations):
        distances = ((features[:, None, :] - centres[None]) ** 2).sum(axis=2)
        assignment = distances.argmin(axis=1)
        updated = np.array(
            [
                features[assignment == c].mean(axis=0) if np.any(assignment == c) else centres[c]
                for c in range(n_classes)
            ]
        )
        if np.allclose(updated, centres, atol=1e-4):
            break
        centres = updated
    return centres.astype(np.float32)


def _low_res_distance(mask: BoolArray, spacing_kji: npt.NDArray[np.float64]) -> FloatArray:
    """Distance (mm) to the nearest ``mask`` voxel on a 2x coarser grid; inf when mask is empty."""
    coarse = mask[::_LOW_RES_FACTOR, ::_LOW_RES_FACTOR, ::_LOW_RES_FACTOR]
    if not coarse.any():
        return np.full(coarse.shape, np.inf, dtype=np.float32)
    return ndimage.distance_transform_edt(~coarse, sampling=spacing_kji * _LOW_RES_FACTOR).astype(
        np.float32
    )


def _depth_low_res(brain: BoolArray, spacing_kji: npt.NDArray[np.float64]) -> FloatArray:
    coarse = np.pad(brain[::_LOW_RES_FACTOR, ::_LOW_RES_FACTOR, ::_LOW_RES_FACTOR], 1)
    depth = ndimage.distance_transform_edt(coarse, sampling=spacing_kji * _LOW_RES_FACTOR)
    return depth[1:-1, 1:-1, 1:-1].astype(np.float32)


def _upsample(coarse: npt.NDArray[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    index = np.ix_(*(np.arange(n) // _LOW_RES_FACTOR for n in shape))
    return coarse[index]


def estimate_tissues(
    flair: ImageVolume,
    brain_mask: ImageVolume | npt.NDArray[Any] | None = None,
    t1: ImageVolume | None = None,
    min_ventricle_ml: float = 1.0,
    min_ventricle_depth_mm: float = 20.0,
) -> TissueMasks:
    """CSF / GM / WM by 3-class k-means inside the brain, and the ventricles.

    ``brain_mask`` defaults to the nonzero voxels of the (skull-stripped) FLAIR. With a T1 the
    classes are ordered by T1 (CSF < GM < WM), with FLAIR alone by FLAIR (CSF < WM < GM).
    """
    brain = _brain_array(flair, brain_mask)
    if brain.sum() < 1000:
        raise SyntheticLesionError(f"brain mask has only {int(brain.sum())} voxels")
    channels = [flair.array[brain].astype(np.float32)]
    if t1 is not None:
        _check_grid(flair, t1, "T1")
        channels.insert(0, t1.array[brain].astype(np.float32))
    features = np.stack(channels, axis=1)
    low, high = np.percentile(features, [1, 99], axis=0)
    features = (np.clip(features, low, high) - low) / np.maximum(high - low, 1e-6)
    stride = max(1, len(features) // 50_000)
    centres = _kmeans(features[::stride], 3)
    assignment = np.empty(len(features), dtype=np.int8)
    for start in range(0, len(features), 1_000_000):
        chunk = features[start : start + 1_000_000]
        assignment[start : start + len(chunk)] = (
            ((chunk[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
        )
    rank = np.argsort(np.argsort(centres[:, 0]))  # class -> 0 (darkest) .. 2 on channel 0
    names = ("csf", "gm", "wm") if t1 is not None else ("csf", "wm", "gm")
    masks: dict[str, BoolArray] = {}
    for position, name in enumerate(names):
        mask = np.zeros(brain.shape, dtype=bool)
        mask[brain] = rank[assignment] == position
        masks[name] = mask
    # thin WM-labelled rims between CSF and cortex are partial volume, not white matter
    masks["wm"] = ndimage.binary_opening(
        masks["wm"], structure=ndimage.generate_binary_structure(3, 1)
    )
    spacing_kji = np.asarray(flair.spacing_mm[::-1])
    deep = _upsample(_depth_low_res(brain, spacing_kji), brain.shape) >= min_ventricle_depth_mm
    labels, n = ndimage.label(masks["csf"] & deep)
    sizes_ml = np.bincount(labels.ravel(), minlength=n + 1) * flair.voxel_volume_mm3 / 1000.0
    big = sizes_ml >= min_ventricle_ml
    big[0] = False
    return TissueMasks(brain=brain, ventricles=big[labels], **masks)


# --- helpers ----------------------------------------------------------------------------------


def _check_grid(reference: ImageVolume, other: ImageVolume, name: str) -> None:
    if not reference.same_grid(other):
        raise SyntheticLesionError(
            f"{name} is not on the FLAIR grid (shape {other.array.shape} vs "
            f"{reference.array.shape}); resample it onto the FLAIR first"
        )


def _brain_array(
    flair: ImageVolume, brain_mask: ImageVolume | npt.NDArray[Any] | None
) -> BoolArray:
    if brain_mask is None:
        return np.asarray(flair.array != 0)
    if isinstance(brain_mask, ImageVolume):
        _check_grid(flair, brain_mask, "brain mask")
        brain_mask = brain_mask.array
    if brain_mask.shape != flair.array.shape:
        raise SyntheticLesionError(
            f"brain mask shape {brain_mask.shape} differs from FLAIR {flair.array.shape}"
        )
    return np.asarray(brain_mask) != 0


def _box(
    centre: npt.NDArray[np.int64], radius: npt.NDArray[np.int64], shape: tuple[int, ...]
) -> tuple[slice, ...]:
    return tuple(
        slice(max(0, int(c - r)), min(n, int(c + r + 1)))
        for c, r, n in zip(centre, radius, shape, strict=True)
    )


def _grow(
    score: FloatArray, allowed: BoolArray, start: tuple[int, ...], n_voxels: int
) -> BoolArray | None:
    """Exactly ``n_voxels`` face-connected voxels from ``start``, highest score first."""
    padded_allowed = np.pad(allowed, 1).ravel().tolist()
    padded_score = np.pad(score, 1).ravel().tolist()
    dims = tuple(s + 2 for s in allowed.shape)
    steps = (dims[1] * dims[2], dims[2], 1)
    offsets = [s * d for s in steps for d in (-1, 1)]
    seed = sum((c + 1) * s for c, s in zip(start, steps, strict=True))
    if not padded_allowed[seed]:
        return None
    queued = {seed}
    heap = [(-padded_score[seed], seed)]
    taken: list[int] = []
    while heap and len(taken) < n_voxels:
        _, voxel = heapq.heappop(heap)
        taken.append(voxel)
        for offset in offsets:
            neighbour = voxel + offset
            if padded_allowed[neighbour] and neighbour not in queued:
                queued.add(neighbour)
                heapq.heappush(heap, (-padded_score[neighbour], neighbour))
    if len(taken) < n_voxels:
        return None
    grown = np.zeros(int(np.prod(dims)), dtype=bool)
    grown[taken] = True
    return grown.reshape(dims)[1:-1, 1:-1, 1:-1]


def _unit(vector: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 1e-9 else vector


def _random_unit(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    return _unit(rng.standard_normal(3))


@dataclass
class _Context:
    """Everything placement needs, computed once per brain."""

    shape: tuple[int, int, int]
    spacing_kji: npt.NDArray[np.float64]
    voxel_mm3: float
    wm: BoolArray
    periventricular_region: BoolArray  # where periventricular lesions may grow
    centres_any: npt.NDArray[np.int64]  # candidate centres (k, j, i), deep enough in WM
    centres_periventricular: npt.NDArray[np.int64]
    ventricle_distance: FloatArray  # low-res mm
    occupied: BoolArray  # lesions and their 26-neighbourhood: closed to new lesions
    originals: dict[str, FloatArray]  # unpainted images: local references come from these
    flair: FloatArray
    t1: FloatArray | None
    t1_post: FloatArray | None
    brain: BoolArray
    csf: BoolArray  # ventricles included: plaques may close white-matter gaps, never fill CSF

    def reset_images(self) -> None:
        self.flair = self.originals["flair"].copy()
        self.t1 = self.originals["t1"].copy() if "t1" in self.originals else None
        self.t1_post = self.originals["t1_post"].copy() if "t1_post" in self.originals else None


def _context(
    flair: ImageVolume,
    tissues: TissueMasks,
    model: LesionModel,
    t1: ImageVolume | None,
    t1_post: ImageVolume | None,
    avoid: BoolArray | None,
) -> _Context:
    spacing_kji = np.asarray(flair.spacing_mm[::-1], dtype=np.float64)
    occupied = np.zeros(flair.array.shape, dtype=bool)
    if avoid is not None:
        occupied = ndimage.binary_dilation(avoid, structure=np.ones((3, 3, 3), bool), iterations=2)
    wm = tissues.wm & ~occupied
    core = ndimage.binary_erosion(wm, structure=ndimage.generate_binary_structure(3, 1))
    centres_any = np.argwhere(core if core.any() else wm)
    if len(centres_any) == 0:
        raise SyntheticLesionError("the white-matter mask is empty: no place for lesions")
    ventricle_distance = _low_res_distance(tissues.ventricles, spacing_kji)
    coarse = (centres_any // _LOW_RES_FACTOR).T
    near = ventricle_distance[tuple(coarse)] <= model.periventricular_distance_mm
    periventricular_region = wm
    if model.ependymal_rim_mm > 0 and tissues.ventricles.any():
        rim = _ependymal_rim(tissues, spacing_kji, model.ependymal_rim_mm)
        periventricular_region = wm | (rim & ~occupied)
    originals = {
        name: image.array.astype(np.float32)
        for name, image in (("flair", flair), ("t1", t1), ("t1_post", t1_post))
        if image is not None
    }
    ctx = _Context(
        shape=flair.array.shape,
        spacing_kji=spacing_kji,
        voxel_mm3=flair.voxel_volume_mm3,
        wm=wm,
        periventricular_region=periventricular_region,
        centres_any=centres_any,
        centres_periventricular=centres_any[near],
        ventricle_distance=ventricle_distance,
        occupied=occupied,
        originals=originals,
        flair=originals["flair"],
        t1=None,
        t1_post=None,
        brain=tissues.brain,
        csf=tissues.csf | tissues.ventricles,
    )
    ctx.reset_images()
    return ctx


def _ependymal_rim(
    tissues: TissueMasks, spacing_kji: npt.NDArray[np.float64], rim_mm: float
) -> BoolArray:
    """Brain voxels outside the ventricles within ``rim_mm`` of them (full resolution: the
    rim is only a few voxels thick), computed inside the ventricles' bounding box."""
    rim = np.zeros(tissues.ventricles.shape, dtype=bool)
    reach = np.ceil(rim_mm / spacing_kji).astype(np.int64) + 1
    found = np.argwhere(tissues.ventricles)
    box = _box_between(found.min(axis=0) - reach, found.max(axis=0) + reach + 1, rim.shape)
    distance = ndimage.distance_transform_edt(~tissues.ventricles[box], sampling=spacing_kji)
    rim[box] = (distance <= rim_mm) & ~tissues.ventricles[box] & tissues.brain[box]
    return rim


def _box_between(
    low: npt.NDArray[np.int64], high: npt.NDArray[np.int64], shape: tuple[int, ...]
) -> tuple[slice, ...]:
    return tuple(
        slice(max(0, int(a)), min(n, int(b))) for a, b, n in zip(low, high, shape, strict=True)
    )


def _ventricle_normal(
    ctx: _Context, centre: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64] | None:
    """Unit vector (k, j, i) away from the nearest ventricle wall, from the distance gradient."""
    coarse = centre // _LOW_RES_FACTOR
    gradient = np.zeros(3)
    for axis in range(3):
        lo, hi = coarse.copy(), coarse.copy()
        lo[axis] = max(0, lo[axis] - 1)
        hi[axis] = min(ctx.ventricle_distance.shape[axis] - 1, hi[axis] + 1)
        gradient[axis] = ctx.ventricle_distance[tuple(hi)] - ctx.ventricle_distance[tuple(lo)]
    if not np.all(np.isfinite(gradient)) or np.linalg.norm(gradient) < 1e-6:
        return None
    return _unit(gradient / ctx.spacing_kji)


@dataclass
class _Placed:
    box: tuple[slice, ...]
    mask: BoolArray  # inside box
    info: SyntheticLesion


def _sample_volume_mm3(rng: np.random.Generator, model: LesionModel) -> float:
    volume = model.median_volume_mm3 * math.exp(model.volume_log_sd * rng.standard_normal())
    return float(np.clip(volume, model.min_volume_mm3, model.max_volume_mm3))


def _try_place(
    ctx: _Context,
    rng: np.random.Generator,
    model: LesionModel,
    n_voxels: int,
    periventricular: bool,
    *,
    confluent: bool = False,
) -> tuple[tuple[slice, ...], BoolArray, npt.NDArray[np.int64], npt.NDArray[np.float64]] | None:
    """One lesion of ``n_voxels`` grown from a random centre, or None where it did not fit.
    Periventricular lesions point away from the ventricular wall (Dawson's fingers);
    ``confluent`` ones (periventricular too) lie along it."""
    pool = ctx.centres_periventricular if periventricular or confluent else ctx.centres_any
    centre = pool[rng.integers(len(pool))]
    if ctx.occupied[tuple(centre)]:
        return None
    axis = _ventricle_normal(ctx, centre) if periventricular or confluent else None
    if confluent and axis is not None:
        # a random direction in the plane of the wall
        tangent = _random_unit(rng)
        tangent -= (tangent @ axis) * axis
        axis = _unit(tangent) if np.linalg.norm(tangent) > 1e-6 else None
    if axis is None:
        axis = _random_unit(rng)
    elongation = rng.uniform(
        *(model.confluent_elongation_range if confluent else model.elongation_range)
    )
    volume_mm3 = n_voxels * ctx.voxel_mm3
    short_mm = (3.0 * volume_mm3 / (4.0 * math.pi * elongation)) ** (1.0 / 3.0)
    long_mm = short_mm * elongation
    reach_mm = long_mm * (1.0 + 2.0 * model.irregularity) + 2.0
    radius = np.ceil(reach_mm / ctx.spacing_kji).astype(np.int64) + _MARGIN_VOXELS
    box = _box(centre, radius, ctx.shape)
    grid = np.stack(np.meshgrid(*(np.arange(s.start, s.stop) for s in box), indexing="ij"), axis=-1)
    offset_mm = (grid - centre) * ctx.spacing_kji
    along = offset_mm @ axis
    across = np.linalg.norm(offset_mm - along[..., None] * axis, axis=-1)
    radius_ellipsoid = np.sqrt((along / long_mm) ** 2 + (across / short_mm) ** 2)
    # plaques are solid: coarser, weaker shape noise, and the white matter's small holes
    # (k-means speckle) closed, so the flood does not leave a lace of spared voxels
    noise_sigma, irregularity = (
        (3.0, model.irregularity / 2) if confluent else (1.0, model.irregularity)
    )
    noise = ndimage.gaussian_filter(rng.standard_normal(radius_ellipsoid.shape), noise_sigma)
    noise /= max(float(noise.std()), 1e-6)
    score = (-radius_ellipsoid + irregularity * noise).astype(np.float32)
    region = ctx.periventricular_region if periventricular or confluent else ctx.wm
    allowed = region[box]
    if confluent:
        closed = ndimage.binary_closing(allowed, np.ones((3, 3, 3), bool), iterations=2)
        allowed = allowed | (closed & ctx.brain[box] & ~ctx.csf[box])
    allowed = allowed & ~ctx.occupied[box]
    # keep the margin free so soft edges and growth stay inside the box
    inner = np.zeros_like(allowed)
    inner_box = tuple(
        slice(
            _MARGIN_VOXELS if s.start > 0 else 0,
            (s.stop - s.start) - (_MARGIN_VOXELS if s.stop < n else 0),
        )
        for s, n in zip(box, ctx.shape, strict=True)
    )
    inner[inner_box] = True
    start = tuple(int(c - s.start) for c, s in zip(centre, box, strict=True))
    mask = _grow(score, allowed & inner, start, n_voxels)
    if mask is None:
        return None
    return box, mask, centre, axis


def _local_reference(ctx: _Context, name: str, box: tuple[slice, ...]) -> float:
    """Median of unpainted normal white matter around a lesion (its box widened to >= 10 mm)."""
    image = ctx.originals[name]
    centre = np.array([(s.start + s.stop) // 2 for s in box])
    half = np.maximum(
        np.ceil(10.0 / ctx.spacing_kji).astype(np.int64), [(s.stop - s.start) // 2 for s in box]
    )
    wide = _box(centre, half, ctx.shape)
    normal = ctx.wm[wide] & ~ctx.occupied[wide]
    values = image[wide][normal]
    if values.size < 20:
        values = image[ctx.wm]
    return float(np.median(values))


def _soft(mask: BoolArray, sigma_vox: npt.NDArray[np.float64]) -> FloatArray:
    blurred = ndimage.gaussian_filter(mask.astype(np.float32), sigma_vox, truncate=3.0)
    inside = 1.0 - _EDGE_SHARE + _EDGE_SHARE * blurred
    outside = np.where(blurred > 0.02, _EDGE_SHARE * blurred, 0.0)
    return np.where(mask, inside, outside).astype(np.float32)


def _render(
    ctx: _Context,
    box: tuple[slice, ...],
    mask: BoolArray,
    info: SyntheticLesion,
    model: LesionModel,
    enhancing_out: BoolArray | None,
) -> None:
    """Paint one lesion (mask inside ``box``) into the context's images, in place."""
    sigma_vox = model.edge_sigma_mm / ctx.spacing_kji
    alpha = _soft(mask, sigma_vox) * ctx.brain[box]
    texture_rng = np.random.default_rng(info.texture_seed)
    texture = (
        1.0
        + model.texture_sd
        * ndimage.gaussian_filter(texture_rng.standard_normal(mask.shape), 0.8)
        / 0.2
    )
    flair = ctx.flair[box]
    target = _local_reference(ctx, "flair", box) * (1.0 + info.flair_contrast) * texture
    ctx.flair[box] = flair + alpha * np.maximum(target - flair, 0.0)
    for name, image in (("t1", ctx.t1), ("t1_post", ctx.t1_post)):
        if image is None:
            continue
        local = image[box]
        target = _local_reference(ctx, name, box) * (1.0 - info.t1_hypointensity)
        image[box] = local - alpha * np.maximum(local - target, 0.0)
    if ctx.t1_post is None or info.enhancement is EnhancementPattern.NONE:
        return
    region = mask
    if info.enhancement is EnhancementPattern.RING:
        core = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))
        region = mask & ~core if core.any() else mask
    local = ctx.t1_post[box]
    target = _local_reference(ctx, "t1_post", box) * (1.0 + info.enhancement_strength)
    enhance = _soft(region, sigma_vox) * ctx.brain[box]
    ctx.t1_post[box] = local + enhance * np.maximum(target - local, 0.0)
    if enhancing_out is not None:
        enhancing_out[box] |= region


def _place_lesions(
    ctx: _Context,
    rng: np.random.Generator,
    model: LesionModel,
    n_lesions: int,
    first_label: int,
    enhancement_allowed: bool,
) -> list[_Placed]:
    placed: list[_Placed] = []
    for index in range(n_lesions):
        requested = _sample_volume_mm3(rng, model)
        n_voxels = max(1, round(requested / ctx.voxel_mm3))
        periventricular = bool(
            len(ctx.centres_periventricular) and rng.random() < model.periventricular_fraction
        )
        result = None
        attempt = 0
        while result is None:
            if attempt >= model.max_attempts:
                smaller = int(n_voxels * 0.7)
                if smaller * ctx.voxel_mm3 < model.min_volume_mm3:
                    raise SyntheticLesionError(
                        f"no room for lesion {index + 1} of {n_lesions} in the white matter "
                        f"after {attempt} tries; ask for fewer or smaller lesions"
                    )
                n_voxels, attempt, periventricular = smaller, 0, False
            result = _try_place(ctx, rng, model, n_voxels, periventricular)
            attempt += 1
        placed.append(
            _commit(
                ctx,
                rng,
                model,
                result,
                first_label + index,
                requested,
                periventricular,
                enhancement_allowed,
            )
        )
    return placed


def _commit(
    ctx: _Context,
    rng: np.random.Generator,
    model: LesionModel,
    result: tuple[tuple[slice, ...], BoolArray, npt.NDArray[np.int64], npt.NDArray[np.float64]],
    label: int,
    requested: float,
    periventricular: bool,
    enhancement_allowed: bool,
) -> _Placed:
    """Draw a placed lesion's appearance and close its neighbourhood to later lesions."""
    box, mask, centre, axis = result
    enhancement = EnhancementPattern.NONE
    if enhancement_allowed and rng.random() < model.enhancing_fraction:
        ring = rng.random() < model.ring_fraction
        enhancement = EnhancementPattern.RING if ring else EnhancementPattern.NODULAR
    info = SyntheticLesion(
        label=label,
        centre_ijk=(int(centre[2]), int(centre[1]), int(centre[0])),
        requested_volume_mm3=requested,
        volume_mm3=float(mask.sum()) * ctx.voxel_mm3,
        long_axis_ijk=(float(axis[2]), float(axis[1]), float(axis[0])),
        periventricular=periventricular,
        flair_contrast=float(rng.uniform(*model.flair_contrast)),
        t1_hypointensity=float(rng.uniform(*model.t1_hypointensity)),
        enhancement=enhancement,
        enhancement_strength=float(rng.uniform(*model.t1_post_enhancement)),
        texture_seed=int(rng.integers(2**31)),
    )
    neighbourhood = np.ones((3, 3, 3), dtype=bool)
    ctx.occupied[box] |= ndimage.binary_dilation(mask, structure=neighbourhood)
    return _Placed(box=box, mask=mask, info=info)


def _place_confluent(
    ctx: _Context, rng: np.random.Generator, model: LesionModel, enhancement_allowed: bool
) -> list[_Placed]:
    """The case's confluent periventricular plaques (``model.confluent_count_range``), labels
    from 1. A plaque that finds no room shrinks; one that cannot fit at a third of the range's
    low end is left out (a brain with small ventricles has room for fewer)."""
    low_count, high_count = model.confluent_count_range
    if high_count == 0 or len(ctx.centres_periventricular) == 0:
        return []
    placed: list[_Placed] = []
    low, high = (math.log(v) for v in model.confluent_volume_range_mm3)
    smallest = model.confluent_volume_range_mm3[0] / 3.0
    for _ in range(int(rng.integers(low_count, high_count + 1))):
        requested = math.exp(rng.uniform(low, high))
        n_voxels = max(1, round(requested / ctx.voxel_mm3))
        result = None
        while result is None and n_voxels * ctx.voxel_mm3 >= smallest:
            for _attempt in range(model.max_attempts):
                result = _try_place(ctx, rng, model, n_voxels, True, confluent=True)
                if result is not None:
                    break
            n_voxels = int(n_voxels * 0.7)
        if result is not None:
            placed.append(
                _commit(
                    ctx, rng, model, result, len(placed) + 1, requested, True, enhancement_allowed
                )
            )
    return placed


def _result(
    ctx: _Context,
    flair: ImageVolume,
    placed: list[_Placed],
    tissues: TissueMasks,
    t1: ImageVolume | None,
    t1_post: ImageVolume | None,
    enhancing: BoolArray | None,
) -> SyntheticLesions:
    labels = np.zeros(ctx.shape, dtype=np.int16)
    for lesion in placed:
        labels[lesion.box][lesion.mask] = lesion.info.label
    return SyntheticLesions(
        flair=flair.with_array(ctx.flair.astype(flair.array.dtype, copy=False)),
        labels=flair.with_array(labels),
        lesions=tuple(p.info for p in placed),
        tissues=tissues,
        t1=None if t1 is None or ctx.t1 is None else t1.with_array(ctx.t1.astype(t1.array.dtype)),
        t1_post=None
        if t1_post is None or ctx.t1_post is None
        else t1_post.with_array(ctx.t1_post.astype(t1_post.array.dtype)),
        enhancing=None if enhancing is None else flair.with_array(enhancing.astype(np.uint8)),
    )


def _prepare(
    flair: ImageVolume,
    brain_mask: Any,
    t1: ImageVolume | None,
    t1_post: ImageVolume | None,
    tissues: TissueMasks | None,
    avoid_mask: ImageVolume | npt.NDArray[Any] | None,
) -> tuple[TissueMasks, BoolArray | None]:
    if not np.issubdtype(flair.array.dtype, np.floating):
        raise SyntheticLesionError(
            f"FLAIR must hold floating-point intensities, got {flair.array.dtype}; cast it first"
        )
    for image, name in ((t1, "T1"), (t1_post, "T1-post")):
        if image is not None:
            _check_grid(flair, image, name)
    tissues = tissues or estimate_tissues(flair, brain_mask, t1)
    if tissues.wm.shape != flair.array.shape:
        raise SyntheticLesionError("tissue masks are not on the FLAIR grid")
    avoid = None
    if avoid_mask is not None:
        avoid = _brain_array(flair, avoid_mask)
    return tissues, avoid


# --- public entry points ----------------------------------------------------------------------


def add_synthetic_lesions(
    flair: ImageVolume,
    rng: np.random.Generator,
    n_lesions: int | None = None,
    *,
    brain_mask: ImageVolume | npt.NDArray[Any] | None = None,
    t1: ImageVolume | None = None,
    t1_post: ImageVolume | None = None,
    tissues: TissueMasks | None = None,
    avoid_mask: ImageVolume | npt.NDArray[Any] | None = None,
    model: LesionModel | None = None,
) -> SyntheticLesions:
    """Paint ``n_lesions`` (default: drawn from ``model.count_range``) into the images.

    ``avoid_mask`` marks voxels lesions must keep clear of (e.g. the real lesions of the
    image). All images must be on the FLAIR grid; the inputs are not modified.
    """
    model = (model or LesionModel()).for_case(rng)
    tissues, avoid = _prepare(flair, brain_mask, t1, t1_post, tissues, avoid_mask)
    if n_lesions is None:
        n_lesions = int(rng.integers(model.count_range[0], model.count_range[1] + 1))
    if n_lesions < 0:
        raise SyntheticLesionError(f"n_lesions must be >= 0, got {n_lesions}")
    ctx = _context(flair, tissues, model, t1, t1_post, avoid)
    placed = _place_confluent(ctx, rng, model, t1_post is not None)
    placed += _place_lesions(ctx, rng, model, n_lesions, len(placed) + 1, t1_post is not None)
    enhancing = np.zeros(ctx.shape, dtype=bool) if t1_post is not None else None
    for lesion in placed:
        _render(ctx, lesion.box, lesion.mask, lesion.info, model, enhancing)
    return _result(ctx, flair, placed, tissues, t1, t1_post, enhancing)


def _rigid_motion(
    flair: ImageVolume, rng: np.random.Generator, max_rotation_deg: float, max_translation_mm: float
) -> tuple[sitk.Euler3DTransform, tuple[float, float, float], tuple[float, float, float]]:
    a = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    t = rng.uniform(-max_translation_mm, max_translation_mm, 3)
    angles = (float(a[0]), float(a[1]), float(a[2]))
    shift = (float(t[0]), float(t[1]), float(t[2]))
    centre_ijk = (np.asarray(flair.shape_ijk, dtype=np.float64) - 1.0) / 2.0
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(float(c) for c in flair.index_to_lps(centre_ijk)))
    transform.SetRotation(*(math.radians(a) for a in angles))
    transform.SetTranslation(shift)
    return transform, angles, shift


def _resample(volume: ImageVolume, transform: sitk.Transform, nearest: bool) -> ImageVolume:
    image = volume.to_sitk()
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    moved = sitk.Resample(image, image, transform, interpolator, 0.0, image.GetPixelID())
    return ImageVolume.from_sitk(moved)


def _bias_field(
    shape: tuple[int, int, int], rng: np.random.Generator, amplitude: float
) -> FloatArray:
    """A smooth multiplicative field exp(sum of low-order terms), within about ±amplitude."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    k, j, i = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [k, j, i, k * j, j * i, k * i, k * k - 0.33, j * j - 0.33, i * i - 0.33]
    weights = rng.uniform(-1.0, 1.0, len(terms)).astype(np.float32)
    field_ = sum(w * t for w, t in zip(weights, terms, strict=True))
    field_ = field_ * (amplitude / max(float(np.abs(field_).max()), 1e-6))
    return np.exp(field_).astype(np.float32)


def make_new_lesion_pair(
    flair: ImageVolume,
    rng: np.random.Generator,
    n_new: int,
    *,
    n_shared: int | None = None,
    brain_mask: ImageVolume | npt.NDArray[Any] | None = None,
    t1: ImageVolume | None = None,
    t1_post: ImageVolume | None = None,
    tissues: TissueMasks | None = None,
    avoid_mask: ImageVolume | npt.NDArray[Any] | None = None,
    model: LesionModel | None = None,
    grow_fraction: float = 0.0,
    grow_voxels: int = 1,
    max_rotation_deg: float = 2.0,
    max_translation_mm: float = 2.0,
    intensity_scale_range: tuple[float, float] = (0.9, 1.1),
    bias_amplitude: float = 0.05,
) -> NewLesionPair:
    """A prior/current pair from one real brain: the current study has ``n_new`` more lesions.

    Both studies share ``n_shared`` synthetic lesions (default: drawn from the model); a
    ``grow_fraction`` of them grows by ``grow_voxels`` in the current study (within white
    matter). The prior is then moved by a random rigid transform (up to the given rotation
    and translation, about the image centre), scaled in intensity and multiplied by a smooth
    bias field. Ground truth (``new_lesions``, ``enlarged``) is on the current (input) grid;
    ``change.current_to_prior_lps`` maps a current point to the same anatomy in the prior.
    """
    model = (model or LesionModel()).for_case(rng)
    tissues, avoid = _prepare(flair, brain_mask, t1, t1_post, tissues, avoid_mask)
    if n_shared is None:
        n_shared = int(rng.integers(model.count_range[0], model.count_range[1] + 1))
    if not 0 <= grow_voxels <= _MARGIN_VOXELS - 2:
        raise SyntheticLesionError(
            f"grow_voxels must be 0..{_MARGIN_VOXELS - 2}, got {grow_voxels}"
        )
    if n_new < 0 or n_shared < 0:
        raise SyntheticLesionError(f"lesion counts must be >= 0, got {n_new=} {n_shared=}")
    ctx = _context(flair, tissues, model, t1, t1_post, avoid)
    shared = _place_lesions(ctx, rng, model, n_shared, 1, t1_post is not None)
    # growth, decided before new lesions are placed so they keep clear of the grown shapes
    neighbourhood = np.ones((3, 3, 3), dtype=bool)
    face = ndimage.generate_binary_structure(3, 1)
    grown: list[_Placed] = []
    for lesion in shared:
        mask = lesion.mask
        if rng.random() < grow_fraction:
            others = ctx.occupied[lesion.box] & ~ndimage.binary_dilation(mask, neighbourhood)
            room = ctx.wm[lesion.box] & ~ndimage.binary_dilation(others, neighbourhood)
            mask = ndimage.binary_dilation(mask, face, iterations=grow_voxels, mask=room) | mask
            ctx.occupied[lesion.box] |= ndimage.binary_dilation(mask, neighbourhood)
        info = replace(lesion.info, volume_mm3=float(mask.sum()) * ctx.voxel_mm3)
        grown.append(_Placed(box=lesion.box, mask=mask, info=info))
    new = _place_lesions(ctx, rng, model, n_new, n_shared + 1, t1_post is not None)
    has_post = t1_post is not None

    def paint(lesions: list[_Placed]) -> SyntheticLesions:
        ctx.reset_images()
        enhancing = np.zeros(ctx.shape, dtype=bool) if has_post else None
        for lesion in lesions:
            _render(ctx, lesion.box, lesion.mask, lesion.info, model, enhancing)
        return _result(ctx, flair, lesions, tissues, t1, t1_post, enhancing)

    prior_clean = paint(shared)
    current = paint(grown + new)
    new_mask = np.zeros(ctx.shape, dtype=np.uint8)
    for lesion in new:
        new_mask[lesion.box][lesion.mask] = 1
    enlarged = (current.labels.array > 0) & (prior_clean.labels.array == 0) & (new_mask == 0)

    transform, angles, shift = _rigid_motion(flair, rng, max_rotation_deg, max_translation_mm)
    scale = float(rng.uniform(*intensity_scale_range))
    bias = _bias_field(ctx.shape, rng, bias_amplitude) * scale

    def move(volume: ImageVolume) -> ImageVolume:
        moved = _resample(volume, transform, nearest=False)
        return moved.with_array((moved.array * bias).astype(volume.array.dtype))

    def move_mask(volume: ImageVolume) -> ImageVolume:
        return _resample(volume, transform, nearest=True)

    prior = SyntheticLesions(
        flair=move(prior_clean.flair),
        labels=move_mask(prior_clean.labels),
        lesions=prior_clean.lesions,
        tissues=tissues,
        t1=None if prior_clean.t1 is None else move(prior_clean.t1),
        t1_post=None if prior_clean.t1_post is None else move(prior_clean.t1_post),
        enhancing=None if prior_clean.enhancing is None else move_mask(prior_clean.enhancing),
    )
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(transform.GetMatrix()).reshape(3, 3)
    matrix[:3, 3] = transform.GetTranslation()
    centre = np.asarray(transform.GetCenter())
    matrix[:3, 3] += centre - matrix[:3, :3] @ centre
    # sitk.Resample pulls the prior's old voxel at T(x) into x: the moved prior at T^-1(p)
    # shows the anatomy found at p in the current study.
    change = TimePointChange(
        current_to_prior_lps=np.asarray(np.linalg.inv(matrix), dtype=np.float64),
        rotation_deg=angles,
        translation_mm=shift,
        intensity_scale=scale,
        bias_amplitude=bias_amplitude,
    )
    return NewLesionPair(
        prior=prior,
        current=current,
        new_lesions=flair.with_array(new_mask),
        enlarged=flair.with_array(enlarged.astype(np.uint8)),
        change=change,
    )
