"""Exact volume geometry from per-slice DICOM plane attributes.

The slice axis and spacing come from the projections of ImagePositionPatient onto the slice
normal (never from SliceThickness, which is the excitation thickness and may differ from
the spacing). Slices are sorted by that projection; the stack then runs in the direction
the slice numbers (InstanceNumber, or frame order in a multi-frame object) run, so a
series keeps the order it was written in. Every irregularity is refused with the slice
that shows it, because a silently wrong grid puts lesions in the wrong place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from lesionwatch.dicom_io.series_errors import SeriesGeometryError

__all__ = ["SlicePlane", "StackGeometry", "stack_geometry"]

ORIENTATION_TOLERANCE = 1e-4  # direction-cosine difference still called "the same orientation"
PIXEL_SPACING_TOLERANCE_MM = 1e-4
MISSING_SLICE_FACTOR = 1.5  # a gap above 1.5x the median spacing means slices are missing


@dataclass(frozen=True)
class SlicePlane:
    """Geometry of one 2-D slice (a classic instance or one frame of a multi-frame object)."""

    label: str  # names the slice in error messages
    order_number: int | None  # InstanceNumber or frame number: gives the stack direction
    position_mm: npt.NDArray[np.float64]  # ImagePositionPatient (LPS)
    orientation: npt.NDArray[np.float64]  # ImageOrientationPatient, 6 direction cosines
    pixel_spacing_mm: tuple[float, float]  # (between rows, between columns)
    rows: int
    columns: int
    nominal_spacing_mm: float | None = None  # SpacingBetweenSlices/SliceThickness, 1-slice only


@dataclass(frozen=True)
class StackGeometry:
    """The regular grid the slices form, with the slices in stack order (k = 0, 1, ...)."""

    order: tuple[int, ...]  # indices into the input planes, in k order
    spacing_mm: tuple[float, float, float]  # (i, j, k)
    origin_mm: tuple[float, float, float]
    direction: npt.NDArray[np.float64]  # columns: i, j, k unit vectors in LPS
    shape_ijk: tuple[int, int, int]


def _unit_axes(plane: SlicePlane) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    row = np.asarray(plane.orientation[:3], dtype=np.float64)
    col = np.asarray(plane.orientation[3:], dtype=np.float64)
    norms = (np.linalg.norm(row), np.linalg.norm(col))
    if abs(norms[0] - 1) > 1e-3 or abs(norms[1] - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise SeriesGeometryError(
            f"{plane.label}: ImageOrientationPatient {list(plane.orientation)} is not two "
            f"orthogonal unit vectors (lengths {norms[0]:.5f}, {norms[1]:.5f}, dot {row @ col:.5f})"
        )
    row = row / norms[0]
    col = col - (col @ row) * row  # remove rounding-level skew so the direction is orthonormal
    return row, col / np.linalg.norm(col)


def _check_same_frame(planes: Sequence[SlicePlane]) -> None:
    ref = planes[0]
    for plane in planes[1:]:
        if (plane.rows, plane.columns) != (ref.rows, ref.columns):
            raise SeriesGeometryError(
                f"{plane.label} has {plane.rows} rows x {plane.columns} columns but "
                f"{ref.label} has {ref.rows} x {ref.columns}: slices of one volume must match"
            )
        if np.max(np.abs(np.subtract(plane.orientation, ref.orientation))) > ORIENTATION_TOLERANCE:
            raise SeriesGeometryError(
                f"{plane.label} has ImageOrientationPatient {list(np.round(plane.orientation, 6))} "
                f"but {ref.label} has {list(np.round(ref.orientation, 6))}: inconsistent "
                "orientation (a localizer or a second stack mixed into the series?)"
            )
        if np.max(np.abs(np.subtract(plane.pixel_spacing_mm, ref.pixel_spacing_mm))) > (
            PIXEL_SPACING_TOLERANCE_MM
        ):
            raise SeriesGeometryError(
                f"{plane.label} has PixelSpacing {list(plane.pixel_spacing_mm)} mm but "
                f"{ref.label} has {list(ref.pixel_spacing_mm)} mm"
            )


def _runs_backwards(planes: Sequence[SlicePlane], order: list[int]) -> bool:
    numbers = [planes[i].order_number for i in order]
    if any(n is None for n in numbers) or len(set(numbers)) != len(numbers):
        return False
    return all(a > b for a, b in zip(numbers, numbers[1:], strict=False))  # type: ignore[operator]


def stack_geometry(
    planes: Sequence[SlicePlane], *, spacing_tolerance: float = 0.01
) -> StackGeometry:
    """Sort and validate `planes`; raise SeriesGeometryError naming the first bad slice.

    `spacing_tolerance` is the allowed relative deviation of any slice from the regular grid
    (0.01 = 1 % of the slice spacing, at least 1 micrometre).
    """
    if not planes:
        raise SeriesGeometryError("no slices to build a volume from")
    _check_same_frame(planes)
    row, col = _unit_axes(planes[0])
    normal = np.cross(row, col)
    positions = np.array([p.position_mm for p in planes], dtype=np.float64)
    along = positions @ normal
    order = sorted(range(len(planes)), key=lambda i: (along[i], planes[i].order_number or 0))

    if len(planes) == 1:
        nominal = planes[0].nominal_spacing_mm
        if nominal is None or nominal <= 0:
            raise SeriesGeometryError(
                f"{planes[0].label} is a single slice without SpacingBetweenSlices or "
                "SliceThickness: its thickness is unknown"
            )
        slice_spacing = float(nominal)
    else:
        diffs = np.diff(along[order])
        positive = diffs[diffs > 0]
        median = float(np.median(positive)) if positive.size else 0.0
        tolerance = max(1e-3, spacing_tolerance * median)
        for step, diff in enumerate(diffs):  # duplicates first: they also distort the median
            if diff <= tolerance:
                a, b = planes[order[step]], planes[order[step + 1]]
                raise SeriesGeometryError(
                    f"{b.label} duplicates the position of {a.label} ({along[order[step]]:.4f} mm "
                    f"along the slice normal, {diff:.4f} mm apart): duplicated slice, or several "
                    "echoes/time points/stacks in one series"
                )
        for step, diff in enumerate(diffs):
            a, b = planes[order[step]], planes[order[step + 1]]
            if diff > MISSING_SLICE_FACTOR * median:
                missing = round(diff / median) - 1
                raise SeriesGeometryError(
                    f"missing slice(s): gap of {diff:.3f} mm between {a.label} and {b.label} is "
                    f"{diff / median:.2f}x the median spacing {median:.3f} mm (about {missing} "
                    "slice(s) missing)"
                )
            if abs(diff - median) > tolerance:
                raise SeriesGeometryError(
                    f"varying slice spacing: {diff:.4f} mm between {a.label} and {b.label}, "
                    f"median is {median:.4f} mm (tolerance {tolerance:.4f} mm)"
                )
        slice_spacing = float((along[order[-1]] - along[order[0]]) / (len(planes) - 1))
        expected = positions[order[0]] + np.outer(np.arange(len(planes)) * slice_spacing, normal)
        offsets = np.linalg.norm(positions[order] - expected, axis=1)
        worst = int(np.argmax(offsets))
        if offsets[worst] > tolerance:
            raise SeriesGeometryError(
                f"{planes[order[worst]].label} lies {offsets[worst]:.4f} mm off the regular slice "
                f"grid (tolerance {tolerance:.4f} mm): sheared stack (gantry tilt) or irregular "
                "positions are not supported"
            )

    slice_axis = normal
    if _runs_backwards(planes, order):
        order.reverse()
        slice_axis = -normal
    ref = planes[order[0]]
    return StackGeometry(
        order=tuple(order),
        spacing_mm=(ref.pixel_spacing_mm[1], ref.pixel_spacing_mm[0], slice_spacing),
        origin_mm=tuple(float(v) for v in ref.position_mm),  # type: ignore[arg-type]
        direction=np.column_stack([row, col, slice_axis]),
        shape_ijk=(ref.columns, ref.rows, len(planes)),
    )
