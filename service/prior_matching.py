"""Which study of a PACS may be a patient's prior, and which of its series to fetch.

Pure functions over C-FIND identifiers, so the guards are tested without a network:
the same Patient ID (and Issuer of Patient ID when the site says so), a study date strictly
before the current one (same day: an earlier time), never the current study itself (same
Study Instance UID or the same accession number), nothing older than the look-back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from pydicom.dataset import Dataset

from lesionwatch.config.schema import ClassificationConfig, SeriesClass
from lesionwatch.dicom_io.classify import classify_series

__all__ = [
    "CurrentStudy",
    "Rejection",
    "choose_series",
    "series_query",
    "study_query",
    "usable_priors",
]

# Series-level attributes asked for: what the series classification reads besides names.
_SERIES_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "ProtocolName",
    "SequenceName",
    "ScanningSequence",
    "SequenceVariant",
    "ImageType",
    "InversionTime",
    "RepetitionTime",
    "EchoTime",
    "ContrastBolusAgent",
    "NumberOfSeriesRelatedInstances",
)


@dataclass(frozen=True)
class CurrentStudy:
    """What the search knows of the study that needs a prior."""

    study_instance_uid: str
    patient_id: str
    study_date: str  # YYYYMMDD ('' when the header had none)
    study_time: str = ""
    accession_number: str = ""
    issuer_of_patient_id: str = ""
    linked_accession_number: str = ""  # the prior's accession, when the site links orders


@dataclass(frozen=True)
class Rejection:
    study_instance_uid: str
    why: str


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _date(text: str) -> date | None:
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8])) if len(text) >= 8 else None
    except ValueError:
        return None


def _time_key(text: str) -> str:
    # HHMMSS.frac compares as text once padded: "0930" < "093000.5" < "1000".
    return text.split(".")[0].ljust(6, "0") + ("." + text.split(".")[1] if "." in text else "")


def study_query(
    current: CurrentStudy,
    lookback_days: int,
    *,
    match_issuer: bool,
    accession_number: str | None = None,
) -> Dataset:
    """Study-level C-FIND: this patient's MR studies from the look-back up to the study date."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = current.patient_id
    ds.IssuerOfPatientID = current.issuer_of_patient_id if match_issuer else ""
    ds.ModalitiesInStudy = "MR"
    today = _date(current.study_date)
    if today is not None:
        earliest = today - timedelta(days=lookback_days)
        ds.StudyDate = f"{earliest:%Y%m%d}-{today:%Y%m%d}"
    else:
        ds.StudyDate = ""
    ds.StudyTime = ""
    ds.StudyInstanceUID = ""
    ds.AccessionNumber = accession_number or ""
    ds.NumberOfStudyRelatedSeries = ""
    return ds


def _rejection(current: CurrentStudy, match: Dataset, lookback_days: int) -> str | None:
    """Why `match` cannot be the prior of `current`, or None when it can."""
    if _text(match, "StudyInstanceUID") == current.study_instance_uid:
        return "it is the current study"
    if _text(match, "PatientID") != current.patient_id:
        return "another Patient ID"  # a PACS answering with wildcard or fuzzy matching
    if current.issuer_of_patient_id and _text(match, "IssuerOfPatientID") not in (
        "",
        current.issuer_of_patient_id,
    ):
        return "another Issuer of Patient ID"
    accession = _text(match, "AccessionNumber")
    if accession and accession == current.accession_number:
        return "same accession number as the current study"
    their_date, our_date = _date(_text(match, "StudyDate")), _date(current.study_date)
    if their_date is None or our_date is None:
        return "no study date to compare"
    if their_date > our_date:
        return "later than the current study"
    if their_date == our_date:
        theirs, ours = _text(match, "StudyTime"), current.study_time
        if not theirs or not ours or _time_key(theirs) >= _time_key(ours):
            return "same day, not known to be earlier"
    if (our_date - their_date).days > lookback_days:
        return "older than the look-back"
    return None


def usable_priors(
    current: CurrentStudy,
    matches: Iterable[Dataset],
    lookback_days: int,
    *,
    match_issuer: bool,
) -> tuple[list[Dataset], list[Rejection]]:
    """The matches that may be priors, most recent first, and why the others may not.

    With `match_issuer`, a match must carry the current study's issuer (an empty issuer on
    either side cannot prove the same ID domain)."""
    usable: list[Dataset] = []
    rejected: list[Rejection] = []
    for match in matches:
        why = _rejection(current, match, lookback_days)
        if (
            why is None
            and match_issuer
            and (
                not current.issuer_of_patient_id
                or _text(match, "IssuerOfPatientID") != current.issuer_of_patient_id
            )
        ):
            why = "Issuer of Patient ID missing or different"
        if why is None:
            usable.append(match)
        else:
            rejected.append(Rejection(_text(match, "StudyInstanceUID"), why))
    usable.sort(
        key=lambda m: (_text(m, "StudyDate"), _time_key(_text(m, "StudyTime"))), reverse=True
    )
    return usable, rejected


def series_query(study_instance_uid: str) -> Dataset:
    """Series-level C-FIND for the attributes the series classification reads."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_instance_uid
    for keyword in _SERIES_KEYS:
        setattr(ds, keyword, "")
    return ds


def _instances(series: Dataset) -> int:
    try:
        return int(series.get("NumberOfSeriesRelatedInstances") or 0)
    except (TypeError, ValueError):
        return 0


def choose_series(
    series: Sequence[Dataset],
    required: Iterable[SeriesClass],
    classification: ClassificationConfig,
) -> dict[SeriesClass, Dataset] | None:
    """For each required class the series to fetch (most images, then highest number), or
    None when a required class is missing. Classified as LesionWatch classifies what it
    receives, on the attributes the PACS answered with."""
    by_class: dict[SeriesClass, list[Dataset]] = {}
    for item in series:
        found = classify_series(item, classification).series_class
        by_class.setdefault(found, []).append(item)
    chosen: dict[SeriesClass, Dataset] = {}
    for wanted in required:
        candidates = by_class.get(wanted)
        if not candidates:
            return None
        chosen[wanted] = max(
            candidates, key=lambda s: (_instances(s), int(s.get("SeriesNumber") or 0))
        )
    return chosen
