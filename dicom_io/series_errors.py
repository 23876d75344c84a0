"""Errors raised while turning DICOM instances into an image volume.

Every message names the offending slice (instance number, SOP Instance UID, file) and says
what is wrong with it, so an admin can find the file without a debugger.
"""

from __future__ import annotations

__all__ = ["DicomSeriesError", "SeriesGeometryError", "SeriesSelectionError"]


class DicomSeriesError(Exception):
    """A set of DICOM instances cannot be read as one image volume."""


class SeriesGeometryError(DicomSeriesError):
    """The slices do not form one regular 3-D grid (gap, duplicate, tilt, mixed sizes...)."""


class SeriesSelectionError(DicomSeriesError):
    """The input holds no image series, several series without a choice, or not the chosen one."""
