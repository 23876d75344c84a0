"""TID 1500 Measurement Report (Comprehensive 3D SR) with the lesion table of a job.

Content, in TID 1500 order:
- observation context: the LesionWatch device as observer;
- procedure reported (CID 100);
- imaging measurements:
  - per lesion, two groups with the same tracking identifier and UID:
    - a TID 1411 volumetric group: finding category and type, finding site brain, volume (mL,
      sum of segmented voxels) and longest diameter (mm) each with its algorithm (name,
      version, model card hash), a reference to its SEG segment, and for new lesions the
      evaluation "New";
    - a TID 1410 planar group locating the lesion: an "Image Region" POINT on the lesion's
      largest slice, SELECTED FROM that source image (so in the source's frame of
      reference), at the lesion pixel nearest its centroid (a centroid may lie outside an
      oddly shaped lesion), with the same finding and site and no measurements. This is what
      viewers list and jump to: TID 1411 cannot carry coordinates beside a segment
      reference (PixelMed: "condition not satisfied" / "not in template"), and OHIF 3 only
      turns groups with a top-level SCOORD into measurements (a 1-point "Image Region"
      becomes its Probe tool);
  - one summary group per finding type on its whole segment: number of lesions and total
    volume (TID 1411 as well, see `_summary_group`), located like a lesion at its largest
    lesion (`_summary_location`; OHIF fails on groups without coordinates);
- qualitative evaluations (report level): whether a prior was compared (and which), and
  every analysis state a reader must know (no prior, series missing, quality warnings).
The document is COMPLETE and UNVERIFIED: no human has signed it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage

from lesionwatch.dicom_io.codes import (
    ALGORITHM_FAMILY,
    ANATOMIC_REGION_BRAIN,
    ASSESSMENT_BY_COMPARISON,
    CHANGE_STATUS_CODES,
    COMMENT,
    COMPARISON_WITH_PRIOR_DONE,
    FINDING_CONCEPTS,
    LESIONS_UNIT,
    LONG_AXIS,
    MILLILITER,
    MILLIMETER,
    NO,
    NUMBER_OF_LESIONS,
    PROCEDURE_REPORTED,
    QUALITATIVE_EVALUATIONS,
    RADIOLOGICAL_ACTIVITY,
    SUM_OF_SEGMENTED_VOXELS,
    VOLUME,
    YES,
    FindingType,
)
from lesionwatch.dicom_io.output_uids import derive_uid
from lesionwatch.dicom_io.seg import AlgorithmIdentity, Equipment

LOGGER = logging.getLogger(__name__)

__all__ = [
    "AnalysisNote",
    "AnalysisState",
    "ChangeSummary",
    "FindingReport",
    "LesionMeasurement",
    "PriorStudyReference",
    "build_measurement_report",
]


class AnalysisState(enum.StrEnum):
    """States of the analysis that a reader must see in the report."""

    NO_PRIOR_AVAILABLE = "no_prior_available"
    SERIES_MISSING = "series_missing"
    QUALITY_WARNING = "quality_warning"
    ANALYSIS_FAILED = "analysis_failed"  # a pipeline ran and failed, or was stopped
    NOT_ENABLED = "not_enabled"  # the site switched the pipeline off
    REPORT_VERSION = "report_version"  # this report replaces an earlier version


@dataclass(frozen=True)
class AnalysisNote:
    state: AnalysisState
    detail: str  # plain words for the reader, e.g. "no T1 post-contrast series: not assessed"

    def text(self) -> str:
        heading = {
            AnalysisState.NO_PRIOR_AVAILABLE: "No prior study available",
            AnalysisState.SERIES_MISSING: "Series missing",
            AnalysisState.QUALITY_WARNING: "Quality warning",
            AnalysisState.ANALYSIS_FAILED: "Not assessed",
            AnalysisState.NOT_ENABLED: "Not assessed",
            AnalysisState.REPORT_VERSION: "Revised report",
        }[self.state]
        return f"{heading}: {self.detail}" if self.detail else heading


@dataclass(frozen=True)
class LesionMeasurement:
    """One row of a lesion table, as the report needs it.

    Field names follow `pipelines.postprocess.Lesion`; `from_lesion` takes that (or any
    object with those attributes), so the pipelines need not depend on this module.
    Index tuples are (i, j, k) on the source grid; the bounding box is inclusive.
    """

    lesion_id: int
    volume_ml: float
    centroid_lps_mm: tuple[float, float, float]
    bbox_min_ijk: tuple[int, int, int] | None = None
    bbox_max_ijk: tuple[int, int, int] | None = None
    longest_diameter_mm: float | None = None
    tracking_uid: str | None = None  # stable across studies when the lesion is tracked
    change_status: str | None = None  # since the prior: new, enlarging, stable, shrinking
    prior_volume_ml: float | None = None  # of the prior lesion(s) it continues

    @classmethod
    def from_lesion(cls, lesion: Any) -> LesionMeasurement:
        def ijk(name: str) -> tuple[int, int, int] | None:
            value = getattr(lesion, name, None)
            return None if value is None else (int(value[0]), int(value[1]), int(value[2]))

        diameter = getattr(lesion, "longest_diameter_mm", None)
        x, y, z = (float(c) for c in lesion.centroid_lps_mm)
        return cls(
            lesion_id=int(lesion.lesion_id),
            volume_ml=float(lesion.volume_ml),
            centroid_lps_mm=(x, y, z),
            bbox_min_ijk=ijk("bbox_min_ijk"),
            bbox_max_ijk=ijk("bbox_max_ijk"),
            longest_diameter_mm=None if diameter is None else float(diameter),
            tracking_uid=getattr(lesion, "tracking_uid", None),
        )


@dataclass(frozen=True)
class ChangeSummary:
    """Lesion counts by change since the prior (FLAIR lesions tracked between the studies)."""

    new: int  # as the new-lesion finding reports them
    enlarging: int
    stable: int
    shrinking: int
    disappeared: int  # prior lesions with no current counterpart
    prior_lesions: int
    registration: str
    similarity: float

    @property
    def active(self) -> bool:
        """Radiological activity: any new or enlarging lesion."""
        return self.new > 0 or self.enlarging > 0

    def text(self) -> str:
        activity = "yes (new or enlarging lesions)" if self.active else "no"
        return (
            f"Change since prior: {self.new} new, {self.enlarging} enlarging, {self.stable} "
            f"stable, {self.shrinking} shrinking lesion(s); {self.disappeared} of "
            f"{self.prior_lesions} prior lesion(s) no longer seen. Radiological activity: "
            f"{activity}. Prior registered {self.registration} (similarity {self.similarity:.2f})."
        )


@dataclass(frozen=True)
class PriorStudyReference:
    """The prior study a comparison (new lesions) was made against."""

    study_instance_uid: str
    study_date: str | None = None  # DICOM DA, YYYYMMDD
    series: Sequence[Dataset] = ()  # prior images used; recorded as pertinent other evidence
    change: ChangeSummary | None = None  # None: lesion tracking not available

    def text(self) -> str:
        date = self.study_date or "unknown date"
        if self.study_date and len(self.study_date) == 8:
            date = f"{self.study_date[:4]}-{self.study_date[4:6]}-{self.study_date[6:]}"
        return f"Compared with prior study of {date} (Study Instance UID {self.study_instance_uid})"


@dataclass(frozen=True)
class FindingReport:
    """The lesions of one finding type and where their segment lives."""

    finding_type: FindingType
    lesions: Sequence[LesionMeasurement]
    segmentation: Dataset | None  # the SEG holding this finding type's segment (None: no SEG)
    segment_number: int
    source_series_instance_uid: str
    algorithm: AlgorithmIdentity

    @property
    def total_volume_ml(self) -> float:
        return float(sum(lesion.volume_ml for lesion in self.lesions))


def _algorithm_id(algorithm: AlgorithmIdentity) -> hd.sr.AlgorithmIdentification:
    # TID 4019 on each measurement (TID 300), where validators expect it.
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"{k}={v}" for k, v in algorithm.parameters().items()],
        family=ALGORITHM_FAMILY,
    )


def _referenced_segment(finding: FindingReport) -> hd.sr.ReferencedSegment:
    if finding.segmentation is None:
        raise ValueError(
            f"{finding.finding_type.value}: the measurement report references SEG segments, "
            f"but no SEG was built (enable results.seg)"
        )
    return hd.sr.ReferencedSegment(
        sop_class_uid=finding.segmentation.SOPClassUID,
        sop_instance_uid=finding.segmentation.SOPInstanceUID,
        segment_number=finding.segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(finding.source_series_instance_uid),
    )


def _evaluations(
    finding: FindingReport, lesion: LesionMeasurement | None = None
) -> list[hd.sr.QualitativeEvaluation] | None:
    """The evaluation "New" for new lesions (the SEG type modifier, coded in the SR), or a
    tracked lesion's change since the prior (new, enlarged, no change, decreased)."""
    modifier = FINDING_CONCEPTS[finding.finding_type].property_type_modifier
    if modifier is None and lesion is not None and lesion.change_status in CHANGE_STATUS_CODES:
        modifier = CHANGE_STATUS_CODES[lesion.change_status]
    if modifier is None:
        return None
    return [hd.sr.QualitativeEvaluation(ASSESSMENT_BY_COMPARISON, modifier)]


