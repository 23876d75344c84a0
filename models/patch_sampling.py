"""Training patches: half centred near a lesion, half centred on lesion-free brain (the seeds).

A positive patch is centred on a random lesion voxel shifted by up to ``jitter_fraction`` of
the patch size per axis (so lesions are not always in the middle, yet always inside). Drawn
voxel by voxel, a 10 mL plaque gets a thousand times the patches of a 10 mm3 lesion; with
``lesion_balance`` that share of positive patches first draws a lesion (26-connected
component) uniformly, then a voxel of it, so small lesions are seen as often as large ones. A
negative patch is centred on a random brain voxel outside lesions; up to ``negative_tries``
draws look for a patch with no lesion voxel at all (lesion-heavy brains may have none, then
the last draw is kept and `Patch.has_lesion` says so). Patches lie inside the volume
whenever the volume is at least one patch large on that axis; along a smaller axis the patch
starts at 0 and the extraction pads (see `models.augmentation.extract_patch`).

All randomness comes from the ``numpy.random.Generator`` passed in, so a training step's
patches are fixed by its seed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from lesionwatch.models.datasets import TrainingCase

__all__ = ["Patch", "PatchSampler", "PatchSamplingError", "subject_balanced_weights"]

Shape3 = tuple[int, int, int]


class PatchSamplingError(ValueError):
    """A case cannot give the requested patch (no brain voxels, bad size)."""


@dataclass(frozen=True)
class Patch:
    """Where one patch lies in its case (voxels, array order k, j, i)."""

    case_index: int
    start_kji: Shape3
    size_kji: Shape3
    lesion_requested: bool  # drawn as a positive and the case had lesions
    has_lesion: bool  # the (unaugmented) patch holds at least one lesion voxel

    @property
    def centre_kji(self) -> Shape3:
        s, n = self.start_kji, self.size_kji
        return (s[0] + n[0] // 2, s[1] + n[1] // 2, s[2] + n[2] // 2)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        s, n = self.start_kji, self.size_kji
        return (slice(s[0], s[0] + n[0]), slice(s[1], s[1] + n[1]), slice(s[2], s[2] + n[2]))


@dataclass
class _Index:
    shape: Shape3
    lesion: npt.NDArray[np.int64]  # flat indices of lesion voxels
    background: npt.NDArray[np.int64]  # flat indices of brain voxels outside lesions
    # lesion voxels grouped by lesion and where each lesion's run starts (lesion_balance only)
    by_lesion: npt.NDArray[np.int64] | None = None
    lesion_starts: npt.NDArray[np.int64] | None = None


def subject_balanced_weights(subjects: Sequence[str]) -> npt.NDArray[np.float64]:
    """Case weights (summing to 1) that give every subject the same share, however many
    visits it has: one person's three visits must not outweigh two other people."""
    if not subjects:
        raise PatchSamplingError("no subjects to weight")
    visits = Counter(subjects)
    return np.array([1.0 / (visits[s] * len(visits)) for s in subjects])


