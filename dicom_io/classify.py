"""Series classification: which series of a study is the FLAIR, the T1 pre/post, the T2.

`classify_series` decides for one header. Order: objects that are not MR images (SEG, SR,
secondary captures, spectroscopy) are OTHER whatever the rules say, so our own SEG output
sent back to us is never taken for an input; then the admin rules from the config, in
order; then the built-in rules of `classify_rules` (unless switched off). The returned
`Classification` names the deciding rule and the evidence in a sentence an admin can act on.

`classify_directory` and `format_table` serve ``lesionwatch classify DIR``: headers only,
one row per series.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from lesionwatch.config.schema import ClassificationConfig, ClassificationRule, SeriesClass
from lesionwatch.dicom_io.classify_rules import (
    BUILTIN_RULE_PREFIX,
    apply_builtin_rules,
    attribute_text,
    non_image_reason,
    read_facts,
)
from lesionwatch.dicom_io.series_files import read_dicom_file

__all__ = [
    "ADMIN_RULE_PREFIX",
    "Classification",
    "DirectoryScan",
    "SeriesHeader",
    "SeriesRow",
    "SkippedFile",
    "classify_directory",
    "classify_scan",
    "classify_series",
    "format_table",
    "scan_directory",
]

log = logging.getLogger(__name__)

ADMIN_RULE_PREFIX = "admin:"
_NO_RULE = "none"
_SHOWN_VALUE_CHARS = 60


@dataclass(frozen=True)
class Classification:
    """The class of a series, the evidence as one sentence, and the rule that decided.

    `rule` is ``admin:<name>`` for a configured rule, ``builtin:<stage>`` for a built-in one
    (modality, image-type, name, acquisition-contrast, physics, no-evidence), or ``none``.
    """

    series_class: SeriesClass
    reason: str
    rule: str


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN_VALUE_CHARS else text[: _SHOWN_VALUE_CHARS - 1] + "…"


def _admin_rule_evidence(ds: Dataset, rule: ClassificationRule) -> str | None:
    """The evidence sentence when every pattern of `rule` matches, else None.

    An absent attribute is matched as the empty string, so ``'^$'`` can require absence.
    """
    evidence = []
    for keyword, pattern in rule.match.items():
        text = attribute_text(ds, keyword)
        if re.search(pattern, text, re.IGNORECASE) is None:
            return None
        evidence.append(f"{keyword} '{_shown(text)}' matches /{pattern}/")
    return f"admin rule '{rule.name}': " + ", ".join(evidence)


def classify_series(ds: Dataset, config: ClassificationConfig) -> Classification:
    """Classify the series that `ds` belongs to (any one instance; the header is enough)."""
    facts = read_facts(ds)
    not_image = non_image_reason(facts)
    if not_image is not None:
        return Classification(SeriesClass.OTHER, not_image, BUILTIN_RULE_PREFIX + "modality")
    for rule in config.rules:
        evidence = _admin_rule_evidence(ds, rule)
        if evidence is not None:
            return Classification(rule.series_class, evidence, ADMIN_RULE_PREFIX + rule.name)
    if not config.use_builtin_rules:
        return Classification(
            SeriesClass.OTHER,
            f"no admin rule matched and built-in rules are off ({len(config.rules)} rules tried)",
            _NO_RULE,
        )
    decision = apply_builtin_rules(facts)
    return Classification(decision.series_class, decision.reason, decision.rule)


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    why: str


@dataclass(frozen=True)
class SeriesHeader:
    """One series found on disk: the header that stands for it and how many instances it has."""

    series_instance_uid: str
    dataset: Dataset  # header of the instance with the lowest InstanceNumber
    instance_count: int


@dataclass(frozen=True)
class DirectoryScan:
    series: tuple[SeriesHeader, ...]
    skipped: tuple[SkippedFile, ...]  # files that are not DICOM or have no series to belong to


@dataclass(frozen=True)
class SeriesRow:
    """One line of ``lesionwatch classify``."""

    series_number: int | None
    series_instance_uid: str
    manufacturer: str
    series_description: str
    instance_count: int
    series_class: SeriesClass
    reason: str
    rule: str


def _instance_number(ds: Dataset) -> float:
    try:
        return float(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return float("inf")


def scan_directory(path: Path) -> DirectoryScan:
    """Read every file's header below `path` (recursively; ``.gz`` files transparently) and
    group them by SeriesInstanceUID. Non-DICOM files are skipped and listed, never fatal.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a directory (give the folder that holds the series)")
    headers: dict[str, Dataset] = {}
    counts: dict[str, int] = {}
    skipped: list[SkippedFile] = []
    for file_path in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            ds = read_dicom_file(file_path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError) as exc:
            skipped.append(SkippedFile(file_path, f"not a DICOM file ({exc})"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "")).strip()
        if not uid:
            skipped.append(
                SkippedFile(file_path, "DICOM without SeriesInstanceUID (e.g. DICOMDIR)")
            )
            continue
        counts[uid] = counts.get(uid, 0) + 1
        if uid not in headers or _instance_number(ds) < _instance_number(headers[uid]):
            headers[uid] = ds
    series = tuple(SeriesHeader(uid, headers[uid], counts[uid]) for uid in headers)
    return DirectoryScan(series, tuple(skipped))


