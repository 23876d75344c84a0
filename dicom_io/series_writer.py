"""Write an ImageVolume as a classic DICOM MR Image Storage series.

Used to turn NIfTI data into DICOM studies that look like a scanner's (tests, demo). Per
slice k: ImagePositionPatient = origin + k * spacing_k * direction[:, 2];
ImageOrientationPatient = direction[:, 0] (along a row) and direction[:, 1] (down a column);
PixelSpacing = (spacing_j, spacing_i); InstanceNumber = k + 1, so `read_series` gives back
the same array and affine (it keeps the InstanceNumber direction). Voxel storage and its
exactness are described in series_pixels. The output has no private attributes and passes
dciodvfy (dicom3tools) without errors.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)

from lesionwatch.config.schema import SeriesClass
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.mr_headers import (
    AcquisitionProfile,
    Vendor,
    VendorProfile,
    acquisition_profile,
    vendor_profile,
)
from lesionwatch.dicom_io.series_identity import StudyIdentity, derive_uid
from lesionwatch.dicom_io.series_pixels import StoredPixels, ds_text, quantise

__all__ = ["LOSSLESS_TRANSFER_SYNTAXES", "StudyIdentity", "derive_uid", "write_series"]

log = logging.getLogger(__name__)

LOSSLESS_TRANSFER_SYNTAXES = frozenset(
    {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEGLSLossless,
        JPEG2000Lossless,
    }
)
THREE_D_MAX_SLICE_SPACING_MM = 1.5  # thinner slices than this: written as a 3-D acquisition
_GEOMETRY_TOLERANCE = 1e-6


def _da(value: dt.date) -> str:
    return value.strftime("%Y%m%d")


def _tm(value: dt.time) -> str:
    return value.strftime("%H%M%S")


def _check_direction(direction: npt.NDArray[np.float64]) -> None:
    if not np.allclose(direction.T @ direction, np.eye(3), atol=_GEOMETRY_TOLERANCE):
        raise ValueError(
            f"direction matrix is not orthonormal (sheared grid); DICOM slices cannot hold it:\n"
            f"{direction}"
        )


def _window(volume_values: npt.NDArray[Any]) -> tuple[str, str]:
    lo, hi = np.percentile(volume_values, [0.5, 99.5])
    return ds_text((lo + hi) / 2), ds_text(max(hi - lo, 1.0))


def _series_dataset(
    volume: ImageVolume,
    stored: StoredPixels,
    *,
    identity: StudyIdentity,
    vendor: VendorProfile,
    protocol: AcquisitionProfile,
    series_number: int,
    series_description: str,
    series_instance_uid: str,
    frame_of_reference_uid: str,
) -> Dataset:
    """Attributes shared by every slice of the series."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = MRImageStorage
    ds.ImageType = list(protocol.image_type)
    study_date, study_time = _da(identity.study_date), _tm(identity.study_time)
    series_time = dt.datetime.combine(identity.study_date, identity.study_time) + dt.timedelta(
        minutes=series_number
    )
    for prefix in ("InstanceCreation", "Content"):
        setattr(ds, f"{prefix}Date", series_time.strftime("%Y%m%d"))
        setattr(ds, f"{prefix}Time", series_time.strftime("%H%M%S"))
    ds.StudyDate, ds.StudyTime = study_date, study_time
    ds.SeriesDate, ds.SeriesTime = series_time.strftime("%Y%m%d"), series_time.strftime("%H%M%S")
    ds.AcquisitionDate, ds.AcquisitionTime = ds.SeriesDate, ds.SeriesTime
    ds.AccessionNumber = identity.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = vendor.manufacturer
    ds.InstitutionName = vendor.institution_name
    ds.ReferringPhysicianName = identity.referring_physician_name
    ds.StationName = vendor.station_name
    ds.StudyDescription = identity.study_description
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = vendor.model_name
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = _da(identity.birth_date) if identity.birth_date else ""
    ds.PatientSex = identity.sex
    ds.PatientAge = identity.patient_age
    ds.BodyPartExamined = "BRAIN"
    ds.ScanningSequence = list(protocol.scanning_sequence)
    ds.SequenceVariant = list(protocol.sequence_variant)
    ds.ScanOptions = list(protocol.scan_options)
    ds.MRAcquisitionType = protocol.mr_acquisition_type
    if protocol.sequence_name:
        ds.SequenceName = protocol.sequence_name
    ds.AngioFlag = "N"
    spacing_i, spacing_j, spacing_k = volume.spacing_mm
    ds.SliceThickness = ds_text(spacing_k)
    ds.RepetitionTime = ds_text(protocol.repetition_time_ms)
    ds.EchoTime = ds_text(protocol.echo_time_ms)
    if protocol.inversion_time_ms is not None:
        ds.InversionTime = ds_text(protocol.inversion_time_ms)
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = ds_text(vendor.imaging_frequency_mhz)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = ds_text(vendor.magnetic_field_strength_t)
    ds.SpacingBetweenSlices = ds_text(spacing_k)
    columns, rows, _ = volume.shape_ijk
    ds.NumberOfPhaseEncodingSteps = str(rows)
    ds.EchoTrainLength = str(protocol.echo_train_length)
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = "200"
    ds.SoftwareVersions = list(vendor.software_versions)
    ds.ProtocolName = protocol.protocol_name
    ds.ReceiveCoilName = vendor.receive_coil_name
    ds.TransmitCoilName = "Body"
    ds.AcquisitionMatrix = [0, min(columns, 65535), min(rows, 65535), 0]
    ds.InPlanePhaseEncodingDirection = "ROW"
    ds.FlipAngle = ds_text(protocol.flip_angle_deg)
    ds.PatientPosition = "HFS"
    if protocol.contrast_agent:
        ds.ContrastBolusAgent = "Gadolinium"
        ds.ContrastBolusRoute = "IV"
        ds.ContrastBolusVolume = "7.5"
        ds.ContrastBolusIngredient = "GADOLINIUM"
    ds.StudyInstanceUID = identity.study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = identity.study_id
    ds.SeriesNumber = str(series_number)
    ds.AcquisitionNumber = "1"
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageComments = "voxels from a NIfTI volume; header written by LesionWatch"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.PixelSpacing = [ds_text(spacing_j), ds_text(spacing_i)]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = stored.pixel_representation
    ds.BurnedInAnnotation = "NO"
    ds.WindowCenter, ds.WindowWidth = _window(volume.array)
    ds.RescaleIntercept = stored.intercept
    ds.RescaleSlope = stored.slope
    ds.LossyImageCompression = "00"
    return ds


