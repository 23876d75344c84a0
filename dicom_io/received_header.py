"""Read and check a received data set from its spool file, never holding its values in memory.

What is refused here can never become a usable instance, and is answered "cannot understand"
(0xC000) so senders do not retry it: a data set that is truncated, encoded otherwise than its
presentation context says (explicit VR bytes on an implicit VR context and the reverse), with
an undefined length on an element that is neither a sequence nor encapsulated pixel data, or an
image whose pixel data cannot hold Rows x Columns x Samples x Bits x Frames. Everything that
passes is a file dcmtk and pydicom can read. A deflated data set is inflated to a second
file, chunk by chunk, and refused once it grows past the size limit (a decompression bomb costs
at most the limit on disk, and one chunk of memory).

Values larger than :data:`DEFER_BYTES` (pixel data) stay on disk: the returned data set holds
their length and offset only.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag, SequenceDelimiterTag
from pydicom.uid import UID
from pydicom.valuerep import VR

__all__ = [
    "DEFER_BYTES",
    "DataSetTooLargeError",
    "UnreadableDataSetError",
    "read_received_header",
]

DEFER_BYTES = 64 * 1024
_CHUNK_BYTES = 1 << 20
_UNDEFINED_LENGTH = 0xFFFF_FFFF
_PIXEL_DATA_TAGS = {
    BaseTag(0x7FE00010): "PixelData",
    BaseTag(0x7FE00008): "FloatPixelData",
    BaseTag(0x7FE00009): "DoubleFloatPixelData",
}
_INFLATED_SUFFIX = ".inflated"
_KNOWN_VRS = frozenset(str(vr) for vr in VR)


class UnreadableDataSetError(Exception):
    """The data set can never be a usable instance (answered 0xC000, cannot understand)."""


class DataSetTooLargeError(Exception):
    """Larger than the configured maximum once inflated."""


def read_received_header(
    path: Path, data_offset: int, transfer_syntax: UID, max_bytes: int
) -> Dataset:
    """The data set at ``path[data_offset:]``, checked; large values are not read."""
    if transfer_syntax.is_deflated:
        inflated = path.with_name(path.name + _INFLATED_SUFFIX)
        try:
            _inflate(path, data_offset, inflated, max_bytes)
            return _read(inflated, 0, implicit=False, little_endian=True, encapsulated=False)
        finally:
            inflated.unlink(missing_ok=True)
    return _read(
        path,
        data_offset,
        implicit=transfer_syntax.is_implicit_VR,
        little_endian=transfer_syntax.is_little_endian,
        encapsulated=transfer_syntax.is_encapsulated,
    )


def _inflate(source: Path, offset: int, target: Path, max_bytes: int) -> None:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate (PS3.5 A.5)
    written = 0
    with source.open("rb") as reader, target.open("wb") as writer:
        reader.seek(offset)
        pending = b""
        while True:
            if not pending:
                compressed = reader.read(_CHUNK_BYTES)
                if not compressed:
                    break
                pending = compressed
            try:
                chunk = inflater.decompress(pending, _CHUNK_BYTES)  # bounded output per call
            except zlib.error as exc:
                raise UnreadableDataSetError(f"deflated data set is corrupt ({exc})") from exc
            pending = inflater.unconsumed_tail
            written += len(chunk)
            if written > max_bytes:
                raise DataSetTooLargeError(
                    f"data set larger than {max_bytes / 2**20:.0f} MB once inflated, the limit"
                )
            writer.write(chunk)
            if inflater.eof:
                break
    if not inflater.eof:
        raise UnreadableDataSetError("deflated data set is truncated")


def _read(
    path: Path, offset: int, *, implicit: bool, little_endian: bool, encapsulated: bool
) -> Dataset:
    end = os.stat(path).st_size
    if end <= offset:
        raise UnreadableDataSetError("the data set is empty")
    with path.open("rb") as fp:
        fp.seek(offset)
        _check_vr_encoding(fp.read(6), implicit)
        fp.seek(offset)
        elements: dict[BaseTag, RawDataElement | DataElement] = {}
        try:
            for element in data_element_generator(
                fp, implicit, little_endian, defer_size=DEFER_BYTES
            ):
                elements[element.tag] = element
        except EOFError as exc:
            raise UnreadableDataSetError("data set truncated inside an element") from exc
        except Exception as exc:  # pydicom's parse errors have no common base
            reason = f"data set cannot be parsed ({type(exc).__name__})"
            raise UnreadableDataSetError(reason) from exc
        if fp.tell() > end:
            raise UnreadableDataSetError("data set truncated (a value runs past its end)")
        tail = b""
        if elements:
            fp.seek(max(offset, end - 8))
            tail = fp.read(8)
    _check_elements(elements.values(), end, tail, implicit, encapsulated)
    dataset = Dataset(elements)
    _check_pixels(dataset, encapsulated)
    return dataset


def _check_vr_encoding(head: bytes, implicit: bool) -> None:
    """The first element tells explicit VR (two letters after the tag) from implicit VR."""
    if len(head) < 6:
        raise UnreadableDataSetError("data set truncated in its first element")
    explicit = 0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B
    if implicit and explicit:
        raise UnreadableDataSetError("explicit VR data set on an implicit VR presentation context")
    if not implicit and not explicit:
        raise UnreadableDataSetError("implicit VR data set on an explicit VR presentation context")


def _check_elements(
    elements: Iterable[RawDataElement | DataElement],
    end: int,
    tail: bytes,
    implicit: bool,
    encapsulated: bool,
) -> None:
    last: RawDataElement | DataElement | None = None
    for element in elements:
        last = element
        if not isinstance(element, RawDataElement):
            continue  # an undefined-length sequence, parsed item by item
        if not implicit and element.VR not in _KNOWN_VRS:
            # pydicom guesses past an unknown VR (implicit switch, 2-byte length); dcmtk reads
            # such an element otherwise, and the two then disagree on everything after it.
            raise UnreadableDataSetError(f"{element.tag} has no valid VR ({element.VR!r})")
        if element.length == _UNDEFINED_LENGTH:
            vr = element.VR if not implicit else _dictionary_vr(element.tag)
            if not (vr in ("SQ", "UN") or (element.tag in _PIXEL_DATA_TAGS and encapsulated)):
                raise UnreadableDataSetError(
                    f"undefined length on {element.tag} ({vr}), which is not a sequence"
                )
        elif element.value is not None and len(element.value) != element.length:
            raise UnreadableDataSetError(
                f"data set truncated in {element.tag} "
                f"({len(element.value)} of {element.length} bytes)"
            )
        elif element.value is None and element.value_tell + element.length > end:
            raise UnreadableDataSetError(
                f"data set truncated in {element.tag} "
                f"({end - element.value_tell} of {element.length} bytes)"
            )
    undefined_last = last is not None and (
        (isinstance(last, RawDataElement) and last.length == _UNDEFINED_LENGTH)
        or (isinstance(last, DataElement) and last.is_undefined_length)
    )
    # The generator also stops quietly on a partial element header at the end.
    if (
        isinstance(last, RawDataElement)
        and not undefined_last
        and last.value_tell + last.length != end
    ):
        raise UnreadableDataSetError(
            f"data set truncated after {last.tag} ({end - last.value_tell - last.length} "
            "bytes that are no whole element)"
        )
    if last is not None and undefined_last:
        # The generator stops quietly at the end of the file inside an undefined-length value.
        delimiter = struct.pack("<HHL", SequenceDelimiterTag.group, SequenceDelimiterTag.element, 0)
        if tail != delimiter and tail != struct.pack(">HHL", 0xFFFE, 0xE0DD, 0):
            raise UnreadableDataSetError(
                f"data set truncated in {last.tag} (no sequence delimiter at the end)"
            )


def _dictionary_vr(tag: BaseTag) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"  # private or unknown: undefined length is read as a sequence of items


def _check_pixels(dataset: Dataset, encapsulated: bool) -> None:
    """An image's pixel data must be able to hold what its header says.

    Excess of less than the expected length is tolerated (some devices pad pixel data; dcmtk
    and pydicom read it); twice the expected length or more means the header is wrong.
    """
    if "Rows" not in dataset and "Columns" not in dataset:
        return
    present = [tag for tag in _PIXEL_DATA_TAGS if tag in dataset]
    if not present:
        raise UnreadableDataSetError("image has Rows/Columns but no pixel data")
    element = dataset._dict[present[0]]  # raw: a deferred value is not read
    length = element.length if isinstance(element, RawDataElement) else len(element.value or b"")
    if length == 0:
        raise UnreadableDataSetError("image has empty pixel data")
    try:
        rows, columns = int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        frames = int(dataset.NumberOfFrames) if "NumberOfFrames" in dataset else 1
        bits = int(dataset.BitsAllocated) if "BitsAllocated" in dataset else None
        stored = int(dataset.BitsStored) if "BitsStored" in dataset else None
    except (TypeError, ValueError) as exc:
        raise UnreadableDataSetError(f"image header values are not numbers ({exc})") from exc
    if min(rows, columns, samples, frames) < 1:
        raise UnreadableDataSetError(
            f"image of {rows} x {columns} pixels, {samples} samples, {frames} frames"
        )
    if encapsulated:
        return  # compressed frames: their decoders check them
    if bits is None or bits not in (1, 8, 16, 32, 64):
        raise UnreadableDataSetError(f"BitsAllocated {bits} is not 1, 8, 16, 32 or 64")
    if stored is not None and not 0 < stored <= bits:
        raise UnreadableDataSetError(f"BitsStored {stored} with BitsAllocated {bits}")
    expected = (rows * columns * samples * frames * bits + 7) // 8
    padded = expected + expected % 2
    if length < expected or length >= 2 * padded:
        raise UnreadableDataSetError(
            f"pixel data holds {length} bytes; {rows} x {columns} x {samples} samples x "
            f"{bits} bits x {frames} frames need {expected}"
        )
