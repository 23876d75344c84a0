"""Realistic MR acquisition and equipment attributes per contrast and vendor.

Used to give NIfTI-derived test and demo series the headers a classifier sees on real
scanners. Equipment values follow the real Siemens Prisma (XA30) and GE SIGNA Pioneer
series in tests/data/dicom_t1; sequence names and parameters follow the vendors' usual
protocols (Siemens tir/tfl/tse/spc sequence names, GE *_GEMS scan options). Only standard
attributes are produced: the written series carry no private tags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lesionwatch.config.schema import SeriesClass

__all__ = [
    "AcquisitionProfile",
    "Vendor",
    "VendorProfile",
    "acquisition_profile",
    "vendor_profile",
]

Vendor = Literal["siemens", "ge"]


@dataclass(frozen=True)
class VendorProfile:
    manufacturer: str
    model_name: str
    software_versions: tuple[str, ...]
    magnetic_field_strength_t: float
    imaging_frequency_mhz: float
    station_name: str
    receive_coil_name: str
    institution_name: str = "LesionWatch Demo Hospital"


_VENDORS: dict[str, VendorProfile] = {
    "siemens": VendorProfile(
        manufacturer="Siemens Healthineers",
        model_name="MAGNETOM Prisma Fit",
        software_versions=("syngo MR XA30",),
        magnetic_field_strength_t=3.0,
        imaging_frequency_mhz=123.262464,
        station_name="MRC99001",
        receive_coil_name="HeadNeck_64",
    ),
    "ge": VendorProfile(
        manufacturer="GE MEDICAL SYSTEMS",
        model_name="SIGNA Pioneer",
        software_versions=("28", "LX", "MR29.1_EA_2039.g"),
        magnetic_field_strength_t=3.0,
        imaging_frequency_mhz=127.7277,
        station_name="00099001",
        receive_coil_name="48HA",
    ),
}


@dataclass(frozen=True)
class AcquisitionProfile:
    """MR Image module values of one protocol."""

    series_description: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    mr_acquisition_type: Literal["2D", "3D"]
    sequence_name: str | None  # GE does not fill (0018,0024) on these protocols
    repetition_time_ms: float
    echo_time_ms: float
    inversion_time_ms: float | None
    echo_train_length: int
    flip_angle_deg: float
    image_type: tuple[str, ...]
    contrast_agent: bool = False

    @property
    def protocol_name(self) -> str:
        return self.series_description


def vendor_profile(vendor: Vendor) -> VendorProfile:
    try:
        return _VENDORS[vendor]
    except KeyError:
        raise ValueError(f"unknown vendor {vendor!r}; choose one of {sorted(_VENDORS)}") from None


def _siemens(contrast: SeriesClass, three_d: bool) -> AcquisitionProfile:
    image_type = ("ORIGINAL", "PRIMARY", "M", "NORM", "DIS3D" if three_d else "DIS2D")
    if contrast is SeriesClass.FLAIR:
        if three_d:
            return AcquisitionProfile(
                "t2_space_dark-fluid_sag_p3_iso",
                ("SE", "IR"),
                ("SK", "SP", "MP"),
                ("IR",),
                "3D",
                "*spcir_278ns",
                5000.0,
                387.0,
                1800.0,
                278,
                120.0,
                image_type,
            )
        return AcquisitionProfile(
            "t2_tirm_tra_dark-fluid",
            ("SE", "IR"),
            ("SK", "SP", "MP"),
            ("IR",),
            "2D",
            "*tir2d1_16",
            9000.0,
            81.0,
            2500.0,
            16,
            150.0,
            image_type,
        )
    if contrast in (SeriesClass.T1_PRE, SeriesClass.T1_POST):
        post = contrast is SeriesClass.T1_POST
        if three_d:
            return AcquisitionProfile(
                "t1_mprage_sag_p2_iso" + ("_post" if post else ""),
                ("GR", "IR"),
                ("SK", "SP", "MP"),
                ("IR",),
                "3D",
                "*tfl3d1_16ns",
                2300.0,
                2.98,
                900.0,
                1,
                9.0,
                image_type,
                contrast_agent=post,
            )
        return AcquisitionProfile(
            "t1_fl2d_tra" + ("_post" if post else ""),
            ("GR",),
            ("SP", "OSP"),
            ("PFP",),
            "2D",
            "*fl2d1",
            250.0,
            2.46,
            None,
            1,
            70.0,
            image_type,
            contrast_agent=post,
        )
    if contrast is SeriesClass.T2:
        if three_d:
            return AcquisitionProfile(
                "t2_spc_sag_p2_iso",
                ("SE",),
                ("SK", "SP", "OSP"),
                ("PFP",),
                "3D",
                "*spc_283ns",
                3200.0,
                408.0,
                None,
                283,
                120.0,
                image_type,
            )
        return AcquisitionProfile(
            "t2_tse_tra",
            ("SE",),
            ("SK", "SP", "OSP"),
            ("PFP",),
            "2D",
            "*tse2d1_15",
            5000.0,
            95.0,
            None,
            15,
            150.0,
            image_type,
        )
    raise ValueError(f"no MR header profile for series class {contrast}")


def _ge(contrast: SeriesClass, three_d: bool) -> AcquisitionProfile:
    image_type = ("ORIGINAL", "PRIMARY", "OTHER")
    if contrast is SeriesClass.FLAIR:
        if three_d:
            return AcquisitionProfile(
                "Sag CUBE T2 FLAIR",
                ("SE", "IR"),
                ("SK", "SS"),
                ("FAST_GEMS", "EDR_GEMS", "FILTERED_GEMS", "ACC_GEMS", "IR_GEMS"),
                "3D",
                None,
                6000.0,
                140.0,
                1800.0,
                200,
                90.0,
                image_type,
            )
        return AcquisitionProfile(
            "Ax T2 FLAIR",
            ("SE", "IR"),
            ("SK", "OSP"),
            ("FAST_GEMS", "EDR_GEMS", "FILTERED_GEMS", "IR_GEMS"),
            "2D",
            None,
            9000.0,
            120.0,
            2500.0,
            24,
            160.0,
            image_type,
        )
    if contrast in (SeriesClass.T1_PRE, SeriesClass.T1_POST):
        post = contrast is SeriesClass.T1_POST
        if three_d:
            return AcquisitionProfile(
                "3D Ax T1 MP-RAGE" + (" +C" if post else ""),
                ("GR", "IR"),
                ("SS", "SK"),
                ("FAST_GEMS", "EDR_GEMS", "FILTERED_GEMS", "ACC_GEMS", "IR_GEMS"),
                "3D",
                None,
                2217.66,
                3.172,
                1000.0,
                1,
                8.0,
                image_type,
                contrast_agent=post,
            )
        return AcquisitionProfile(
            "Ax T1 SE" + (" +C" if post else ""),
            ("SE",),
            ("NONE",),
            ("FILTERED_GEMS",),
            "2D",
            None,
            550.0,
            10.0,
            None,
            1,
            90.0,
            image_type,
            contrast_agent=post,
        )
    if contrast is SeriesClass.T2:
        if three_d:
            return AcquisitionProfile(
                "Sag CUBE T2",
                ("SE",),
                ("SK", "SS"),
                ("FAST_GEMS", "EDR_GEMS", "ACC_GEMS"),
                "3D",
                None,
                2500.0,
                90.0,
                None,
                120,
                90.0,
                image_type,
            )
        return AcquisitionProfile(
            "Ax T2 FRFSE",
            ("SE",),
            ("SK", "OSP"),
            ("FAST_GEMS", "FILTERED_GEMS", "FR_GEMS"),
            "2D",
            None,
            5000.0,
            100.0,
            None,
            18,
            111.0,
            image_type,
        )
    raise ValueError(f"no MR header profile for series class {contrast}")


def acquisition_profile(
    contrast: SeriesClass, vendor: Vendor, *, three_d: bool
) -> AcquisitionProfile:
    """The protocol a `vendor` scanner would use for `contrast` (3-D or 2-D multi-slice)."""
    vendor_profile(vendor)  # validates the name
    return _siemens(contrast, three_d) if vendor == "siemens" else _ge(contrast, three_d)
