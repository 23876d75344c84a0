"""Coded concepts used in LesionWatch result objects (SEG, SR), in one place.

Every code here exists in the DICOM standard (PS3.16 context groups) or in the coding scheme
it names; the context group each one comes from is noted so a reviewer can check it:

- Segment category: CID 7150 "Segmentation Property Category".
- Segment types: CID 7151 "Segmentation Property Type" (SCT "Lesion", NCIt "Enhancing Lesion");
  "new" is SNOMED CT 7147002 "New" (qualifier value) carried as a type *modifier*, the way
  DICOM qualifies a type without inventing a pre-coordinated concept.
- Procedure reported: CID 100 "Quantitative Diagnostic Imaging Procedure". CID 100 has no
  brain-specific MR entry, so the report names "MRI unspecified body region" and the brain
  is the finding site of every measurement group.
- Measurements: CID 7469 (Volume), CID 7470 (Long axis), CID 7474 (volume method).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "ANATOMIC_REGION_BRAIN",
    "ASSESSMENT_BY_COMPARISON",
    "CHANGE_STATUS_CODES",
    "COMMENT",
    "COMPARISON_WITH_PRIOR_DONE",
    "FINDING_CONCEPTS",
    "FindingConcept",
    "FindingType",
    "LESIONS_UNIT",
    "LONG_AXIS",
    "MILLILITER",
    "MILLIMETER",
    "NO",
    "NUMBER_OF_LESIONS",
    "PROCEDURE_REPORTED",
    "QUALITATIVE_EVALUATIONS",
    "RADIOLOGICAL_ACTIVITY",
    "ALGORITHM_FAMILY",
    "SUM_OF_SEGMENTED_VOXELS",
    "VOLUME",
    "YES",
]


class FindingType(enum.StrEnum):
    """What a segment and a measurement group are about; one SEG segment per finding type."""

    MS_LESION = "ms_lesion"  # T2/FLAIR hyperintense lesion
    NEW_LESION = "new_lesion"  # present now, absent on the prior
    ENHANCING_LESION = "enhancing_lesion"  # gadolinium-enhancing on T1 post-contrast


MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
LESION = Code("52988006", "SCT", "Lesion")
ENHANCING_LESION = Code("C113842", "NCIt", "Enhancing Lesion")
NEW = Code("7147002", "SCT", "New")
ANATOMIC_REGION_BRAIN = Code("12738006", "SCT", "Brain")


@dataclass(frozen=True)
class FindingConcept:
    """How one finding type is labelled and coded in SEG segments and SR groups."""

    label: str  # SegmentLabel (LO, at most 64 characters) and human-readable names
    category: Code
    property_type: Code
    property_type_modifier: Code | None
    display_rgb: tuple[int, int, int]  # SEG display colour and secondary-capture outline


FINDING_CONCEPTS: dict[FindingType, FindingConcept] = {
    FindingType.MS_LESION: FindingConcept(
        "MS lesion (FLAIR)", MORPHOLOGICALLY_ABNORMAL_STRUCTURE, LESION, None, (255, 215, 0)
    ),
    FindingType.NEW_LESION: FindingConcept(
        "New MS lesion", MORPHOLOGICALLY_ABNORMAL_STRUCTURE, LESION, NEW, (255, 40, 40)
    ),
    FindingType.ENHANCING_LESION: FindingConcept(
        "Enhancing MS lesion",
        MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        ENHANCING_LESION,
        None,
        (0, 200, 255),
    ),
}

# --- SR measurement report -----------------------------------------------------------------
PROCEDURE_REPORTED = Code("25056-3", "LN", "MRI unspecified body region")  # CID 100
VOLUME = codes.SCT.Volume  # 118565006
LONG_AXIS = Code("103339001", "SCT", "Long Axis")
NUMBER_OF_LESIONS = Code("246206008", "SCT", "Number of lesions")
SUM_OF_SEGMENTED_VOXELS = Code("126030", "DCM", "Sum of segmented voxel method for volume")
MILLILITER = Code("ml", "UCUM", "milliliter")
MILLIMETER = Code("mm", "UCUM", "millimeter")
LESIONS_UNIT = Code("{lesions}", "UCUM", "lesions")
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence  # DCM 123110

# --- analysis states (TID 1500 "Qualitative Evaluations" at the report level) -------------
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMPARISON_WITH_PRIOR_DONE = Code("122140", "DCM", "Comparison with Prior Study Done")
YES = Code("373066001", "SCT", "Yes")
NO = Code("373067005", "SCT", "No")
COMMENT = Code("121106", "DCM", "Comment")
ASSESSMENT_BY_COMPARISON = Code("121375", "DCM", "Assessment By Comparison")  # value: NEW
# Values of "Assessment By Comparison" for a tracked lesion (lesion_tracking.ChangeStatus).
CHANGE_STATUS_CODES: dict[str, Code] = {
    "new": NEW,
    "enlarging": Code("260376009", "SCT", "Enlarged"),
    "stable": Code("260388006", "SCT", "No change"),
    "shrinking": Code("1250004", "SCT", "Decreased"),
}
# No standard concept says "MS radiological activity" (any new or enlarging T2 lesion since the
# prior); a private code (99 prefix, DICOM PS3.16 8.2) names it, valued Yes/No.
RADIOLOGICAL_ACTIVITY = Code("ACT-T2", "99LWATCH", "Radiological activity since prior")