@dataclass(frozen=True)
class _SegmentStack:
    """One SEG segment on its source images, stacked along the slice normal."""

    sources: list[Dataset]  # k -> source image
    mask: np.ndarray  # (k, row, column) bool
    labels: np.ndarray  # 26-connected components of `mask`, 1..n
    centroids_lps_mm: np.ndarray  # (n, 3): centroid of component c at row c - 1


def _located_segment(finding: FindingReport, evidence: Sequence[Dataset]) -> _SegmentStack | None:
    """The segment to locate lesions in, or None (logged): locations are a viewer aid, and a
    SEG that cannot be decoded here must not cost the report its counts and volumes."""
    try:
        return _segment_stack(finding, evidence)
    except Exception:
        LOGGER.warning(
            "%s: cannot decode the SEG to locate lesions; the SR gives no locations",
            finding.finding_type.value,
            exc_info=True,
        )
        return None


def _segment_stack(finding: FindingReport, evidence: Sequence[Dataset]) -> _SegmentStack:
    """Decode the finding's segment on the source images given as evidence."""
    if finding.segmentation is None:
        raise ValueError(f"{finding.finding_type.value}: lesion locations need the SEG")
    sources = [
        ds
        for ds in evidence
        if str(ds.get("SeriesInstanceUID", "")) == finding.source_series_instance_uid
        and "ImagePositionPatient" in ds
    ]
    if not sources:
        raise ValueError(
            f"{finding.finding_type.value}: lesion locations need the source images "
            f"(series {finding.source_series_instance_uid}) as evidence"
        )
    orientation = np.asarray(sources[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    sources.sort(key=lambda ds: float(normal @ np.asarray(ds.ImagePositionPatient, float)))
    segmentation = hd.seg.Segmentation.from_dataset(finding.segmentation, copy=True)
    pixels = segmentation.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in sources],
        segment_numbers=[finding.segment_number],
        assert_missing_frames_are_empty=True,
    )
    mask = np.asarray(pixels[..., 0] > 0)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    centroids = np.zeros((count, 3))
    if count:
        kji = np.asarray(ndimage.center_of_mass(mask, labels, range(1, count + 1)))
        centroids = _index_to_lps(sources, kji)
    return _SegmentStack(sources, mask, labels, centroids)


