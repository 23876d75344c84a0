"""Series classification: real Siemens/GE headers, vendor naming conventions, admin rules, table."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    MRSpectroscopyStorage,
    SegmentationStorage,
    generate_uid,
)

from lesionwatch.config.schema import ClassificationConfig, ClassificationRule, SeriesClass
from lesionwatch.dicom_io.classify import (
    Classification,
    classify_directory,
    classify_scan,
    classify_series,
    format_table,
    scan_directory,
)
from lesionwatch.dicom_io.series_files import read_dicom_file

DEFAULT = ClassificationConfig()
FLAIR, T1_PRE, T1_POST, T2, OTHER = (
    SeriesClass.FLAIR,
    SeriesClass.T1_PRE,
    SeriesClass.T1_POST,
    SeriesClass.T2,
    SeriesClass.OTHER,
)

SIEMENS, GE, PHILIPS = "SIEMENS", "GE MEDICAL SYSTEMS", "Philips Medical Systems"


def mr_header(manufacturer: str = SIEMENS, **attributes: Any) -> Dataset:
    """A classic MR Image header with the attributes real scanners write, plus `attributes`."""
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.Manufacturer = manufacturer
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.InstanceNumber = 1
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


# Siemens 2D FLAIR (TIRM dark-fluid), 3D FLAIR SPACE, MPRAGE, TSE.
SIEMENS_FLAIR_2D = dict(
    SeriesDescription="t2_tirm_tra_dark-fluid",
    ProtocolName="t2_tirm_tra_dark-fluid",
    SequenceName="*tir2d1_16",
    ScanningSequence=["SE", "IR"],
    SequenceVariant=["SK", "SP", "MP"],
    MRAcquisitionType="2D",
    InversionTime=2500,
    EchoTime=81,
    RepetitionTime=9000,
    FlipAngle=150,
)
SIEMENS_FLAIR_3D = dict(
    SeriesDescription="t2_space_dark-fluid_sag_p2_iso",
    SequenceName="*spcir_278ns",
    ScanningSequence=["SE", "IR"],
    SequenceVariant=["SK", "SP", "MP"],
    MRAcquisitionType="3D",
    InversionTime=1800,
    EchoTime=386,
    RepetitionTime=5000,
    FlipAngle=120,
)
SIEMENS_MPRAGE = dict(
    SeriesDescription="t1_mprage_sag_p2_iso",
    SequenceName="*tfl3d1_16ns",
    ScanningSequence=["GR", "IR"],
    SequenceVariant=["SP", "MP"],
    MRAcquisitionType="3D",
    InversionTime=900,
    EchoTime=2.32,
    RepetitionTime=2300,
    FlipAngle=8,
)
SIEMENS_T2 = dict(
    SeriesDescription="t2_tse_tra_p2",
    SequenceName="*tse2d1_17",
    ScanningSequence="SE",
    SequenceVariant=["SK", "SP"],
    MRAcquisitionType="2D",
    EchoTime=100,
    RepetitionTime=5000,
)
# GE: SE\IR FLAIR, CUBE FLAIR, BRAVO, T1 FLAIR (a T1-weighted SE-IR), FSE.
GE_FLAIR_2D = dict(
    SeriesDescription="AX T2 FLAIR",
    ProtocolName="MS BRAIN W WO",
    ScanningSequence=["SE", "IR"],
    SequenceVariant=["SK", "SS"],
    MRAcquisitionType="2D",
    InversionTime=2500,
    EchoTime=120,
    RepetitionTime=9000,
)
GE_FLAIR_3D = dict(
    SeriesDescription="Sag CUBE FLAIR",
    ProtocolName="MS BRAIN W WO",
    ScanningSequence=["SE", "IR"],
    MRAcquisitionType="3D",
    InversionTime=1802,
    EchoTime=128,
    RepetitionTime=6000,
)
GE_BRAVO = dict(
    SeriesDescription="Sag 3D T1 BRAVO",
    ScanningSequence=["GR", "IR"],
    SequenceVariant=["SK", "SP"],
    MRAcquisitionType="3D",
    InversionTime=450,
    EchoTime=3.1,
    RepetitionTime=8.2,
    FlipAngle=12,
)
GE_T1_FLAIR = dict(
    SeriesDescription="AX T1 FLAIR",
    ScanningSequence=["SE", "IR"],
    MRAcquisitionType="2D",
    InversionTime=860,
    EchoTime=9,
    RepetitionTime=2200,
)
GE_T2 = dict(
    SeriesDescription="AX T2 FSE",
    ScanningSequence="SE",
    MRAcquisitionType="2D",
    EchoTime=102,
    RepetitionTime=4500,
)
# Philips: VISTA FLAIR, T1 TFE (no TI written), T1 SE, T2 TSE.
PHILIPS_FLAIR_3D = dict(
    SeriesDescription="3D_Brain_VIEW_FLAIR_SHC",
    ProtocolName="WIP 3D_Brain_VIEW_FLAIR_SHC",
    ScanningSequence=["SE", "IR"],
    MRAcquisitionType="3D",
    InversionTime=1650,
    EchoTime=335,
    RepetitionTime=4800,
)
PHILIPS_FLAIR_2D = dict(
    SeriesDescription="FLAIR_longTR",
    ScanningSequence=["SE", "IR"],
    MRAcquisitionType="2D",
    InversionTime=2800,
    EchoTime=125,
    RepetitionTime=11000,
)
PHILIPS_T1_TFE = dict(
    SeriesDescription="T1W_3D_TFE",
    ScanningSequence="GR",
    SequenceVariant=["SK", "SP"],
    MRAcquisitionType="3D",
    EchoTime=3.7,
    RepetitionTime=8.1,
    FlipAngle=8,
)
PHILIPS_T1_SE = dict(
    SeriesDescription="T1W_SE",
    ScanningSequence="SE",
    MRAcquisitionType="2D",
    EchoTime=10,
    RepetitionTime=550,
)
PHILIPS_T2 = dict(
    SeriesDescription="T2W_TSE",
    ScanningSequence="SE",
    MRAcquisitionType="2D",
    EchoTime=100,
    RepetitionTime=3000,
)
GADOVIST = dict(ContrastBolusAgent="Gadovist", ContrastBolusVolume=7.5, ContrastBolusRoute="IV")


def variant(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


CASES = [
    # (id, manufacturer, attributes, class, words the reason must contain)
    ("siemens-flair-2d", SIEMENS, SIEMENS_FLAIR_2D, FLAIR, ["dark-fluid", "TI 2500 ms", "FLAIR"]),
    (
        "siemens-flair-3d-space",
        SIEMENS,
        SIEMENS_FLAIR_3D,
        FLAIR,
        ["dark-fluid", "3D IR", "TI 1800"],
    ),
    (
        "siemens-flair-spc_ir",
        SIEMENS,
        variant(SIEMENS_FLAIR_3D, SeriesDescription="spc_ir_sag_iso"),
        FLAIR,
        ["spc_ir"],
    ),
    (
        "siemens-flair-by-sequence-name",
        SIEMENS,
        variant(SIEMENS_FLAIR_3D, SeriesDescription="sag iso"),
        FLAIR,
        ["SequenceName '*spcir_278ns'"],
    ),
    (
        "siemens-mprage-pre",
        SIEMENS,
        SIEMENS_MPRAGE,
        T1_PRE,
        ["mprage", "TI 900 ms", "pre-contrast"],
    ),
    (
        "siemens-mprage-post-agent",
        SIEMENS,
        variant(SIEMENS_MPRAGE, **GADOVIST),
        T1_POST,
        ["ContrastBolusAgent 'Gadovist'", "ContrastBolusVolume 7.5 ml"],
    ),
    (
        "siemens-mprage-post-km",
        SIEMENS,
        variant(SIEMENS_MPRAGE, SeriesDescription="t1_mprage_sag_KM"),
        T1_POST,
        ["'KM'"],
    ),
    ("siemens-t2-tse", SIEMENS, SIEMENS_T2, T2, ["t2_tse", "long TR and TE"]),
    (
        "siemens-localizer",
        SIEMENS,
        dict(
            SeriesDescription="AAHead_Scout_32ch-head-coil",
            SequenceName="*fl2d1",
            ScanningSequence="GR",
            EchoTime=4,
            RepetitionTime=8.6,
            FlipAngle=20,
        ),
        OTHER,
        ["localizer"],
    ),
    (
        "siemens-adc",
        SIEMENS,
        dict(
            SeriesDescription="ep2d_diff_tra_ADC",
            ScanningSequence="EP",
            ImageType=["DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"],
        ),
        OTHER,
        ["ADC"],
    ),
    (
        "siemens-flair-mpr",
        SIEMENS,
        variant(
            SIEMENS_FLAIR_3D,
            SeriesDescription="t2_space_dark-fluid_sag_p2_iso_MPR_tra",
            ImageType=["DERIVED", "PRIMARY", "MPR", "ND"],
        ),
        OTHER,
        ["multiplanar reformat"],
    ),
    (
        "siemens-subtraction",
        SIEMENS,
        variant(
            SIEMENS_MPRAGE,
            SeriesDescription="t1_mprage_SUB",
            ImageType=["DERIVED", "PRIMARY", "SUBTRACTION", "ND"],
        ),
        OTHER,
        ["subtraction"],
    ),
    (
        "siemens-phase",
        SIEMENS,
        variant(SIEMENS_MPRAGE, ImageType=["ORIGINAL", "PRIMARY", "P", "ND"]),
        OTHER,
        ["phase image"],
    ),
    (
        "siemens-swi",
        SIEMENS,
        dict(SeriesDescription="SWI_Images", ScanningSequence="GR", EchoTime=20, RepetitionTime=27),
        OTHER,
        ["susceptibility"],
    ),
    (
        "siemens-t2star",
        SIEMENS,
        dict(SeriesDescription="t2_fl2d_tra_hemo", ScanningSequence="GR"),
        OTHER,
        ["susceptibility"],
    ),
    (
        "siemens-mp2rage-uni",
        SIEMENS,
        variant(SIEMENS_MPRAGE, SeriesDescription="mp2rage_UNI_Images"),
        OTHER,
        ["mp2rage"],
    ),
    ("ge-flair-2d", GE, GE_FLAIR_2D, FLAIR, ["AX T2 FLAIR", "TI 2500 ms, TE 120 ms"]),
    ("ge-cube-flair", GE, GE_FLAIR_3D, FLAIR, ["Sag CUBE FLAIR", "3D IR"]),
    ("ge-bravo-pre", GE, GE_BRAVO, T1_PRE, ["BRAVO", "TI 450 ms"]),
    ("ge-3d-t1-plus-c", GE, variant(GE_BRAVO, SeriesDescription="3D T1 +C"), T1_POST, ["'+C'"]),
    (
        "ge-ax-t1-post",
        GE,
        variant(GE_T1_FLAIR, SeriesDescription="AX T1 FLAIR POST"),
        T1_POST,
        ["'POST'"],
    ),
    ("ge-t1-flair-is-t1", GE, GE_T1_FLAIR, T1_PRE, ["T1 FLAIR", "TI 860 ms"]),
    ("ge-t2-fse", GE, GE_T2, T2, ["AX T2 FSE"]),
    (
        "ge-mprage-exam-protocol-ignored",
        GE,
        variant(GE_BRAVO, SeriesDescription="Sag MPRAGE", ProtocolName="BRAIN WITH CONTRAST"),
        T1_PRE,
        ["pre-contrast"],
    ),
    (
        "ge-localizer",
        GE,
        dict(SeriesDescription="3-Plane Loc", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
        OTHER,
        ["localizer"],
    ),
    (
        "ge-reformat",
        GE,
        variant(
            GE_FLAIR_3D,
            SeriesDescription="Ax CUBE FLAIR REFORMAT",
            ImageType=["DERIVED", "SECONDARY", "REFORMATTED", "AVERAGE"],
        ),
        OTHER,
        ["reformat"],
    ),
    (
        "ge-asset-cal",
        GE,
        dict(SeriesDescription="ASSET cal", ScanningSequence="GR"),
        OTHER,
        ["calibration"],
    ),
    ("philips-vista-flair", PHILIPS, PHILIPS_FLAIR_3D, FLAIR, ["VIEW_FLAIR", "TI 1650 ms"]),
    ("philips-flair-2d", PHILIPS, PHILIPS_FLAIR_2D, FLAIR, ["FLAIR_longTR"]),
    ("philips-t1-tfe-pre", PHILIPS, PHILIPS_T1_TFE, T1_PRE, ["T1W_3D_TFE", "pre-contrast"]),
    (
        "philips-t1-tfe-post",
        PHILIPS,
        variant(PHILIPS_T1_TFE, SeriesDescription="sT1W_3D_TFE_post"),
        T1_POST,
        ["'post'"],
    ),
    (
        "philips-t1-se-gd",
        PHILIPS,
        variant(PHILIPS_T1_SE, SeriesDescription="T1 SE +GD"),
        T1_POST,
        ["'+GD'"],
    ),
    ("philips-t1-se-pre", PHILIPS, PHILIPS_T1_SE, T1_PRE, ["short TR and TE"]),
    ("philips-t2-tse", PHILIPS, PHILIPS_T2, T2, ["T2W_TSE"]),
    ("philips-survey", PHILIPS, dict(SeriesDescription="SURVEY_BRAIN"), OTHER, ["localizer"]),
    (
        "philips-adc",
        PHILIPS,
        dict(SeriesDescription="DWI_ADC", ImageType=["DERIVED", "PRIMARY", "ADC", "ADC"]),
        OTHER,
        ["ADC"],
    ),
    (
        "philips-pd-t2-dual-echo",
        PHILIPS,
        variant(PHILIPS_T2, SeriesDescription="PD/T2_TSE"),
        OTHER,
        ["proton density"],
    ),
]


@pytest.mark.parametrize(
    ("manufacturer", "attributes", "expected", "words"),
    [pytest.param(m, a, e, w, id=i) for i, m, a, e, w in CASES],
)
def test_vendor_naming_conventions(
    manufacturer: str, attributes: dict[str, Any], expected: SeriesClass, words: list[str]
) -> None:
    result = classify_series(mr_header(manufacturer, **attributes), DEFAULT)
    assert result.series_class is expected, result.reason
    for word in words:
        assert word.lower() in result.reason.lower(), f"{word!r} missing from: {result.reason}"
    assert result.rule.startswith("builtin:")


def test_real_siemens_t1_is_t1_pre(siemens_t1_dir: Path) -> None:
    ds = read_dicom_file(next(iter(sorted(siemens_t1_dir.iterdir()))), stop_before_pixels=True)
    result = classify_series(ds, DEFAULT)
    assert result == Classification(
        T1_PRE,
        "SeriesDescription 'anat-T1w_acq-tfl' matches T1 ('T1'); 3D IR with TI 900 ms, TE 2.41 ms "
        "(T1-weighted inversion prepared); no contrast agent in the header or name: pre-contrast",
        "builtin:name",
    )


def test_real_ge_t1_is_t1_pre(ge_t1_dir: Path) -> None:
    rows = classify_directory(ge_t1_dir, DEFAULT)
    assert len(rows) == 1
    row = rows[0]
    assert (row.series_class, row.series_number, row.instance_count) == (T1_PRE, 5, 130)
    assert row.manufacturer == "GE MEDICAL SYSTEMS"
    assert "'3D Ax T1 MP-RAGE_R22' matches T1" in row.reason
    assert "IR with TI 1000 ms, TE 3.172 ms" in row.reason  # ScanningSequence RM\IR
    assert "pre-contrast" in row.reason


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("Ax T1 SE pre", T1_PRE),
        ("T1 nativ", T1_PRE),
        ("T1 w/o", T1_PRE),
        ("non-contrast T1", T1_PRE),
        ("T1 precontrast", T1_PRE),
        ("AX T1 -C", T1_PRE),
        ("T1 post", T1_POST),
        ("T1+C", T1_POST),
        ("AX T1 C+", T1_POST),
        ("T1 Gd", T1_POST),
        ("t1_se_tra_ce", T1_POST),
        ("T1 mit KM", T1_POST),
        ("T1 postcontrast", T1_POST),
        ("T1 with contrast", T1_POST),
        ("T1CE", T1_POST),
        ("T1 posterior fossa", T1_PRE),
    ],
)
def test_contrast_tokens_in_description(description: str, expected: SeriesClass) -> None:
    ds = mr_header(PHILIPS, **variant(PHILIPS_T1_SE, SeriesDescription=description))
    assert classify_series(ds, DEFAULT).series_class is expected


def test_description_t1_with_agent_tag_is_post() -> None:
    ds = mr_header(
        GE, **variant(GE_BRAVO, SeriesDescription="Sag 3D T1", ContrastBolusAgent="DOTAREM")
    )
    result = classify_series(ds, DEFAULT)
    assert result.series_class is T1_POST
    assert "ContrastBolusAgent 'DOTAREM': post-contrast" in result.reason


@pytest.mark.parametrize("agent", ["", "NONE", "no", "N/A"])
def test_empty_agent_text_is_not_contrast(agent: str) -> None:
    ds = mr_header(GE, **variant(GE_BRAVO, ContrastBolusAgent=agent))
    assert classify_series(ds, DEFAULT).series_class is T1_PRE


def test_explicit_pre_beats_exam_level_agent_and_says_so() -> None:
    ds = mr_header(
        SIEMENS, **variant(SIEMENS_MPRAGE, SeriesDescription="t1_mprage_pre", **GADOVIST)
    )
    result = classify_series(ds, DEFAULT)
    assert result.series_class is T1_PRE
    assert (
        "'pre' says pre-contrast although the header has ContrastBolusAgent 'Gadovist'"
        in result.reason
    )


def test_acquired_before_bolus_start_is_pre() -> None:
    timing = dict(ContrastBolusStartTime="102000", AcquisitionTime="101234.500")
    pre = classify_series(
        mr_header(SIEMENS, **variant(SIEMENS_MPRAGE, **GADOVIST, **timing)), DEFAULT
    )
    assert pre.series_class is T1_PRE
    assert "acquired at 10:12:34, before the bolus start 10:20:00" in pre.reason
    later = variant(SIEMENS_MPRAGE, **GADOVIST, **{**timing, "AcquisitionTime": "103000"})
    assert classify_series(mr_header(SIEMENS, **later), DEFAULT).series_class is T1_POST


def test_flair_name_with_t1_timing_keeps_flair_and_says_so() -> None:
    ds = mr_header(
        GE, **variant(GE_FLAIR_2D, SeriesDescription="AX FLAIR", InversionTime=800, EchoTime=10)
    )
    result = classify_series(ds, DEFAULT)
    assert result.series_class is FLAIR
    assert "but 2D IR with TI 800 ms, TE 10 ms" in result.reason
    assert "suggests T1" in result.reason


def test_t2_name_with_fluid_nulling_is_flair() -> None:
    ds = mr_header(SIEMENS, **variant(SIEMENS_FLAIR_2D, SeriesDescription="t2_tirm_tra"))
    result = classify_series(ds, DEFAULT)
    assert result.series_class is FLAIR
    assert "matches T2" in result.reason and "so FLAIR" in result.reason


def test_post_contrast_flair_stays_flair() -> None:
    ds = mr_header(GE, **variant(GE_FLAIR_2D, SeriesDescription="AX T2 FLAIR +C", **GADOVIST))
    result = classify_series(ds, DEFAULT)
    assert result.series_class is FLAIR
    assert "post-contrast FLAIR" in result.reason


@pytest.mark.parametrize(
    ("attributes", "expected", "words"),
    [
        (
            variant(GE_FLAIR_2D, SeriesDescription="Ax Brain 5mm"),
            FLAIR,
            ["no class pattern", "fluid-nulled"],
        ),
        (
            variant(SIEMENS_MPRAGE, SeriesDescription="sag iso", SequenceName="*fl3d1"),
            T1_PRE,
            ["T1-weighted inversion prepared"],
        ),
        (variant(GE_T2, SeriesDescription="Ax 5mm"), T2, ["long TR and TE"]),
        (
            dict(
                SeriesDescription="Ax 5mm",
                ScanningSequence=["SE", "IR"],
                InversionTime=160,
                EchoTime=40,
                RepetitionTime=5000,
            ),
            OTHER,
            ["STIR"],
        ),
        (
            dict(
                SeriesDescription="Ax 5mm", ScanningSequence="SE", EchoTime=12, RepetitionTime=3000
            ),
            OTHER,
            ["proton density"],
        ),
        (
            dict(
                SeriesDescription="Ax 5mm", ScanningSequence="EP", EchoTime=90, RepetitionTime=6000
            ),
            OTHER,
            ["echo-planar"],
        ),
        (dict(SeriesDescription="Ax 5mm"), OTHER, ["cannot tell FLAIR, T1 or T2"]),
        (dict(), OTHER, ["no SeriesDescription/ProtocolName"]),
    ],
    ids=["flair", "mprage", "t2", "stir", "pd", "epi", "nothing", "no-name"],
)
def test_physics_decides_when_names_are_silent(
    attributes: dict[str, Any], expected: SeriesClass, words: list[str]
) -> None:
    result = classify_series(mr_header(SIEMENS, **attributes), DEFAULT)
    assert result.series_class is expected, result.reason
    for word in words:
        assert word in result.reason


def test_malformed_values_do_not_crash_and_are_shown_as_unknown() -> None:
    ds = mr_header(GE, SeriesDescription="AX FLAIR", ScanningSequence=["SE", "IR"])
    # As read from a file whose scanner wrote junk: invalid DS and TM values.
    for keyword, vr, raw in (
        ("EchoTime", "DS", b"abc "),
        ("InversionTime", "DS", b"2500"),
        ("AcquisitionTime", "TM", b"99xx"),
        ("ContrastBolusStartTime", "TM", b"1200"),
    ):
        tag = Tag(keyword)
        ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    result = classify_series(ds, DEFAULT)
    assert result.series_class is FLAIR
    assert "IR with TI 2500 ms, TE ?" in result.reason


def _functional_group(**macros: Dataset) -> Dataset:
    group = Dataset()
    for keyword, item in macros.items():
        setattr(group, keyword, Sequence([item]))
    return group


def test_enhanced_mr_reads_functional_groups_and_acquisition_contrast() -> None:
    ds = mr_header(PHILIPS, SeriesDescription="WIP Brain 3D", MRAcquisitionType="3D")
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.AcquisitionContrast = "FLUID_ATTENUATED"
    timing, echo, modifier = Dataset(), Dataset(), Dataset()
    timing.RepetitionTime, timing.FlipAngle = 4800, 90
    echo.EffectiveEchoTime = 335
    modifier.InversionRecovery, modifier.InversionTimes = "YES", [1650]
    ds.SharedFunctionalGroupsSequence = Sequence(
        [
            _functional_group(
                MRTimingAndRelatedParametersSequence=timing,
                MREchoSequence=echo,
                MRModifierSequence=modifier,
            )
        ]
    )
    result = classify_series(ds, DEFAULT)
    assert result.series_class is FLAIR
    assert result.rule == "builtin:acquisition-contrast"
    assert "AcquisitionContrast FLUID_ATTENUATED; 3D IR with TI 1650 ms, TE 335 ms" in result.reason


def test_enhanced_mr_contrast_usage_sequence_marks_post() -> None:
    ds = mr_header(PHILIPS, **PHILIPS_T1_TFE)
    ds.SOPClassUID = EnhancedMRImageStorage
    usage = Dataset()
    usage.ContrastBolusAgentNumber, usage.ContrastBolusAgentAdministered = 1, "YES"
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [_functional_group(ContrastBolusUsageSequence=usage)]
    )
    result = classify_series(ds, DEFAULT)
    assert result.series_class is T1_POST
    assert "ContrastBolusAgentAdministered YES" in result.reason


@pytest.mark.parametrize(
    ("modality", "sop_class", "words"),
    [
        ("SEG", SegmentationStorage, "Modality SEG is not an MR image"),
        ("SR", "1.2.840.10008.5.1.4.1.1.88.33", "Modality SR"),
        ("OT", "1.2.840.10008.5.1.4.1.1.7", "Modality OT"),
        ("MR", MRSpectroscopyStorage, "SOP class MR Spectroscopy Storage is not an MR image"),
        ("MR", "1.2.840.10008.5.1.4.1.1.7", "SOP class Secondary Capture Image Storage"),
    ],
)
def test_non_images_are_other_even_when_a_rule_matches(
    modality: str, sop_class: str, words: str
) -> None:
    ds = mr_header(SIEMENS, **SIEMENS_FLAIR_2D)
    ds.Modality, ds.SOPClassUID = modality, sop_class
    config = ClassificationConfig(
        rules=(
            ClassificationRule(
                name="flair", series_class=FLAIR, match={"SeriesDescription": "dark-fluid"}
            ),
        )
    )
    result = classify_series(ds, config)
    assert (result.series_class, result.rule) == (OTHER, "builtin:modality")
    assert words in result.reason


def test_admin_rule_overrides_builtin_decision() -> None:
    # This site uses the scanner's MPR of its 3D FLAIR; built-in rules reject derived images.
    ds = mr_header(
        SIEMENS,
        **variant(
            SIEMENS_FLAIR_3D,
            SeriesDescription="t2_space_dark-fluid_MPR_tra",
            ImageType=["DERIVED", "PRIMARY", "MPR", "ND"],
        ),
    )
    assert classify_series(ds, DEFAULT).series_class is OTHER
    config = ClassificationConfig(
        rules=(
            ClassificationRule(
                name="never-matches", series_class=T2, match={"SeriesDescription": "^t2_tse"}
            ),
            ClassificationRule(
                name="site-flair-mpr",
                series_class=FLAIR,
                match={
                    "SeriesDescription": r"dark-fluid.*mpr",
                    "ImageType": r"\\MPR\\",
                    "InversionTime": r"^1[0-9]{3}$",
                },
            ),
        )
    )
    result = classify_series(ds, config)
    assert result == Classification(
        FLAIR,
        "admin rule 'site-flair-mpr': SeriesDescription 't2_space_dark-fluid_MPR_tra' matches "
        r"/dark-fluid.*mpr/, ImageType 'DERIVED\PRIMARY\MPR\ND' matches /\\MPR\\/, "
        "InversionTime '1800' matches /^1[0-9]{3}$/",
        "admin:site-flair-mpr",
    )


def test_admin_rule_needs_every_pattern_and_can_require_absence() -> None:
    plain = mr_header(SIEMENS, **SIEMENS_MPRAGE)
    with_agent = mr_header(SIEMENS, **variant(SIEMENS_MPRAGE, **GADOVIST))
    rule = ClassificationRule(
        name="mprage-without-agent-is-pre",
        series_class=T1_PRE,
        match={"SequenceName": r"^\*tfl", "ContrastBolusAgent": "^$"},
    )
    config = ClassificationConfig(rules=(rule,))
    assert classify_series(plain, config).rule == "admin:mprage-without-agent-is-pre"
    fallback = classify_series(with_agent, config)
    assert (fallback.series_class, fallback.rule) == (T1_POST, "builtin:name")


def test_builtin_rules_can_be_switched_off() -> None:
    result = classify_series(
        mr_header(SIEMENS, **SIEMENS_FLAIR_2D), ClassificationConfig(use_builtin_rules=False)
    )
    assert (result.series_class, result.rule) == (OTHER, "none")
    assert "built-in rules are off" in result.reason


def test_rule_with_unknown_keyword_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="'SeriesDescripton' is not a DICOM keyword"):
        ClassificationRule(name="typo", series_class=FLAIR, match={"SeriesDescripton": "flair"})


def _write(ds: Dataset, path: Path, *, gzipped: bool = False) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plain = path.with_suffix("") if gzipped else path
    ds.save_as(plain, enforce_file_format=True)
    if gzipped:
        path.write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()


def test_directory_table_groups_series_and_skips_non_dicom(
    tmp_path: Path, siemens_t1_dir: Path
) -> None:
    shutil.copytree(siemens_t1_dir, tmp_path / "siemens")  # 96 real .dcm.gz files
    flair_uid = generate_uid()
    (tmp_path / "ge").mkdir()
    for number, name in ((3, "a.dcm"), (1, "b"), (2, "c.dcm.gz")):
        ds = mr_header(GE, **GE_FLAIR_2D, SeriesNumber=4, InstanceNumber=number)
        ds.SeriesInstanceUID = flair_uid
        _write(ds, tmp_path / "ge" / name, gzipped=name.endswith(".gz"))
    seg = mr_header(GE, SeriesDescription="FLAIR lesions", SeriesNumber=1001, Modality="SEG")
    seg.SOPClassUID = SegmentationStorage
    _write(seg, tmp_path / "seg.dcm")
    (tmp_path / "notes.txt").write_text("not DICOM")
    (tmp_path / "export.json.gz").write_bytes(gzip.compress(b'{"a": 1}'))

    scan = scan_directory(tmp_path)
    assert sorted(s.path.name for s in scan.skipped) == ["export.json.gz", "notes.txt"]
    rows = classify_scan(scan, DEFAULT)
    assert [(r.series_number, r.series_class, r.instance_count) for r in rows] == [
        (4, FLAIR, 3),
        (1001, OTHER, 1),
        (5001, T1_PRE, 96),
    ]
    assert rows == classify_directory(tmp_path, DEFAULT)

    table = format_table(rows, skipped_files=len(scan.skipped)).splitlines()
    assert table[0].split() == [
        "Series",
        "Series",
        "Instance",
        "UID",
        "Vendor",
        "Description",
        "Images",
        "Class",
        "Reason",
    ]
    assert set(table[1]) == {"-", " "}
    assert table[-1] == "3 series, 100 instances, 2 files skipped (not DICOM series members)"
    body = table[2:-1]
    assert [line.split()[0] for line in body] == ["4", "1001", "5001"]
    class_column = table[0].index("Class")
    assert [line[class_column:].split()[0] for line in body] == ["FLAIR", "OTHER", "T1_PRE"]
    assert body[0][table[0].index("Series Instance UID") :].startswith(flair_uid)
    assert "Siemens Healthineers" in body[2] and "anat-T1w_acq-tfl" in body[2]
    assert body[1].endswith("Modality SEG is not an MR image")


def test_directory_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing: no such directory"):
        scan_directory(tmp_path / "missing")
    (tmp_path / "file.dcm").write_text("x")
    with pytest.raises(NotADirectoryError, match="file.dcm: not a directory"):
        scan_directory(tmp_path / "file.dcm")


def test_real_test_data_folder(test_data: Path) -> None:
    # The reference NIfTI/JSON files next to the two real series are skipped, not fatal.
    scan = scan_directory(test_data / "dicom_t1")
    assert len(scan.skipped) == 5
    rows = classify_scan(scan, DEFAULT)
    assert [(r.manufacturer, r.series_class) for r in rows] == [
        ("GE MEDICAL SYSTEMS", T1_PRE),
        ("Siemens Healthineers", T1_PRE),
    ]
