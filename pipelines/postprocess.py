"""From a probability map to lesions: threshold, 26-connected components, size filter, table.

A lesion is a 26-connected component (faces, edges and corners touch) of the thresholded map,
as the reference masks of the open_ms_data set are counted. Components smaller than
`min_volume_mm3` are dropped (noise, not lesions); the size is given in mm3 so the rule means
the same at every voxel spacing. Each remaining lesion gets a row: id, voxel count, volume
(mL), centroid in patient coordinates (LPS mm), bounding box (voxel indices) and longest
diameter (mm, the largest distance between two voxel centres of the lesion, measured in
patient space so anisotropic and oblique grids are handled).
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from lesionwatch.dicom_io.image_volume import ImageVolume

__all__ = [
    "CONNECTIVITY_26",
    "Lesion",
    "label_components",
    "label_lesions",
    "lesion_table",
    "longest_diameter_mm",
    "select_lesions",
    "write_lesion_table_csv",
]

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
_HULL_MIN_POINTS = 64  # below this, all pairwise distances are cheaper than a hull


@dataclass(frozen=True)
class Lesion:
    """One row of the lesion table. Index tuples are (i, j, k); the bounding box is inclusive."""

    lesion_id: int
    voxel_count: int
    volume_ml: float
    centroid_lps_mm: tuple[float, float, float]
    bbox_min_ijk: tuple[int, int, int]
    bbox_max_ijk: tuple[int, int, int]
    longest_diameter_mm: float


def label_components(
    mask: npt.NDArray[np.bool_], voxel_volume_mm3: float, min_volume_mm3: float
) -> tuple[npt.NDArray[np.int32], int]:
    """26-connected components of `mask` of at least `min_volume_mm3`, labelled 1..n."""
    labels, count = ndimage.label(mask, structure=CONNECTIVITY_26, output=np.int32)
    if count == 0:
        return labels, 0
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes * voxel_volume_mm3 >= min_volume_mm3
    keep[0] = False
    relabel = np.zeros(count + 1, dtype=np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return relabel[labels], int(keep.sum())


def longest_diameter_mm(points_mm: npt.NDArray[np.float64]) -> float:
    """Largest distance between any two of the (n, 3) points.

    The farthest pair always lies on the convex hull, so only hull vertices are compared.
    """
    if len(points_mm) < 2:
        return 0.0
    if len(points_mm) > _HULL_MIN_POINTS:
        # flat (coplanar/collinear) lesions have no 3-D hull: then all points are compared
        with contextlib.suppress(QhullError):
            points_mm = points_mm[ConvexHull(points_mm).vertices]
    return float(pdist(points_mm).max())


def _surface_ijk(component: npt.NDArray[np.bool_]) -> npt.NDArray[np.intp]:
    """(n, 3) (i, j, k) indices of the component voxels that touch the outside."""
    interior = ndimage.binary_erosion(component, structure=CONNECTIVITY_26, border_value=0)
    kji = np.argwhere(component & ~interior)
    return kji[:, ::-1]


def _table(labels: npt.NDArray[np.int32], count: int, grid: ImageVolume) -> list[Lesion]:
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    voxel_counts = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    centroids_kji = np.asarray(ndimage.center_of_mass(labels > 0, labels, index), dtype=np.float64)
    centroids_lps = grid.index_to_lps(centroids_kji.reshape(-1, 3)[:, ::-1])
    lesions = []
    for lesion_id, box in enumerate(ndimage.find_objects(labels, max_label=count), start=1):
        assert box is not None  # labels are consecutive, so every id has voxels
        offset_ijk = np.array([box[2].start, box[1].start, box[0].start])
        surface = _surface_ijk(labels[box] == lesion_id) + offset_ijk
        n_voxels = int(voxel_counts[lesion_id - 1])
        lesions.append(
            Lesion(
                lesion_id=lesion_id,
                voxel_count=n_voxels,
                volume_ml=n_voxels * grid.voxel_volume_mm3 / 1000.0,
                centroid_lps_mm=tuple(float(v) for v in centroids_lps[lesion_id - 1]),  # type: ignore[arg-type]
                bbox_min_ijk=(box[2].start, box[1].start, box[0].start),
                bbox_max_ijk=(box[2].stop - 1, box[1].stop - 1, box[0].stop - 1),
                longest_diameter_mm=longest_diameter_mm(grid.index_to_lps(surface)),
            )
        )
    return lesions


def lesion_table(mask: ImageVolume, *, min_volume_mm3: float = 0.0) -> list[Lesion]:
    """The lesions of a binary (or label) mask: every non-zero voxel counts as lesion."""
    labels, count = label_components(mask.array != 0, mask.voxel_volume_mm3, min_volume_mm3)
    return _table(labels, count, mask)


def label_lesions(
    probability: ImageVolume, threshold: float = 0.5, min_volume_mm3: float = 0.0
) -> tuple[ImageVolume, list[Lesion]]:
    """Threshold a lesion probability map (voxels > threshold) into labelled lesions.

    Returns the label volume (int32, 0 = background, lesion ids 1..n matching the table) on the
    probability map's grid, and the table.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    labels, count = label_components(
        probability.array > threshold, probability.voxel_volume_mm3, min_volume_mm3
    )
    return probability.with_array(labels), _table(labels, count, probability)


def select_lesions(
    labels: ImageVolume, keep_ids: Iterable[int]
) -> tuple[ImageVolume, list[Lesion]]:
    """Only the lesions `keep_ids` of a label volume, numbered 1..n again, with their table."""
    keep = np.zeros(int(labels.array.max(initial=0)) + 1, dtype=np.int32)
    wanted = sorted({int(i) for i in keep_ids if 0 < int(i) < len(keep)})
    keep[wanted] = np.arange(1, len(wanted) + 1, dtype=np.int32)
    relabelled = keep[np.asarray(labels.array, dtype=np.int64)]
    return labels.with_array(relabelled), _table(relabelled, len(wanted), labels)


def write_lesion_table_csv(lesions: list[Lesion], path: str | Path) -> None:
    """One row per lesion; tuples are spread into columns (centroid_l_mm, bbox_min_i, ...)."""
    columns = [
        "lesion_id", "voxel_count", "volume_ml",
        "centroid_l_mm", "centroid_p_mm", "centroid_s_mm",
        "bbox_min_i", "bbox_min_j", "bbox_min_k", "bbox_max_i", "bbox_max_j", "bbox_max_k",
        "longest_diameter_mm",
    ]  # fmt: skip
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for lesion in lesions:
            row = asdict(lesion)
            writer.writerow(
                [row["lesion_id"], row["voxel_count"], f"{row['volume_ml']:.6f}"]
                + [f"{v:.3f}" for v in row["centroid_lps_mm"]]
                + list(row["bbox_min_ijk"])
                + list(row["bbox_max_ijk"])
                + [f"{row['longest_diameter_mm']:.3f}"]
            )