def _slice_step_mm(stack: _SegmentStack) -> float:
    if len(stack.sources) < 2:
        return 0.0
    positions = np.asarray([ds.ImagePositionPatient for ds in stack.sources], dtype=np.float64)
    return float(np.median(np.linalg.norm(np.diff(positions, axis=0), axis=1)))


def _index_to_lps(sources: Sequence[Dataset], kji: np.ndarray) -> np.ndarray:
    """(n, 3) fractional (k, row, column) indices of the stack -> LPS mm (slice positions
    interpolated, so uneven slice spacing is fine)."""
    positions = np.asarray([ds.ImagePositionPatient for ds in sources], dtype=np.float64)
    orientation = np.asarray(sources[0].ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in sources[0].PixelSpacing)
    slots = np.arange(len(sources))
    origin = np.stack([np.interp(kji[:, 0], slots, positions[:, a]) for a in range(3)], axis=1)
    along_row = kji[:, 2:3] * column_spacing * orientation[None, :3]
    along_column = kji[:, 1:2] * row_spacing * orientation[None, 3:]
    return np.asarray(origin + along_row + along_column)


def _location(stack: _SegmentStack | None, lesion: LesionMeasurement) -> hd.sr.ImageRegion | None:
    """A POINT inside the lesion: on the source image where the lesion is largest, the lesion
    pixel nearest its centroid (pixel centre; SCOORD (0, 0) is the top left pixel's corner).

    None where the SEG has no component at the lesion's centroid (a lesion table measured on
    another grid): the report then lacks that location, never its measurements.
    """
    if stack is None:
        return None
    centre = np.asarray(lesion.centroid_lps_mm, dtype=np.float64)
    distances = np.linalg.norm(stack.centroids_lps_mm - centre[None, :], axis=1)
    tolerance = max(_slice_step_mm(stack), *(float(v) for v in stack.sources[0].PixelSpacing))
    if not len(distances) or distances.min() > tolerance:
        LOGGER.warning(
            "lesion %s: no SEG component within %.1f mm of its centroid; the SR gives no "
            "location for it",
            lesion.lesion_id,
            tolerance,
        )
        return None
    voxels = np.argwhere(stack.labels == int(np.argmin(distances)) + 1)  # (k, row, column)
    areas = np.bincount(voxels[:, 0])
    slices = np.flatnonzero(areas == areas.max())
    voxel_lps = _index_to_lps(stack.sources, voxels.astype(np.float64))
    off_centre = np.linalg.norm(voxel_lps - centre[None, :], axis=1)
    # largest slice; among equally large ones, the one nearest the centroid
    k = min(slices, key=lambda s: float(off_centre[voxels[:, 0] == s].min()))
    on_slice = voxels[:, 0] == k
    _, row, column = voxels[on_slice][int(np.argmin(off_centre[on_slice]))]
    source = stack.sources[int(k)]
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.asarray([[column + 0.5, row + 0.5]], dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID),
        ),
    )