def write_series(
    volume: ImageVolume,
    out_dir: Path,
    *,
    contrast: SeriesClass,
    identity: StudyIdentity,
    series_number: int,
    vendor: Vendor = "siemens",
    series_description: str | None = None,
    series_instance_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[Path]:
    """Write `volume` as one MR series in `out_dir` (one file per slice, k order); the paths.

    UIDs are deterministic: the series UID derives from the study UID and series number
    unless given, instance UIDs from the series UID and slice index. Every series of one
    study shares the study's FrameOfReferenceUID (they are in one scanner space).
    """
    syntax = UID(transfer_syntax)
    if syntax not in LOSSLESS_TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer syntax {syntax.name or syntax} is not one of the lossless syntaxes this "
            f"writer supports: {sorted(u.name for u in LOSSLESS_TRANSFER_SYNTAXES)}"
        )
    if not 0 <= series_number <= 2**31 - 1:
        raise ValueError(f"series_number must be a non-negative IS value, got {series_number}")
    if max(volume.shape_ijk[:2]) > 65535:
        raise ValueError(f"slices of {volume.shape_ijk[:2]} pixels exceed DICOM's 65535 limit")
    if syntax == JPEG2000Lossless and min(volume.shape_ijk[:2]) < 32:
        raise ValueError(
            f"JPEG 2000 needs slices of at least 32x32 pixels (the encoder uses 6 wavelet "
            f"levels); these are {volume.shape_ijk[0]}x{volume.shape_ijk[1]}"
        )
    direction = np.asarray(volume.direction, dtype=np.float64)
    _check_direction(direction)

    spacing_k = volume.spacing_mm[2]
    protocol = acquisition_profile(
        contrast, vendor, three_d=spacing_k <= THREE_D_MAX_SLICE_SPACING_MM
    )
    series_uid = series_instance_uid or derive_uid(
        identity.study_instance_uid, "series", str(series_number)
    )
    stored = quantise(volume.array)
    shared = _series_dataset(
        volume,
        stored,
        identity=identity,
        vendor=vendor_profile(vendor),
        protocol=protocol,
        series_number=series_number,
        series_description=series_description or protocol.series_description,
        series_instance_uid=series_uid,
        frame_of_reference_uid=identity.frame_of_reference_uid,
    )
    row_axis, column_axis = direction[:, 0], direction[:, 1]
    normal = np.cross(row_axis, column_axis)
    orientation = [ds_text(v) for v in (*row_axis, *column_axis)]

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(stored.array.shape[0]):
        position = np.asarray(volume.origin_mm) + k * spacing_k * direction[:, 2]
        ds = Dataset()
        ds.update(shared)
        sop_uid = derive_uid(series_uid, "instance", str(k))
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = str(k + 1)
        ds.ImagePositionPatient = [ds_text(v) for v in position]
        ds.ImageOrientationPatient = orientation
        ds.SliceLocation = ds_text(float(position @ normal))
        ds.PixelData = np.ascontiguousarray(stored.array[k]).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        if syntax.is_compressed:
            ds.compress(syntax)
        else:
            meta.TransferSyntaxUID = syntax
        path = out_dir / f"{series_number:04d}_{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    log.info(
        "wrote %d %s slice(s) of series %s (%s, %s) to %s",
        len(paths),
        contrast.value,
        series_uid,
        shared.SeriesDescription,
        syntax.name,
        out_dir,
    )
    return paths
