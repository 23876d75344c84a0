"""Built-in classification rules for MS brain protocols, and the header facts they read.

A series is judged on what real scanners write, in this order of trust:

1. what it is: Modality and SOP class (only MR images can be pipeline inputs), ImageType
   (localizer, derived, reformatted, phase, diffusion maps are never inputs);
2. what the technologist named it: SeriesDescription (ProtocolName only when the description
   is empty, because GE writes the whole exam's protocol there), then the Siemens
   SequenceName (``*tfl3d1`` is an MPRAGE, ``*spcir`` a 3D FLAIR SPACE);
3. what the scanner says it is: AcquisitionContrast of enhanced (multi-frame) MR images;
4. what the physics says: ScanningSequence/SequenceVariant, InversionTime, EchoTime,
   RepetitionTime and FlipAngle (FLAIR nulls fluid with TI ~1400-3500 ms and reads a long TE;
   MPRAGE/BRAVO/TFE prepare T1 contrast with TI ~350-1400 ms and a short TE; T2 is a long
   TR and TE spin echo without inversion).

The first signal that names a class decides; the others are checked against it and any
disagreement is written into the reason, so an admin can see why and add a rule. T1 series
are then split into pre- and post-contrast from the Contrast/Bolus attributes, the bolus
start time, and the description's tokens (``+C``, ``post``, ``Gd``, ``KM``; ``pre``,
``nativ``, ``w/o``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
)
from pydicom.valuerep import TM

from lesionwatch.config.schema import SeriesClass

__all__ = [
    "BUILTIN_RULE_PREFIX",
    "BuiltinDecision",
    "HeaderFacts",
    "apply_builtin_rules",
    "attribute_text",
    "find_value",
    "non_image_reason",
    "read_facts",
]

BUILTIN_RULE_PREFIX = "builtin:"

_MR_IMAGE_SOP_CLASSES = {
    MRImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
}
_FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")

# Physics thresholds (ms). FLAIR TI: 1.5 T 2D ~2000-2500, 3 T 2D ~2500-2800, 3D SPACE/CUBE/
# VISTA ~1600-1900. T1 preparation: BRAVO ~450, MPRAGE 900-1100, T1-FLAIR (SE-IR) 750-1000.
_FLAIR_TI_MS = (1400.0, 3500.0)
_T1_PREP_TI_MS = (350.0, 1400.0)
_STIR_MAX_TI_MS = 350.0
_LONG_TE_MS = 60.0
_SHORT_TE_MS = 30.0
_LONG_TR_MS = 1500.0
_SHORT_TR_MS = 1000.0


def _word(pattern: str) -> str:
    """`pattern` as a whole token: not glued to letters or digits (``_``, ``-``, space split)."""
    return rf"(?<![a-z0-9])(?:{pattern})(?![a-z0-9])"


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


# Names that mark a series no pipeline can use, with the words for the reason. Checked before
# the class patterns, so "T2* GRE" never counts as T2 and "DWI FLAIR-prep" never as FLAIR.
_OTHER_NAME_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (label, _compile(pattern))
    for label, pattern in (
        (
            "localizer",
            _word(
                r"locali[sz]er|loc|scout|survey|3[-_ ]?pl(?:ane)?|tri[-_ ]?pilot|aahead\w*"
                r"|autoalign|smartbrain|plane[-_ ]?loc"
            ),
        ),
        (
            "calibration",
            _word(
                r"cal|calibration|asset[-_ ]?cal|sense[-_ ]?ref\w*|refscan|coil[-_ ]?survey"
                r"|b[01][-_ ]?map|field[-_ ]?map|shim\w*|prescan"
            ),
        ),
        (
            "diffusion",
            _word(
                r"dwi|dti|diff\w*|e?adc|tracew?|ep2d[-_]diff\w*|resolve|fa[-_ ]?map|colfa"
                r"|tensor|ivim|b[-_ ]?\d{3,4}"
            ),
        ),
        ("perfusion", _word(r"perf\w*|dsc|dce|p?c?asl|rcbv|cbf|cbv|mtt|ttp|twist")),
        (
            "susceptibility",
            _word(r"swi\w*|swan|susc\w*|hemo\w*|minip|mnip")
            + r"|t2[-_ ]?(?:\*|star|gre|fl2d|ffe|merge)",
        ),
        ("angiography", _word(r"tof|mra|mrv|angio\w*|venogram|pc[-_ ]?(?:mra|venc)")),
        ("STIR", _word(r"stir")),
        (
            "double/phase-sensitive inversion recovery",
            _word(r"dir|dbl[-_ ]?ir|double[-_ ]?ir|psir|mp2rage|inv[12]|uni(?:[-_ ]?den)?"),
        ),
        ("relaxometry map", _word(r"t[12][-_ ]?map\w*|mapit|relaxometry|magic|synthetic")),
        ("proton density", _word(r"pdw?|pd[-_ ]?w(?:eighted)?|proton[-_ ]?density")),
        ("steady-state cisternography", _word(r"ciss|fiesta(?:[-_ ]?c)?|trufi|truefisp|dess|bffe")),
        ("spectroscopy", _word(r"svs|csi|spectro\w*|mrs")),
        ("functional MRI", _word(r"bold|fmri|rs[-_ ]?fmri|resting[-_ ]?state|ep2d[-_]bold")),
        (
            "reformat/projection/subtraction",
            _word(r"reformat\w*|mip|sub|subtract\w*|moco|fused|screen[-_ ]?save"),
        ),
    )
)

# Class patterns in the order they are tried: "T1 FLAIR" (GE/Philips T1-weighted SE-IR) is T1,
# "T2 FLAIR" is FLAIR, so T1-FLAIR comes first and FLAIR before T2.
_CLASS_NAME_PATTERNS: tuple[tuple[SeriesClass, re.Pattern[str]], ...] = tuple(
    (series_class, _compile(pattern))
    for series_class, pattern in (
        (SeriesClass.T1_PRE, r"(?<![0-9])t1[-_ ]?(?:w[-_ ]?|weighted[-_ ]?)?(?:flair|ir)(?![a-z])"),
        (
            SeriesClass.FLAIR,
            r"flair|dark[-_ ]?fluid|fluid[-_ ]?att\w*|" + _word(r"da[-_]?fl|spc[-_ ]?ir|\*?spcir"),
        ),
        (
            SeriesClass.T1_PRE,
            r"(?<![0-9])t1(?![0-9])|mp[-_ ]?rage|"
            + _word(r"bravo|f?spgr|ir[-_ ]?f?spgr|tfe|\*?tfl\w*|vibe|lava|thrive|mprage\w*"),
        ),
        (SeriesClass.T2, r"(?<![0-9])t2(?![0-9*])|" + _word(r"ss[-_ ]?fse|haste|\*?h2d\w*")),
    )
)
# Names that fix the technique but not the weighting: the physics decides.
_TECHNIQUE_NAME_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (label, _compile(pattern))
    for label, pattern in (
        ("inversion-recovery turbo spin echo", _word(r"\*?tir\w*|tirm\w*")),
        ("echo-planar", _word(r"\*?ep(?:2d|3d|_b|se|fid)?\w*|\*?re_b\w*")),
        (
            "turbo/fast spin echo",
            _word(r"\*?tse\w*|fse\w*|frfse|propeller|blade|space|\*?spc\w*|cube|vista"),
        ),
        ("gradient echo", _word(r"\*?fl[23]d\w*|flash|gre|ffe|fgre|efgre\w*")),
    )
)

_PRE_CONTRAST_PATTERN = _compile(
    _word(
        r"pre(?:[-_ ]?(?:contrast|kontrast|gd|gad|c|km))?|nativ|native"
        r"|w/?o(?:[-_ ]?(?:contrast|c|gd))?|without[-_ ]?(?:contrast|gd|gad)?"
        r"|non[-_ ]?contrast|no[-_ ]?contrast|unenhanced|plain"
    )
    + r"|(?<![a-z0-9])-\s*c(?![a-z0-9])"
)
_POST_CONTRAST_PATTERN = _compile(
    _word(
        r"post(?:[-_ ]?(?:contrast|kontrast|gd|gad|c|km))?|gd|gad|gado\w*|gadolinium"
        r"|contrast|kontrast|km|mdc|ce|c\+|dotarem|gadovist|gadavist|magnevist|prohance|multihance|clariscan|omniscan"
    )
    + r"|\+\s*(?:c|gd|gad|km|contrast|kontrast)?(?![a-z])|(?<![a-z0-9])c\+"
    + r"|(?<![0-9])t1[-_]?c(?:e|\+)?(?![a-z0-9])"  # BraTS-style T1c / T1CE
)
# What technologists type into ContrastBolusAgent when there was no agent.
_NO_AGENT_TEXT = {
    "",
    "none",
    "no",
    "nein",
    "n/a",
    "na",
    "nil",
    "-",
    "0",
    "no contrast",
    "kein",
    "keine",
}

# ImageType values (any position after the first two) that are never pipeline inputs.
_OTHER_IMAGE_TYPE_TOKENS = {
    "LOCALIZER": "localizer",
    "ADC": "diffusion map (ADC)",
    "EADC": "diffusion map (exponential ADC)",
    "TRACEW": "diffusion trace image",
    "DIFFUSION": "diffusion image",
    "FA": "diffusion map (FA)",
    "CALC_BVALUE": "computed b-value image",
    "PERFUSION": "perfusion image",
    "MOSAIC": "EPI mosaic",
    "MPR": "multiplanar reformat",
    "CSA MPR": "multiplanar reformat",
    "CSAPARALLEL": "multiplanar reformat",
    "REFORMATTED": "reformat",
    "PROJECTION IMAGE": "projection (MIP)",
    "MIP": "projection (MIP)",
    "MNIP": "projection (minIP)",
    "MIN IP": "projection (minIP)",
    "COLLAPSE": "projection (MIP)",
    "SUB": "subtraction",
    "SUBTRACTION": "subtraction",
    "MOCO": "motion-corrected time series",
    "SCREEN SAVE": "screen capture",
    "CSA REPORT": "report image",
    "FUSED": "fused image",
    "P": "phase image",
    "PHASE": "phase image",
    "PHASE MAP": "phase image",
    "R": "real-part image",
    "I": "imaginary-part image",
    "REAL": "real-part image",
    "IMAGINARY": "imaginary-part image",
    "T1 MAP": "relaxometry map",
    "T2 MAP": "relaxometry map",
}
_PHILIPS_NON_MAGNITUDE = re.compile(r"^[PRI]_")  # Philips ImageType values P_FFE, R_IR, I_SE

# Enhanced MR AcquisitionContrast (0008,9209) defined terms.
_ACQUISITION_CONTRAST = {
    "T1": SeriesClass.T1_PRE,
    "T2": SeriesClass.T2,
    "FLUID_ATTENUATED": SeriesClass.FLAIR,
    "DIFFUSION": SeriesClass.OTHER,
    "FLOW_ENCODED": SeriesClass.OTHER,
    "PERFUSION": SeriesClass.OTHER,
    "PROTON_DENSITY": SeriesClass.OTHER,
    "STIR": SeriesClass.OTHER,
    "TAGGING": SeriesClass.OTHER,
    "T2_STAR": SeriesClass.OTHER,
    "TOF": SeriesClass.OTHER,
    "SPECTRAL": SeriesClass.OTHER,
}


def _is_empty(value: Any) -> bool:
    return value is None or (
        isinstance(value, str | bytes | list | MultiValue | Sequence) and len(value) == 0
    )


def find_value(ds: Dataset, keyword: str) -> Any:
    """The value of `keyword`: top level first, then inside the functional group macros of an
    enhanced multi-frame image (shared groups, then the first frame's). None when absent/empty.
    """
    value = ds.get(keyword)
    if not _is_empty(value):
        return value
    for group_keyword in _FUNCTIONAL_GROUPS:
        groups = ds.get(group_keyword)
        if not groups:
            continue
        for macro in groups[0]:
            if macro.VR != "SQ" or not macro.value:
                continue
            value = macro.value[0].get(keyword)
            if not _is_empty(value):
                return value
    return None


def attribute_text(ds: Dataset, keyword: str) -> str:
    """`keyword`'s value as text, as DICOM writes it: values joined by backslashes; '' if absent."""
    value = find_value(ds, keyword)
    if value is None or isinstance(value, Sequence):
        return ""
    if isinstance(value, list | tuple | MultiValue):
        return "\\".join(_text(v) for v in value)
    return _text(value)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1", errors="replace")
    if (
        isinstance(value, float)
        and value.is_integer()
        and not getattr(value, "original_string", None)
    ):
        return str(int(value))  # a DS set from a number in code: "1800", as a file would have it
    return str(value)


def _tokens(ds: Dataset, keyword: str) -> tuple[str, ...]:
    text = attribute_text(ds, keyword)
    return tuple(t.strip().upper() for t in text.split("\\") if t.strip())


def _number(value: Any) -> float | None:
    if isinstance(value, list | tuple | MultiValue):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _time(value: Any) -> time | None:
    if _is_empty(value):
        return None
    if isinstance(value, time):
        return value
    try:
        return TM(str(value).strip())
    except ValueError:
        return None


def _ms(value: float | None) -> str:
    return "?" if value is None else f"{value:g} ms"


@dataclass(frozen=True)
class HeaderFacts:
    """The classification evidence of one instance, read once from classic or enhanced MR."""

    modality: str
    sop_class_uid: str
    series_description: str
    protocol_name: str
    sequence_name: str  # Siemens SequenceName, or PulseSequenceName of enhanced MR
    image_type: tuple[str, ...]
    complex_image_component: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    mr_acquisition_type: str
    echo_pulse_sequence: str
    inversion_recovery: bool | None
    inversion_time_ms: float | None
    echo_time_ms: float | None
    repetition_time_ms: float | None
    flip_angle_deg: float | None
    acquisition_contrast: str
    contrast_agent: str
    contrast_volume_ml: float | None
    contrast_dose_ml: float | None
    contrast_route: str
    contrast_administered: bool | None
    contrast_start: time | None
    acquisition_start: time | None

    @property
    def name(self) -> tuple[str, str]:
        """(keyword, text) of the technologist's name for the series."""
        if self.series_description.strip():
            return "SeriesDescription", self.series_description
        return "ProtocolName", self.protocol_name

    @property
    def is_inversion_recovery(self) -> bool:
        if self.inversion_recovery is not None:
            return self.inversion_recovery
        return "IR" in self.scanning_sequence or (self.inversion_time_ms or 0.0) > 0.0

    @property
    def is_echo_planar(self) -> bool:
        return "EP" in self.scanning_sequence

    @property
    def is_gradient_echo(self) -> bool:
        if self.echo_pulse_sequence:
            return self.echo_pulse_sequence == "GRADIENT"
        return "GR" in self.scanning_sequence and "SE" not in self.scanning_sequence


def _coded_meanings(ds: Dataset, keyword: str) -> str:
    items = find_value(ds, keyword)
    if not isinstance(items, Sequence):
        return ""
    return ", ".join(str(item.get("CodeMeaning", "")) for item in items if item.get("CodeMeaning"))


def read_facts(ds: Dataset) -> HeaderFacts:
    """Collect the evidence from a classic (MR Image) or enhanced (multi-frame) MR header."""
    inversion_times = find_value(ds, "InversionTimes")  # enhanced MR: MR Modifier macro
    inversion_time = _number(find_value(ds, "InversionTime"))
    if inversion_time is None:
        inversion_time = _number(inversion_times)
    inversion_recovery = attribute_text(ds, "InversionRecovery").upper()
    administered = attribute_text(ds, "ContrastBolusAgentAdministered").upper()
    agent = attribute_text(ds, "ContrastBolusAgent").strip() or _coded_meanings(
        ds, "ContrastBolusAgentSequence"
    )
    acquisition_datetime = attribute_text(ds, "AcquisitionDateTime")  # enhanced MR: YYYYMMDDHHMMSS
    acquisition_start = _time(ds.get("AcquisitionTime")) or _time(acquisition_datetime[8:])
    return HeaderFacts(
        modality=attribute_text(ds, "Modality").strip().upper(),
        sop_class_uid=attribute_text(ds, "SOPClassUID").strip(),
        series_description=attribute_text(ds, "SeriesDescription").strip(),
        protocol_name=attribute_text(ds, "ProtocolName").strip(),
        sequence_name=(
            attribute_text(ds, "SequenceName") or attribute_text(ds, "PulseSequenceName")
        ).strip(),
        image_type=_tokens(ds, "ImageType") or _tokens(ds, "FrameType"),
        complex_image_component=attribute_text(ds, "ComplexImageComponent").strip().upper(),
        scanning_sequence=_tokens(ds, "ScanningSequence"),
        sequence_variant=_tokens(ds, "SequenceVariant"),
        mr_acquisition_type=attribute_text(ds, "MRAcquisitionType").strip().upper(),
        echo_pulse_sequence=attribute_text(ds, "EchoPulseSequence").strip().upper(),
        inversion_recovery={"YES": True, "NO": False}.get(inversion_recovery),
        inversion_time_ms=inversion_time,
        echo_time_ms=_number(find_value(ds, "EchoTime"))
        or _number(find_value(ds, "EffectiveEchoTime")),
        repetition_time_ms=_number(find_value(ds, "RepetitionTime")),
        flip_angle_deg=_number(find_value(ds, "FlipAngle")),
        acquisition_contrast=attribute_text(ds, "AcquisitionContrast").strip().upper(),
        contrast_agent=agent,
        contrast_volume_ml=_number(find_value(ds, "ContrastBolusVolume")),
        contrast_dose_ml=_number(find_value(ds, "ContrastBolusTotalDose")),
        contrast_route=attribute_text(ds, "ContrastBolusRoute").strip(),
        contrast_administered={"YES": True, "NO": False}.get(administered),
        contrast_start=_time(find_value(ds, "ContrastBolusStartTime")),
        acquisition_start=acquisition_start or _time(ds.get("SeriesTime")),
    )


@dataclass(frozen=True)
class BuiltinDecision:
    series_class: SeriesClass
    reason: str
    rule: str


def _decision(series_class: SeriesClass, rule: str, *evidence: str) -> BuiltinDecision:
    return BuiltinDecision(
        series_class, "; ".join(e for e in evidence if e), BUILTIN_RULE_PREFIX + rule
    )


def non_image_reason(facts: HeaderFacts) -> str | None:
    """Why this object can never be a pipeline input (not an MR image), or None."""
    if not facts.modality:
        return "no Modality in the header, so not known to be an MR image"
    if facts.modality != "MR":
        return f"Modality {facts.modality} is not an MR image"
    if facts.sop_class_uid and facts.sop_class_uid not in _MR_IMAGE_SOP_CLASSES:
        return f"SOP class {UID(facts.sop_class_uid).name} is not an MR image"
    return None


def _image_type_reason(facts: HeaderFacts) -> str | None:
    shown = "\\".join(facts.image_type)
    # Most specific last (DERIVED\PRIMARY\DIFFUSION\ADC), so look from the end.
    for token in reversed(facts.image_type[2:] if len(facts.image_type) > 2 else facts.image_type):
        what = _OTHER_IMAGE_TYPE_TOKENS.get(token)
        if what is None and _PHILIPS_NON_MAGNITUDE.match(token):
            what = "phase/real/imaginary image"
        if what is not None:
            return f"ImageType {shown}: {what}"
    if facts.image_type and facts.image_type[0] == "DERIVED":
        return f"ImageType {shown}: derived image, not an acquisition"
    if "SECONDARY" in facts.image_type[1:2]:
        return f"ImageType {shown}: secondary image, not an acquisition"
    if facts.complex_image_component not in ("", "MAGNITUDE"):
        return f"ComplexImageComponent {facts.complex_image_component}: not a magnitude image"
    return None


def _name_other(keyword: str, text: str) -> str | None:
    for label, pattern in _OTHER_NAME_PATTERNS:
        found = pattern.search(text)
        if found:
            return f"{keyword} '{text}' names a {label} series ('{found.group(0)}')"
    return None


def _name_class(text: str) -> tuple[SeriesClass, str] | None:
    for series_class, pattern in _CLASS_NAME_PATTERNS:
        found = pattern.search(text)
        if found:
            return series_class, found.group(0)
    return None


def _technique(text: str) -> str | None:
    for label, pattern in _TECHNIQUE_NAME_PATTERNS:
        if pattern.search(text):
            return label
    return None


def _label(series_class: SeriesClass) -> str:
    return "T1" if series_class in (SeriesClass.T1_PRE, SeriesClass.T1_POST) else str(series_class)


def _physics(facts: HeaderFacts) -> tuple[SeriesClass | None, str]:
    """What the sequence type and timing say, and the sentence that says it."""
    ti, te, tr = facts.inversion_time_ms, facts.echo_time_ms, facts.repetition_time_ms
    dims = f"{facts.mr_acquisition_type} " if facts.mr_acquisition_type in ("2D", "3D") else ""
    if facts.is_echo_planar:
        return SeriesClass.OTHER, f"{dims}echo-planar readout (diffusion, perfusion or BOLD)"
    if facts.is_inversion_recovery:
        if ti is None:
            return None, f"{dims}inversion recovery without an InversionTime"
        timing = f"{dims}IR with TI {_ms(ti)}, TE {_ms(te)}"
        if ti < _STIR_MAX_TI_MS:
            return SeriesClass.OTHER, f"{timing} (short TI nulls fat: STIR)"
        if _FLAIR_TI_MS[0] <= ti <= _FLAIR_TI_MS[1] and te is not None and te >= _LONG_TE_MS:
            return SeriesClass.FLAIR, f"{timing} (fluid-nulled, T2-weighted: FLAIR)"
        if _T1_PREP_TI_MS[0] <= ti < _T1_PREP_TI_MS[1] and te is not None and te < _SHORT_TE_MS:
            return SeriesClass.T1_PRE, f"{timing} (T1-weighted inversion prepared)"
        return None, f"{timing} (neither the FLAIR nor the T1 pattern)"
    if te is None or tr is None:
        return None, ""
    kind = "gradient echo" if facts.is_gradient_echo else "no IR"
    timing = f"{dims}{kind}, TR {_ms(tr)}, TE {_ms(te)}"
    if facts.is_gradient_echo:
        if te >= 15.0:
            return SeriesClass.OTHER, f"{timing} (long-TE gradient echo: T2*/susceptibility)"
        flip = facts.flip_angle_deg
        if tr < 100.0 and flip is not None and flip >= 15.0:
            return (
                SeriesClass.T1_PRE,
                f"{timing}, flip {flip:g} deg (spoiled gradient echo: T1-weighted)",
            )
        return None, timing
    if tr >= _LONG_TR_MS and te >= _LONG_TE_MS:
        return SeriesClass.T2, f"{timing} (long TR and TE: T2-weighted)"
    if tr < _SHORT_TR_MS and te < _SHORT_TE_MS:
        return SeriesClass.T1_PRE, f"{timing} (short TR and TE: T1-weighted)"
    if tr >= _LONG_TR_MS and te < _SHORT_TE_MS:
        return SeriesClass.OTHER, f"{timing} (long TR, short TE: proton density)"
    return None, timing


def _contrast(facts: HeaderFacts, name_keyword: str, name: str) -> tuple[bool, str]:
    """Is a T1 series post-contrast, and the sentence that says why."""
    tags: list[str] = []
    if facts.contrast_agent.lower() not in _NO_AGENT_TEXT:
        tags.append(f"ContrastBolusAgent '{facts.contrast_agent}'")
    if facts.contrast_administered is True:
        tags.append("ContrastBolusAgentAdministered YES")
    if facts.contrast_volume_ml:
        tags.append(f"ContrastBolusVolume {facts.contrast_volume_ml:g} ml")
    if facts.contrast_dose_ml:
        tags.append(f"ContrastBolusTotalDose {facts.contrast_dose_ml:g} ml")
    if facts.contrast_route and tags:
        tags.append(f"ContrastBolusRoute {facts.contrast_route}")
    header = ", ".join(tags)
    pre_token = _PRE_CONTRAST_PATTERN.search(name)
    # "non-contrast" and "precontrast" must not count as the post token "contrast".
    post_token = _POST_CONTRAST_PATTERN.search(_PRE_CONTRAST_PATTERN.sub(" ", name))
    start, acquired = facts.contrast_start, facts.acquisition_start
    before_bolus = None
    if start is not None and acquired is not None and acquired < start:
        before_bolus = f"acquired at {acquired:%H:%M:%S}, before the bolus start {start:%H:%M:%S}"

    if pre_token and not post_token:
        sentence = f"{name_keyword} token '{pre_token.group(0).strip()}' says pre-contrast"
        if header:
            sentence += f" although the header has {header} (entered for the whole exam?)"
        return False, sentence
    if post_token:
        sentence = f"{name_keyword} token '{post_token.group(0).strip()}' says post-contrast"
        if header:
            sentence += f", and {header}"
        if before_bolus:
            sentence += f", although {before_bolus}"
        return True, sentence
    if facts.contrast_administered is False:
        return False, "ContrastBolusAgentAdministered NO: pre-contrast"
    if before_bolus:
        return False, f"{before_bolus}: pre-contrast" + (f" despite {header}" if header else "")
    if header:
        return True, f"{header}: post-contrast"
    return False, "no contrast agent in the header or name: pre-contrast"


def apply_builtin_rules(facts: HeaderFacts) -> BuiltinDecision:
    """Decide the class of an MR image from its header facts (see the module docstring)."""
    gate = non_image_reason(facts)
    if gate is not None:
        return _decision(SeriesClass.OTHER, "modality", gate)
    image_type = _image_type_reason(facts)
    if image_type is not None:
        return _decision(SeriesClass.OTHER, "image-type", image_type)

    name_keyword, name = facts.name
    shown_name = f"{name_keyword} '{name}'"
    for keyword, text in ((name_keyword, name), ("SequenceName", facts.sequence_name)):
        other = _name_other(keyword, text) if text else None
        if other is not None:
            return _decision(SeriesClass.OTHER, "name", other)

    physics_class, physics_text = _physics(facts)
    signals: list[tuple[str, SeriesClass, str]] = []  # (rule, class, evidence sentence)
    for keyword, text in ((name_keyword, name), ("SequenceName", facts.sequence_name)):
        hit = _name_class(text) if text else None
        if hit is not None:
            signals.append(
                ("name", hit[0], f"{keyword} '{text}' matches {_label(hit[0])} ('{hit[1]}')")
            )
            break
    acquisition_class = _ACQUISITION_CONTRAST.get(facts.acquisition_contrast)
    if acquisition_class is not None:
        signals.append(
            (
                "acquisition-contrast",
                acquisition_class,
                f"AcquisitionContrast {facts.acquisition_contrast}",
            )
        )
    if physics_class is not None:
        signals.append(("physics", physics_class, physics_text))
    elif signals and physics_text:
        signals.append(("physics", signals[0][1], physics_text))  # neutral: timing for the reader

    if not signals:
        technique = _technique(f"{name} {facts.sequence_name}")
        known = ", ".join(
            e
            for e in (
                f"{shown_name} has no known class pattern"
                if name
                else "no SeriesDescription/ProtocolName",
                f"technique {technique}" if technique else "",
                physics_text,
            )
            if e
        )
        return _decision(SeriesClass.OTHER, "no-evidence", f"{known}; cannot tell FLAIR, T1 or T2")

    rule, series_class, first = signals[0]
    evidence = [first]
    for _, other_class, text in signals[1:]:
        if _label(other_class) == _label(series_class):
            evidence.append(text)
        elif series_class is SeriesClass.T2 and other_class is SeriesClass.FLAIR:
            # A "T2" that nulls fluid is a FLAIR (e.g. "t2_tirm_tra" without dark-fluid).
            series_class = SeriesClass.FLAIR
            evidence.append(f"but {text}, so FLAIR")
        else:
            evidence.append(
                f"but {text} suggests {_label(other_class)}; "
                f"the {'name' if rule == 'name' else rule} wins (add an admin rule if wrong)"
            )
    if name and rule != "name":
        evidence.insert(0, f"{shown_name} has no class pattern")

    if series_class is SeriesClass.T1_PRE:
        is_post, sentence = _contrast(facts, name_keyword, name)
        evidence.append(sentence)
        if is_post:
            series_class = SeriesClass.T1_POST
    elif series_class is SeriesClass.FLAIR and facts.contrast_agent.lower() not in _NO_AGENT_TEXT:
        evidence.append(
            f"post-contrast FLAIR (ContrastBolusAgent '{facts.contrast_agent}'), still FLAIR"
        )
    return _decision(series_class, rule, *evidence)