def _lesion_groups(
    finding: FindingReport,
    lesion: LesionMeasurement,
    tracking_uid: str,
    stack: _SegmentStack | None,
) -> list[Any]:
    """The TID 1411 group with the lesion's measurements and the TID 1410 group that locates
    it, both under the lesion's tracking identifier and UID."""
    concept = FINDING_CONCEPTS[finding.finding_type]
    measurements = [
        hd.sr.Measurement(
            name=VOLUME,
            value=lesion.volume_ml,
            unit=MILLILITER,
            method=SUM_OF_SEGMENTED_VOXELS,
            algorithm_id=_algorithm_id(finding.algorithm),
        )
    ]
    if lesion.longest_diameter_mm is not None:
        measurements.append(
            hd.sr.Measurement(
                name=LONG_AXIS,
                value=lesion.longest_diameter_mm,
                unit=MILLIMETER,
                algorithm_id=_algorithm_id(finding.algorithm),
            )
        )

    def tracking() -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"{concept.label} {lesion.lesion_id}"
        )

    volumetric = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(),
        referenced_segment=_referenced_segment(finding),
        finding_type=concept.property_type,
        finding_category=concept.category,
        finding_sites=[hd.sr.FindingSite(ANATOMIC_REGION_BRAIN)],
        measurements=measurements,
        qualitative_evaluations=_evaluations(finding, lesion),
    )
    region = _location(stack, lesion)
    if region is None:
        return [volumetric]
    location = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(),
        referenced_region=region,
        finding_type=concept.property_type,
        finding_sites=[hd.sr.FindingSite(ANATOMIC_REGION_BRAIN)],
    )
    return [volumetric, location]


def _summary_group(
    finding: FindingReport, tracking_uid: str
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """Count and total volume of one finding type: a TID 1411 group on the whole segment.

    A TID 1501 group would fit too, but validators (PixelMed) check every group of a report
    against TID 1411 as soon as one group references a segment.
    """
    concept = FINDING_CONCEPTS[finding.finding_type]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"Summary: {concept.label}"[:64]
        ),
        referenced_segment=_referenced_segment(finding),
        finding_type=concept.property_type,
        finding_category=concept.category,
        finding_sites=[hd.sr.FindingSite(ANATOMIC_REGION_BRAIN)],
        measurements=[
            hd.sr.Measurement(
                name=NUMBER_OF_LESIONS,
                value=len(finding.lesions),
                unit=LESIONS_UNIT,
                algorithm_id=_algorithm_id(finding.algorithm),
            ),
            hd.sr.Measurement(
                name=VOLUME,
                value=finding.total_volume_ml,
                unit=MILLILITER,
                method=SUM_OF_SEGMENTED_VOXELS,
                algorithm_id=_algorithm_id(finding.algorithm),
            ),
        ],
        qualitative_evaluations=_evaluations(finding),
    )


