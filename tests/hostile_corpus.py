"""Hostile C-STORE input for the listener (issue 15): a seeded, deterministic corpus.

Every case starts from a real MR instance in ``tests/data/dicom_t1`` with fresh UIDs and is
broken in one way (truncated, inconsistent pixel data, wrong VR encoding for its presentation
context, undefined lengths, invalid UIDs, deflate bombs, broken re-sends of accepted instances,
...). Each case says what the listener must answer: ``accept`` (status 0), ``refuse`` (one of
its ``refusals``) or ``either`` (harmless mutations: 0 or a refusal, never 0x0110).

``hostile_sender.py`` puts the cases on the wire and checks the archive after them.
"""

from __future__ import annotations

import enum
import functools
import gzip
import math
import random
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from itertools import islice
from pathlib import Path
from typing import TypeVar

import pydicom
import pydicom.config
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from lesionwatch.dicom_io.scp import StoreStatus

__all__ = [
    "CANNOT_UNDERSTAND",
    "DOES_NOT_MATCH",
    "DROPPED",
    "OUT_OF_RESOURCES",
    "SUCCESS",
    "CorpusBuilder",
    "HostileCase",
    "Outcome",
    "batches",
    "deflate_bomb",
    "status_name",
]

DICOM_T1 = Path(__file__).resolve().parent / "data" / "dicom_t1"
DROPPED = -1  # no response: the association was aborted or the listener went away
CANNOT_UNDERSTAND = int(StoreStatus.CANNOT_UNDERSTAND)  # 0xC000
OUT_OF_RESOURCES = int(StoreStatus.OUT_OF_RESOURCES)  # 0xA700
DOES_NOT_MATCH = int(StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)  # 0xA900
SUCCESS = int(StoreStatus.SUCCESS)
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_SEQUENCE_DELIMITER = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
_ROWS, _COLUMNS, _PIXEL_DATA, _SERIES_DESCRIPTION = 0x00280010, 0x00280011, 0x7FE00010, 0x0008103E
_BAD_UIDS = {
    "traversal": "../../../../tmp/lesionwatch",
    "slash": "1.2.840/../../1",
    "long": "1.2.3." + "4" * 194,  # 200 characters
    "65-chars": "1.2.3." + "4" * 59,
    "non-ascii": "1.2.3.\u00e9\u00e8",
    "nul": "1.2.3\x004",
}
_ODD_BITS = (0, 1, 7, 8, 12, 13, 17, 24, 32, 64)
T = TypeVar("T")


class Outcome(enum.StrEnum):
    ACCEPT = "accept"
    REFUSE = "refuse"
    EITHER = "either"


@dataclass(frozen=True, slots=True)
class HostileCase:
    """One C-STORE request: what goes on the wire and what the listener must answer."""

    name: str
    kind: str
    transfer_syntax: str
    payload: bytes  # the data set as sent (no preamble, no File Meta)
    sop_class_uid: str  # of the request (Affected SOP Class/Instance UID)
    sop_instance_uid: str
    outcome: Outcome
    refusals: frozenset[int] = frozenset({CANNOT_UNDERSTAND})
    # Where an accepted instance lands: (study, series, SOP instance UID), when known.
    location: tuple[str, str, str] | None = None
    valid_resend: bool = False  # a valid re-send of an accepted SOP instance: may replace it

    def allows(self, status: int) -> bool:
        if self.outcome is Outcome.ACCEPT:
            return status == SUCCESS
        if self.outcome is Outcome.REFUSE:
            return status in self.refusals
        return status == SUCCESS or status in self.refusals | {CANNOT_UNDERSTAND, DOES_NOT_MATCH}

    def expected(self) -> str:
        if self.outcome is Outcome.ACCEPT:
            return "Success"
        names = sorted(status_name(code) for code in self.refusals)
        return (" or ".join(names)) + (" or Success" if self.outcome is Outcome.EITHER else "")


def status_name(status: int) -> str:
    if status == DROPPED:
        return "DROPPED"
    try:
        return StoreStatus(status).name
    except ValueError:
        return f"0x{status:04X}"


