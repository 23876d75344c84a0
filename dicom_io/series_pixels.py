"""How a volume's voxels are stored in 16-bit DICOM pixels, and how exact that is.

Rule (reading applies ``value = stored * RescaleSlope + RescaleIntercept``):

- integer-valued voxels in [-32768, 32767] of a signed integer type, or with negative values:
  signed 16-bit, slope 1, intercept 0 (exact; int8/int16 volumes read back as int16);
- other integer-valued voxels in [0, 65535]: unsigned 16-bit, slope 1, intercept 0 (exact;
  uint8/uint16 and integer-valued float volumes read back as uint16);
- integer-valued voxels spanning at most 65535: signed 16-bit, slope 1, integer intercept
  (exact);
- anything else (fractional values, wider ranges): signed 16-bit over [-32767, 32767] with
  slope ``(max - min) / 65000`` and intercept at the mid-range, both rounded to what a
  16-character DS can hold *before* quantising, so the error per voxel is at most half a
  slope step (about 7.7e-6 of the value range) plus float32 rounding on reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.valuerep import format_number_as_ds

__all__ = ["StoredPixels", "ds_text", "quantise"]

_FLOAT_STEPS = 65000.0  # < 65534 steps, leaves headroom for the DS-rounded slope


def ds_text(value: float) -> str:
    """`value` as the at-most-16-character decimal string a DS element holds."""
    return format_number_as_ds(float(value))


@dataclass(frozen=True)
class StoredPixels:
    array: npt.NDArray[np.uint16] | npt.NDArray[np.int16]
    pixel_representation: int  # 0 unsigned, 1 signed (two's complement)
    slope: str  # DS text
    intercept: str  # DS text

    @property
    def exact(self) -> bool:
        return float(self.slope) == 1.0 and float(self.intercept).is_integer()

    @property
    def max_error(self) -> float:
        """The largest difference a reader sees between written and read voxels."""
        return 0.0 if self.exact else float(self.slope) / 2


def quantise(array: npt.NDArray[Any]) -> StoredPixels:
    """Choose 16-bit storage and rescale for `array` following the module rule."""
    values = np.asarray(array)
    if values.dtype == np.bool_:
        values = values.astype(np.uint8)
    if not np.all(np.isfinite(values)):
        raise ValueError("the volume holds NaN or infinite voxels; DICOM cannot store them")
    lo, hi = float(values.min()), float(values.max())
    integer_valued = np.issubdtype(values.dtype, np.integer) or bool(
        np.all(values == np.round(values))
    )
    signed_input = np.issubdtype(values.dtype, np.signedinteger)
    fits_int16 = lo >= -32768 and hi <= 32767
    if integer_valued and fits_int16 and (signed_input or lo < 0):
        return StoredPixels(values.astype(np.int16), 1, "1", "0")
    if integer_valued and lo >= 0 and hi <= 65535:
        return StoredPixels(values.astype(np.uint16), 0, "1", "0")
    if integer_valued and hi - lo <= 65535:
        offset = int(lo) + 32768
        stored = (values.astype(np.int64) - offset).astype(np.int16)
        return StoredPixels(stored, 1, "1", str(offset))

    slope_text = ds_text((hi - lo) / _FLOAT_STEPS if hi > lo else 1.0)
    intercept_text = ds_text((hi + lo) / 2)
    slope, intercept = float(slope_text), float(intercept_text)
    scaled = np.round((values.astype(np.float64) - intercept) / slope)
    if scaled.min() < -32768 or scaled.max() > 32767:  # cannot happen with the headroom above
        raise AssertionError("quantisation headroom exceeded")
    return StoredPixels(scaled.astype(np.int16), 1, slope_text, intercept_text)