def _summary_location(
    finding: FindingReport, tracking_uid: str, stack: _SegmentStack | None
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | None:
    """Where a viewer jumps for the summary: its largest lesion (TID 1410, as for lesions).

    OHIF 3.13 needs coordinates in every group it lists: a summary without them makes it
    fail (_checkIfCanAddMeasurementsToDisplaySet reads measurement.coords[0])."""
    concept = FINDING_CONCEPTS[finding.finding_type]
    largest = max(finding.lesions, key=lambda lesion: lesion.volume_ml)
    region = _location(stack, largest)
    if region is None:
        return None
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"Summary: {concept.label}"[:64]
        ),
        referenced_region=region,
        finding_type=concept.property_type,
        finding_sites=[hd.sr.FindingSite(ANATOMIC_REGION_BRAIN)],
    )


def _report_evaluations(
    prior: PriorStudyReference | None, notes: Sequence[AnalysisNote]
) -> hd.sr.ContainerContentItem:
    """TID 1500 row "Qualitative Evaluations": report-level CODE and TEXT items."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=COMPARISON_WITH_PRIOR_DONE,
            value=YES if prior is not None else NO,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    texts = [prior.text()] if prior is not None else []
    if prior is not None and prior.change is not None:
        items.append(
            hd.sr.CodeContentItem(
                name=RADIOLOGICAL_ACTIVITY,
                value=YES if prior.change.active else NO,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
        texts.append(prior.change.text())
    texts += [note.text() for note in notes]
    items += [
        hd.sr.TextContentItem(
            name=COMMENT, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        for text in texts
    ]
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_measurement_report(
    findings: Sequence[FindingReport],
    evidence: Sequence[Dataset],
    *,
    job_key: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    equipment: Equipment,
    prior: PriorStudyReference | None = None,
    notes: Sequence[AnalysisNote] = (),
    uid_prefix: str | None = None,
    series_description: str = "LesionWatch measurement report (computer-generated)",
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of a job.

    `evidence` is every instance the report rests on: the current source images first (the
    report takes patient and study from `evidence[0]`), then the SEGs in `findings`; prior
    images from `prior.series` are added as pertinent other evidence.
    """
    if not findings:
        raise ValueError("a measurement report needs at least one finding type")
    if prior is None and any(f.finding_type is FindingType.NEW_LESION for f in findings):
        raise ValueError("new lesions are reported but no prior study reference was given")

    device_uid = derive_uid(job_key, "sr/observer-device", uid_prefix)
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid,
                name=equipment.model_name,
                manufacturer_name=equipment.manufacturer,
                model_name=equipment.model_name,
                serial_number=equipment.device_serial_number,
            ),
        )
    )
    # Summary groups first: a reader sees the totals before the per-lesion rows.
    groups: list[Any] = []
    stacks = {id(f): _located_segment(f, evidence) for f in findings if f.lesions}
    for finding in findings:
        role = f"tracking/summary/{finding.finding_type.value}"
        summary_uid = derive_uid(job_key, role, uid_prefix)
        groups.append(_summary_group(finding, summary_uid))
        summary_location = (
            _summary_location(finding, summary_uid, stacks[id(finding)])
            if finding.lesions
            else None
        )
        if summary_location is not None:
            groups.append(summary_location)
    for finding in findings:
        for lesion in finding.lesions:
            stack = stacks[id(finding)]
            tracking_uid = lesion.tracking_uid or derive_uid(
                job_key, f"tracking/{finding.finding_type.value}/{lesion.lesion_id}", uid_prefix
            )
            groups += _lesion_groups(finding, lesion, tracking_uid, stack)

    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_report_evaluations(prior, notes))

    all_evidence = list(evidence)
    known = {ds.SOPInstanceUID for ds in all_evidence}
    for finding in findings:
        if finding.segmentation is not None and finding.segmentation.SOPInstanceUID not in known:
            all_evidence.append(finding.segmentation)
            known.add(finding.segmentation.SOPInstanceUID)
    if prior is not None:
        all_evidence += [ds for ds in prior.series if ds.SOPInstanceUID not in known]

    sr = hd.sr.Comprehensive3DSR(
        evidence=all_evidence,
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=equipment.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = series_description[:64]
    sr.ManufacturerModelName = equipment.model_name
    sr.SoftwareVersions = equipment.software_versions
    sr.DeviceSerialNumber = equipment.device_serial_number
    return sr
