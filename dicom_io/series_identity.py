"""Who and which study a written series belongs to, and deterministic UIDs.

UIDs derive from seed strings (pydicom's generate_uid with entropy sources), so writing the
same study twice gives the same UIDs: a resend replaces instead of duplicating.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from lesionwatch.dicom_io import output_uids

__all__ = ["StudyIdentity", "derive_uid"]


def derive_uid(*parts: str) -> str:
    """A valid DICOM UID that depends only on `parts` (same parts, same UID)."""
    if not parts:
        raise ValueError("derive_uid needs at least one seed string")
    # One UID derivation for the project: input series use the same scheme as job outputs.
    return output_uids.derive_uid("lesionwatch", json.dumps(parts))


@dataclass(frozen=True)
class StudyIdentity:
    """Patient and study attributes shared by every series of one written study."""

    patient_id: str
    patient_name: str  # DICOM PN, e.g. "Doe^Jane"
    birth_date: dt.date | None
    sex: str  # "F", "M", "O" or "" (unknown)
    study_instance_uid: str
    study_date: dt.date
    study_time: dt.time
    accession_number: str = ""
    study_description: str = ""
    study_id: str = "1"
    referring_physician_name: str = ""

    def __post_init__(self) -> None:
        if self.sex not in ("F", "M", "O", ""):
            raise ValueError(f"sex must be 'F', 'M', 'O' or '', got {self.sex!r}")
        if not self.patient_id or len(self.patient_id) > 64:
            raise ValueError(f"patient_id must be 1-64 characters, got {self.patient_id!r}")
        if len(self.accession_number) > 16:
            raise ValueError(
                f"accession_number is limited to 16 characters: {self.accession_number!r}"
            )

    @classmethod
    def from_seed(
        cls,
        seed: str,
        *,
        patient_id: str,
        patient_name: str,
        birth_date: dt.date | None,
        sex: str,
        study_date: dt.date,
        study_time: dt.time = dt.time(9, 0, 0),
        accession_number: str = "",
        study_description: str = "",
    ) -> StudyIdentity:
        """An identity whose Study Instance UID derives from `seed` (reproducible demo data)."""
        return cls(
            patient_id=patient_id,
            patient_name=patient_name,
            birth_date=birth_date,
            sex=sex,
            study_instance_uid=derive_uid(seed, "study"),
            study_date=study_date,
            study_time=study_time,
            accession_number=accession_number,
            study_description=study_description,
        )

    @property
    def frame_of_reference_uid(self) -> str:
        """One frame of reference per study: its series share the scanner's patient space."""
        return derive_uid(self.study_instance_uid, "frame-of-reference")

    @property
    def patient_age(self) -> str:
        """DICOM AS value at the study date ('' when the birth date is unknown)."""
        if self.birth_date is None:
            return ""
        years = (
            self.study_date.year
            - self.birth_date.year
            - (
                (self.study_date.month, self.study_date.day)
                < (self.birth_date.month, self.birth_date.day)
            )
        )
        return f"{max(years, 0):03d}Y"