def expected_pixel_bytes(dataset: Dataset) -> int:
    """Native pixel data length implied by the image attributes (rounded up to even)."""
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    samples = int(dataset.get("SamplesPerPixel", 1))
    bits = int(dataset.get("BitsAllocated", 0))
    frames = int(dataset.get("NumberOfFrames", 1) or 0)
    if bits == 1:
        length = math.ceil(rows * columns * samples * frames / 8)
    else:
        length = rows * columns * samples * frames * bits // 8
    return length + length % 2


def encode(dataset: Dataset, *, implicit_vr: bool = False) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit_vr
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def element_offsets(encoded: bytes, *, implicit_vr: bool = False) -> dict[int, tuple[int, int]]:
    """Top-level elements: tag -> (offset of the element, offset of its value)."""
    offsets: dict[int, tuple[int, int]] = {}
    for element in data_element_generator(BytesIO(encoded), implicit_vr, True, defer_size=64):
        header = 8 if implicit_vr or element.VR not in _LONG_VRS else 12
        # Raw elements carry value_tell; undefined-length sequences come parsed, with file_tell.
        tell = element.value_tell if isinstance(element, RawDataElement) else element.file_tell
        value = int(tell or 0)
        offsets[int(element.tag)] = (value - header, value)
    return offsets


def deflate_bomb(header: Dataset, pixel_bytes: int, *, segment_mb: int = 16) -> Iterator[bytes]:
    """A Deflated Explicit VR LE data set: ``header`` then ``pixel_bytes`` of zero pixel data.

    Yields the raw deflate stream piece by piece without ever holding the inflated data: one
    compressed, fully flushed segment of zeros (self-contained, so it can be repeated) is
    sent again and again. Zeros deflate ~1000:1, so 1.5 GiB inflated is ~1.6 MB on the wire.
    """
    head = encode(header) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    first = zlib.compressobj(9, zlib.DEFLATED, -15)
    yield first.compress(head) + first.flush(zlib.Z_FULL_FLUSH)
    segment_bytes = segment_mb << 20
    whole, rest = divmod(pixel_bytes, segment_bytes)
    for _ in range(whole):
        yield _deflated_zeros(segment_bytes)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    yield last.compress(bytes(rest)) + last.flush(zlib.Z_FINISH)


def _zeros_after(head: bytes, size: int, chunk: int = 16 << 20) -> Iterator[bytes]:
    yield head
    for start in range(0, size, chunk):
        yield bytes(min(chunk, size - start))