class PatchSampler:
    """Draws patch positions from `TrainingCase` s; caches voxel indices per case id."""

    def __init__(
        self,
        size_kji: Shape3 | int,
        *,
        lesion_fraction: float = 0.5,
        jitter_fraction: float = 0.25,
        negative_tries: int = 10,
        cache_size: int = 32,
        lesion_balance: float = 0.0,
    ) -> None:
        size = (size_kji,) * 3 if isinstance(size_kji, int) else tuple(int(s) for s in size_kji)
        if len(size) != 3 or min(size) < 1:
            raise PatchSamplingError(f"patch size must be 1 or 3 positive ints, got {size_kji}")
        if not 0.0 <= lesion_fraction <= 1.0:
            raise PatchSamplingError(f"lesion_fraction must be in [0, 1], got {lesion_fraction}")
        if not 0.0 <= jitter_fraction < 0.5:
            raise PatchSamplingError(f"jitter_fraction must be in [0, 0.5), got {jitter_fraction}")
        if not 0.0 <= lesion_balance <= 1.0:
            raise PatchSamplingError(f"lesion_balance must be in [0, 1], got {lesion_balance}")
        self.size_kji: Shape3 = (size[0], size[1], size[2])
        self.lesion_balance = lesion_balance
        self.lesion_fraction = lesion_fraction
        self.jitter_fraction = jitter_fraction
        self.negative_tries = max(1, negative_tries)
        self._cache_size = cache_size
        self._indices: dict[str, _Index] = {}

    def _index(self, case: TrainingCase) -> _Index:
        index = self._indices.get(case.case_id)
        if index is None or index.shape != case.label.shape:
            lesion = case.label > 0
            background = case.brain & ~lesion
            if not case.brain.any():
                raise PatchSamplingError(f"case {case.case_id} has an empty brain mask")
            if not background.any():  # a brain that is all lesion: centre anywhere in it
                background = case.brain
            index = _Index(
                shape=case.label.shape,  # type: ignore[arg-type]
                lesion=np.flatnonzero(lesion),
                background=np.flatnonzero(background),
            )
            if self.lesion_balance > 0 and index.lesion.size:
                labels, _ = ndimage.label(lesion, structure=np.ones((3, 3, 3), dtype=bool))
                order = np.argsort(labels.ravel()[index.lesion], kind="stable")
                grouped = labels.ravel()[index.lesion][order]
                index.by_lesion = index.lesion[order]
                index.lesion_starts = np.flatnonzero(np.diff(grouped, prepend=0))
            if len(self._indices) >= self._cache_size:
                self._indices.pop(next(iter(self._indices)))
            self._indices[case.case_id] = index
        return index

    def _start(self, centre: npt.NDArray[np.int64], shape: Shape3) -> Shape3:
        size = np.asarray(self.size_kji)
        start = np.clip(centre - size // 2, 0, np.maximum(np.asarray(shape) - size, 0))
        return (int(start[0]), int(start[1]), int(start[2]))

    def _lesion_voxel(self, index: _Index, rng: np.random.Generator) -> int:
        """A lesion voxel: per lesion (uniform over lesions) for a ``lesion_balance`` share,
        otherwise uniform over voxels. No extra draw when the balance is off, so runs
        without it keep their random stream."""
        if (
            self.lesion_balance > 0
            and index.by_lesion is not None
            and index.lesion_starts is not None
            and rng.random() < self.lesion_balance
        ):
            starts = index.lesion_starts
            which = int(rng.integers(len(starts)))
            stop = int(starts[which + 1]) if which + 1 < len(starts) else len(index.by_lesion)
            return int(index.by_lesion[rng.integers(int(starts[which]), stop)])
        return int(rng.choice(index.lesion))

    def sample(
        self,
        case: TrainingCase,
        rng: np.random.Generator,
        *,
        want_lesion: bool,
        case_index: int = 0,
    ) -> Patch:
        """One patch of ``case``: near a lesion when ``want_lesion`` and the case has any."""
        index = self._index(case)
        size = np.asarray(self.size_kji)
        if want_lesion and index.lesion.size:
            flat = self._lesion_voxel(index, rng)
            voxel = np.asarray(np.unravel_index(flat, index.shape))
            reach = np.floor(size * self.jitter_fraction).astype(np.int64)
            jitter = rng.integers(-reach, reach + 1)
            start = self._start(voxel + jitter, index.shape)
            return Patch(case_index, start, self.size_kji, True, True)
        start = self._start(np.zeros(3, dtype=np.int64), index.shape)
        has_lesion = True
        for _ in range(self.negative_tries):
            voxel = np.asarray(np.unravel_index(rng.choice(index.background), index.shape))
            start = self._start(voxel, index.shape)
            box = tuple(slice(a, a + n) for a, n in zip(start, self.size_kji, strict=True))
            has_lesion = bool(case.label[box].any())
            if not has_lesion:
                break
        return Patch(case_index, start, self.size_kji, False, has_lesion)

    def sample_batch(
        self,
        cases: list[tuple[int, TrainingCase]],
        batch_size: int,
        rng: np.random.Generator,
        weights: Sequence[float] | None = None,
    ) -> list[Patch]:
        """``batch_size`` patches from cases drawn from ``cases`` ((index, case) pairs),
        uniformly or in proportion to ``weights``; each patch is a positive with probability
        ``lesion_fraction``."""
        if not cases:
            raise PatchSamplingError("no cases to sample patches from")
        p = None
        if weights is not None:
            p = np.asarray(weights, dtype=np.float64)
            if p.shape != (len(cases),) or (p < 0).any() or p.sum() <= 0:
                raise PatchSamplingError("need one non-negative weight per case, not all zero")
            p = p / p.sum()
        patches = []
        for _ in range(batch_size):
            pick = int(rng.integers(len(cases))) if p is None else int(rng.choice(len(cases), p=p))
            case_index, case = cases[pick]
            want = bool(rng.random() < self.lesion_fraction)
            patches.append(self.sample(case, rng, want_lesion=want, case_index=case_index))
        return patches