def _series_number(ds: Dataset) -> int | None:
    try:
        return int(ds.get("SeriesNumber"))
    except (TypeError, ValueError):
        return None


def classify_scan(scan: DirectoryScan, config: ClassificationConfig) -> list[SeriesRow]:
    """One row per series of `scan`, ordered by SeriesNumber (then UID)."""
    rows = []
    for header in scan.series:
        ds = header.dataset
        classification = classify_series(ds, config)
        rows.append(
            SeriesRow(
                series_number=_series_number(ds),
                series_instance_uid=header.series_instance_uid,
                manufacturer=str(ds.get("Manufacturer", "")).strip(),
                series_description=str(ds.get("SeriesDescription", "")).strip(),
                instance_count=header.instance_count,
                series_class=classification.series_class,
                reason=classification.reason,
                rule=classification.rule,
            )
        )
    rows.sort(key=lambda r: (r.series_number is None, r.series_number or 0, r.series_instance_uid))
    return rows


def classify_directory(path: Path, config: ClassificationConfig) -> list[SeriesRow]:
    """Classify every series below `path` from headers only. Skipped files are logged; use
    `scan_directory` + `classify_scan` to get them as well.
    """
    scan = scan_directory(path)
    if scan.skipped:
        log.info("%s: skipped %d files that are not DICOM series members", path, len(scan.skipped))
    return classify_scan(scan, config)


_COLUMNS = ("Series", "Series Instance UID", "Vendor", "Description", "Images", "Class", "Reason")


def _cells(row: SeriesRow) -> tuple[str, ...]:
    number = "" if row.series_number is None else str(row.series_number)
    return (
        number,
        row.series_instance_uid,
        row.manufacturer,
        row.series_description,
        str(row.instance_count),
        str(row.series_class),
        row.reason,
    )


def format_table(rows: Iterable[SeriesRow], skipped_files: int = 0) -> str:
    """An aligned plain-text table; the reason column comes last and is never cut."""
    body: Sequence[tuple[str, ...]] = [_cells(row) for row in rows]
    table = [_COLUMNS, *body]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(_COLUMNS))]
    right = {0, 4}  # numbers align right

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in [*widths[:-1], len(_COLUMNS[-1])])  # reasons run long
    lines = [line(_COLUMNS), rule, *(line(cells) for cells in body)]
    total = sum(int(cells[4]) for cells in body)
    footer = f"{len(body)} series, {total} instances"
    if skipped_files:
        footer += f", {skipped_files} files skipped (not DICOM series members)"
    lines.append(footer)
    return "\n".join(lines)