@functools.cache
def _deflated_zeros(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(bytes(size)) + compressor.flush(zlib.Z_FULL_FLUSH)


def bomb_header(dataset: Dataset, pixel_bytes: int) -> Dataset:
    """Image attributes consistent with ``pixel_bytes`` of 16-bit pixels: only the size is bad."""
    del dataset.PixelData
    dataset.Rows = dataset.Columns = 1024
    dataset.SamplesPerPixel, dataset.BitsAllocated, dataset.BitsStored = 1, 16, 16
    dataset.HighBit = 15
    dataset.NumberOfFrames = pixel_bytes // (1024 * 1024 * 2)
    return dataset


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


@dataclass
class _Accepted:
    """A valid instance of the corpus that later cases re-send."""

    encoded: bytes
    location: tuple[str, str, str]


@dataclass
class CorpusBuilder:
    """Deterministic hostile cases; the same ``seed`` gives the same bytes in the same order.

    ``max_instance_mb`` is the listener's ``listener.max_instance_mb``: oversized cases and
    deflate bombs are built just above it.
    """

    seed: int = 15
    max_instance_mb: int = 4
    pool_size: int = 12  # the first cases: valid instances that later cases re-send broken
    rng: random.Random = field(init=False)
    _sources: list[bytes] = field(init=False)
    _series: list[tuple[str, str]] = field(init=False)
    _pool: list[_Accepted] = field(init=False, default_factory=list)
    _counter: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._sources = [encode(dataset) for dataset in _source_datasets()]
        self._series = [(self._uid(), self._uid()) for _ in self._sources]

    # -- building blocks -----------------------------------------------------------------

    def _uid(self) -> str:
        return f"2.25.{self.rng.getrandbits(120)}"

    def _fresh(self) -> Dataset:
        """A real instance with this corpus' study/series UIDs and a new SOP Instance UID."""
        index = self.rng.randrange(len(self._sources))
        dataset = read_dataset(BytesIO(self._sources[index]), False, True)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = self._series[index]
        dataset.SOPInstanceUID = self._uid()
        return dataset

    def _case(
        self,
        kind: str,
        dataset: Dataset,
        outcome: Outcome,
        *,
        payload: bytes | None = None,
        transfer_syntax: str = ExplicitVRLittleEndian,
        refusals: Iterable[int] = (CANNOT_UNDERSTAND,),
        request_uids: tuple[str, str] | None = None,
        valid_resend: bool = False,
    ) -> HostileCase:
        self._counter += 1
        sop_class, sop_instance = request_uids or (
            str(dataset.get("SOPClassUID", "")),
            str(dataset.get("SOPInstanceUID", "")),
        )
        uids = tuple(str(dataset.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID"))
        return HostileCase(
            name=f"{self._counter:05d}-{kind}",
            kind=kind,
            transfer_syntax=transfer_syntax,
            payload=encode(dataset) if payload is None else payload,
            sop_class_uid=sop_class or str(pydicom.uid.MRImageStorage),
            sop_instance_uid=sop_instance or self._uid(),
            outcome=outcome,
            refusals=frozenset(refusals),
            location=(uids[0], uids[1], sop_instance) if all(uids) and sop_instance else None,
            valid_resend=valid_resend,
        )

    def valid_case(self, kind: str = "valid") -> HostileCase:
        with _lenient_pydicom():
            return self._case(kind, self._fresh(), Outcome.ACCEPT)

    def deflate_bomb_case(self, pixel_bytes: int) -> tuple[HostileCase, Iterator[bytes]]:
        """A deflate bomb of ``pixel_bytes`` zero pixels: the case, and its payload streamed."""
        with _lenient_pydicom():
            dataset = bomb_header(self._fresh(), pixel_bytes)
            case = self._case(
                "deflate-bomb",
                dataset,
                Outcome.REFUSE,
                payload=b"",
                transfer_syntax=DeflatedExplicitVRLittleEndian,
                refusals={OUT_OF_RESOURCES},
            )
        return case, deflate_bomb(dataset, pixel_bytes)

    def large_case(self, pixel_bytes: int) -> tuple[HostileCase, Iterator[bytes]]:
        """A valid Explicit VR LE instance with ``pixel_bytes`` of pixel data, streamed."""
        with _lenient_pydicom():
            dataset = bomb_header(self._fresh(), pixel_bytes)
            case = self._case("large", dataset, Outcome.ACCEPT, payload=b"")
        head = encode(dataset) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
        return case, _zeros_after(head, pixel_bytes)

    # -- the kinds -------------------------------------------------------------------------

    def _valid_pool(self) -> HostileCase:
        case = self.valid_case("valid")
        assert case.location is not None
        if len(self._pool) < self.pool_size:  # fixed halves: broken vs valid re-sends
            self._pool.append(_Accepted(case.payload, case.location))
        return case

    def _valid_encodings(self) -> HostileCase:
        dataset = self._fresh()
        if self.rng.random() < 0.5:
            payload = encode(dataset, implicit_vr=True)
            return self._case(
                "valid-implicit",
                dataset,
                Outcome.ACCEPT,
                payload=payload,
                transfer_syntax=ImplicitVRLittleEndian,
            )
        return self._case(
            "valid-deflated",
            dataset,
            Outcome.ACCEPT,
            payload=_deflate(encode(dataset)),
            transfer_syntax=DeflatedExplicitVRLittleEndian,
        )

    def _truncated(self) -> HostileCase:
        dataset = self._fresh()
        encoded = encode(dataset)
        offsets = element_offsets(encoded)
        pixel_start, pixel_value = offsets[_PIXEL_DATA]
        choice = self.rng.random()
        if choice < 0.2:
            return self._case(
                "truncate-before-pixel", dataset, Outcome.REFUSE, payload=encoded[:pixel_start]
            )
        if choice < 0.3:
            cut = self.rng.randrange(pixel_start + 1, pixel_value)
            return self._case(
                "truncate-pixel-header", dataset, Outcome.REFUSE, payload=encoded[:cut]
            )
        if choice < 0.5:
            cut = self.rng.randrange(pixel_value, len(encoded))
            return self._case("truncate-in-pixels", dataset, Outcome.REFUSE, payload=encoded[:cut])
        cut = self.rng.randrange(1, pixel_start)
        starts = {start for start, _ in offsets.values()}
        # Cut exactly between two elements before Rows/Columns: a shorter, image-less but
        # well-formed data set (may be accepted). Anywhere else something is cut short.
        harmless = cut in starts and cut <= offsets[_COLUMNS][0]
        outcome = Outcome.EITHER if harmless else Outcome.REFUSE
        return self._case("truncate-random", dataset, outcome, payload=encoded[:cut])

    def _pixels(self) -> HostileCase:
        dataset = self._fresh()
        pixels: bytes = dataset.PixelData
        variant = self.rng.choice(["short", "long", "empty", "half"])
        if variant == "short":
            dataset.PixelData = pixels[: -2 * self.rng.randrange(1, 64)]
        elif variant == "long":
            dataset.PixelData = pixels + bytes(2 * self.rng.randrange(1, 64))
        elif variant == "empty":
            dataset.PixelData = b""
        else:
            dataset.PixelData = pixels[: len(pixels) // 2]
        # A little excess is padding some devices send (dcmtk reads it): tolerated.
        outcome = Outcome.EITHER if variant == "long" else Outcome.REFUSE
        return self._case(f"pixels-{variant}", dataset, outcome)

    def _dimensions(self) -> HostileCase:
        dataset = self._fresh()
        variant = self.rng.choice(
            ["rows", "columns", "both", "frames-max", "frames-zero", "samples", "no-columns"]
        )
        if variant in ("rows", "both"):
            dataset.Rows = 65535
        if variant in ("columns", "both"):
            dataset.Columns = 65535
        if variant == "frames-max":
            dataset.NumberOfFrames = 2**31 - 1
        if variant == "frames-zero":
            dataset.NumberOfFrames = 0
        if variant == "samples":
            dataset.SamplesPerPixel = 3
        if variant == "no-columns":
            # Pixel data whose length cannot be checked: refusing or storing it are both fair.
            del dataset.Columns
            return self._case(f"dimensions-{variant}", dataset, Outcome.EITHER)
        return self._case(f"dimensions-{variant}", dataset, Outcome.REFUSE)

    def _bits(self) -> HostileCase:
        dataset = self._fresh()
        bits = self.rng.choice(_ODD_BITS)
        dataset.BitsAllocated = bits
        if self.rng.random() < 0.3 and bits in (8, 32):
            # Consistent: pixel data resized to match; a plausible image.
            dataset.BitsStored, dataset.HighBit = bits, bits - 1
            dataset.PixelData = bytes(expected_pixel_bytes(dataset))
            return self._case(f"bits-{bits}-consistent", dataset, Outcome.EITHER)
        outcome = Outcome.REFUSE
        if expected_pixel_bytes(dataset) == len(dataset.PixelData):
            outcome = Outcome.EITHER
        return self._case(f"bits-{bits}", dataset, outcome)

    def _vr_mismatch(self) -> HostileCase:
        dataset = self._fresh()
        if self.rng.random() < 0.5:
            return self._case(
                "explicit-on-implicit",
                dataset,
                Outcome.REFUSE,
                transfer_syntax=ImplicitVRLittleEndian,
            )
        return self._case(
            "implicit-on-explicit",
            dataset,
            Outcome.REFUSE,
            payload=encode(dataset, implicit_vr=True),
        )

    def _undefined_length(self) -> HostileCase:
        """A string element (Series Description) given an undefined length."""
        dataset = self._fresh()
        dataset.SeriesDescription = "HOSTILE UNDEFINED LENGTH"
        delimited = self.rng.random() < 0.7
        if self.rng.random() < 0.5:  # implicit VR: every element has a 4-byte length
            encoded = encode(dataset, implicit_vr=True)
            start, value = element_offsets(encoded, implicit_vr=True)[_SERIES_DESCRIPTION]
            length = struct.unpack_from("<L", encoded, start + 4)[0]
            body = encoded[value : value + length] + (_SEQUENCE_DELIMITER if delimited else b"")
            payload = encoded[: start + 4] + b"\xff\xff\xff\xff" + body + encoded[value + length :]
            return self._case(
                "undefined-length-implicit",
                dataset,
                Outcome.REFUSE,
                payload=payload,
                transfer_syntax=ImplicitVRLittleEndian,
            )
        # Explicit VR: LO has a 2-byte length, so the element is re-encoded as UT (4-byte).
        encoded = encode(dataset)
        start, value = element_offsets(encoded)[_SERIES_DESCRIPTION]
        length = struct.unpack_from("<H", encoded, start + 6)[0]
        element = struct.pack("<HH2sHL", 0x0008, 0x103E, b"UT", 0, 0xFFFFFFFF)
        body = encoded[value : value + length] + (_SEQUENCE_DELIMITER if delimited else b"")
        payload = encoded[:start] + element + body + encoded[value + length :]
        return self._case("undefined-length-explicit", dataset, Outcome.REFUSE, payload=payload)

    def _bad_uid(self) -> HostileCase:
        dataset = self._fresh()
        keyword = self.rng.choice(["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
        label, value = self.rng.choice(sorted(_BAD_UIDS.items()))
        setattr(dataset, keyword, value)
        return self._case(f"uid-{label}-{keyword}", dataset, Outcome.REFUSE)

    def _missing_uid(self) -> HostileCase:
        dataset = self._fresh()
        request = (str(dataset.SOPClassUID), str(dataset.SOPInstanceUID))
        keyword = self.rng.choice(
            ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
        )
        if self.rng.random() < 0.5:
            delattr(dataset, keyword)
            kind = f"uid-missing-{keyword}"
        else:
            setattr(dataset, keyword, "")
            kind = f"uid-empty-{keyword}"
        # A missing SOP Class/Instance UID also differs from the request's: 0xA900 is right too.
        refusals = (
            {CANNOT_UNDERSTAND, DOES_NOT_MATCH}
            if keyword.startswith("SOP")
            else {CANNOT_UNDERSTAND}
        )
        return self._case(kind, dataset, Outcome.REFUSE, refusals=refusals, request_uids=request)

    def _mismatch(self) -> HostileCase:
        dataset = self._fresh()
        if self.rng.random() < 0.5:
            request = (str(dataset.SOPClassUID), self._uid())
            kind = "mismatch-instance"
        else:
            request = (str(EnhancedMRImageStorage), str(dataset.SOPInstanceUID))
            kind = "mismatch-class"
        return self._case(
            kind, dataset, Outcome.REFUSE, refusals={DOES_NOT_MATCH}, request_uids=request
        )

    def _garbage(self) -> HostileCase:
        dataset = self._fresh()
        variant = self.rng.choice(["empty", "random", "byte-flips", "byte-flips"])
        if variant == "empty":
            return self._case("empty", dataset, Outcome.REFUSE, payload=b"")
        if variant == "random":
            payload = self.rng.randbytes(self.rng.randrange(1, 20_000))
            return self._case("random-bytes", dataset, Outcome.REFUSE, payload=payload)
        encoded = bytearray(encode(dataset))
        header_end = element_offsets(bytes(encoded))[_PIXEL_DATA][1]
        for _ in range(self.rng.randrange(1, 5)):
            encoded[self.rng.randrange(header_end)] ^= 1 << self.rng.randrange(8)
        return self._case("byte-flips", dataset, Outcome.EITHER, payload=bytes(encoded))

    def _oversized(self) -> HostileCase:
        dataset = self._fresh()
        limit = self.max_instance_mb << 20
        pixel_bytes = (limit + (1 << 20)) // (2 << 20) * (2 << 20) + (2 << 20)
        bomb_header(dataset, pixel_bytes)
        if self.rng.random() < 0.75:
            payload = b"".join(deflate_bomb(dataset, pixel_bytes))
            return self._case(
                "deflate-bomb",
                dataset,
                Outcome.REFUSE,
                payload=payload,
                transfer_syntax=DeflatedExplicitVRLittleEndian,
                refusals={OUT_OF_RESOURCES},
            )
        dataset.add_new(_PIXEL_DATA, "OW", bytes(pixel_bytes))
        return self._case("oversized-plain", dataset, Outcome.REFUSE, refusals={OUT_OF_RESOURCES})

    def _bad_deflate(self) -> HostileCase:
        dataset = self._fresh()
        deflated = _deflate(encode(dataset))
        if self.rng.random() < 0.5:
            payload = deflated[: self.rng.randrange(1, len(deflated))]
            kind = "deflate-truncated"
        else:
            payload = self.rng.randbytes(self.rng.randrange(16, 4096))
            kind = "deflate-garbage"
        return self._case(
            kind,
            dataset,
            Outcome.REFUSE,
            payload=payload,
            transfer_syntax=DeflatedExplicitVRLittleEndian,
        )

    def _resend_broken(self) -> HostileCase:
        """An accepted instance (first half of the pool) again, broken: must not replace it."""
        accepted = self._pool[self.rng.randrange(max(1, len(self._pool) // 2))]
        dataset = read_dataset(BytesIO(accepted.encoded), False, True)
        encoded = accepted.encoded
        pixel_start, pixel_value = element_offsets(encoded)[_PIXEL_DATA]
        variant = self.rng.choice(["before-pixels", "in-pixels", "pixels-short", "implicit-vr"])
        transfer_syntax = ExplicitVRLittleEndian
        if variant == "before-pixels":
            payload = encoded[:pixel_start]
        elif variant == "in-pixels":
            payload = encoded[: self.rng.randrange(pixel_value, len(encoded))]
        elif variant == "pixels-short":
            dataset.PixelData = dataset.PixelData[:-256]
            payload = encode(dataset)
        else:
            transfer_syntax = ImplicitVRLittleEndian
            payload = encoded
        return self._case(
            f"resend-broken-{variant}",
            dataset,
            Outcome.REFUSE,
            payload=payload,
            transfer_syntax=transfer_syntax,
        )

    def _resend_valid(self) -> HostileCase:
        """An accepted instance (second half of the pool) again: identical, or valid but moved."""
        accepted = self._pool[self.rng.randrange(len(self._pool) // 2, len(self._pool))]
        dataset = read_dataset(BytesIO(accepted.encoded), False, True)
        variant = self.rng.choice(["identical", "other-study", "edited"])
        if variant == "identical":
            return self._case(
                "resend-identical",
                dataset,
                Outcome.ACCEPT,
                payload=accepted.encoded,
                valid_resend=True,
            )
        if variant == "other-study":
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID = self._uid(), self._uid()
        else:
            dataset.SeriesDescription = f"EDITED {self.rng.randrange(1000)}"
        return self._case(f"resend-{variant}", dataset, Outcome.ACCEPT, valid_resend=True)

    # -- the corpus ------------------------------------------------------------------------

    def _makers(self) -> list[tuple[Callable[[], HostileCase], int]]:
        return [
            (self._valid_pool, 3),
            (self._valid_encodings, 2),
            (self._truncated, 8),
            (self._pixels, 5),
            (self._dimensions, 4),
            (self._bits, 3),
            (self._vr_mismatch, 3),
            (self._undefined_length, 3),
            (self._bad_uid, 5),
            (self._missing_uid, 2),
            (self._mismatch, 2),
            (self._garbage, 4),
            (self._oversized, 1),
            (self._bad_deflate, 2),
            (self._resend_broken, 4),
            (self._resend_valid, 2),
        ]

    def cases(self, count: int) -> Iterator[HostileCase]:
        """``count`` cases, built lazily: first ``pool_size`` valid ones, then a seeded mix."""
        for _ in range(min(self.pool_size, count)):
            yield self._valid_pool()
        plan = [maker for maker, weight in self._makers() for _ in range(weight)]
        remaining = count - self.pool_size
        order = (plan * (remaining // len(plan) + 1))[:remaining]
        self.rng.shuffle(order)
        for maker in order:
            with _lenient_pydicom():
                case = maker()
            yield case


@contextmanager
def _lenient_pydicom() -> Iterator[None]:
    """Invalid values are the point here: no pydicom warnings about them."""
    settings = pydicom.config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = modes


def _source_datasets() -> list[Dataset]:
    """Three GE and three Siemens T1 instances (Explicit VR Little Endian, 16-bit)."""
    paths = sorted((DICOM_T1 / "ge_signa_t1_mprage").iterdir())[:3]
    paths += sorted((DICOM_T1 / "siemens_xa30_t1_tfl3d").iterdir())[:3]
    datasets: list[Dataset] = []
    for path in paths:
        with gzip.open(path) if path.name.endswith(".gz") else path.open("rb") as handle:
            datasets.append(pydicom.dcmread(handle))
    return datasets
