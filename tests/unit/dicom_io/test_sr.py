"""TID 1500 report: per-lesion groups with segment references, summaries, analysis states."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from result_cases import FLAIR_MODEL, NEW_MODEL, Study, build_study
from scipy import ndimage

from lesionwatch.dicom_io.codes import FINDING_CONCEPTS, NUMBER_OF_LESIONS, VOLUME, FindingType
from lesionwatch.dicom_io.output_uids import derive_uid
from lesionwatch.dicom_io.seg import Equipment, SegmentInput, build_segmentation
from lesionwatch.dicom_io.sr import (
    AnalysisNote,
    AnalysisState,
    FindingReport,
    LesionMeasurement,
    PriorStudyReference,
    build_measurement_report,
)
from lesionwatch.pipelines.postprocess import lesion_table


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return build_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def seg(study: Study) -> Dataset:
    return build_segmentation(
        study.flair,
        [
            SegmentInput(FindingType.MS_LESION, study.lesion_mask, FLAIR_MODEL, "1.2.826.0.1.1"),
            SegmentInput(FindingType.NEW_LESION, study.new_mask, NEW_MODEL, "1.2.826.0.1.2"),
        ],
        series_instance_uid=derive_uid("job", "seg/series"),
        sop_instance_uid=derive_uid("job", "seg/instance"),
        series_number=9001,
        equipment=Equipment(),
    )


def _findings(study: Study, seg: Dataset, *, with_new: bool = True) -> list[FindingReport]:
    series_uid = str(study.flair[0].SeriesInstanceUID)
    findings = [
        FindingReport(
            FindingType.MS_LESION,
            [LesionMeasurement.from_lesion(x) for x in lesion_table(study.lesion_mask)],
            seg,
            1,
            series_uid,
            FLAIR_MODEL,
        )
    ]
    if with_new:
        findings.append(
            FindingReport(
                FindingType.NEW_LESION,
                [LesionMeasurement.from_lesion(x) for x in lesion_table(study.new_mask)],
                seg,
                2,
                series_uid,
                NEW_MODEL,
            )
        )
    return findings


def _report(study: Study, seg: Dataset, **kwargs: object) -> hd.sr.Comprehensive3DSR:
    defaults: dict[str, object] = {
        "job_key": "job-1",
        "series_instance_uid": derive_uid("job-1", "sr/series"),
        "sop_instance_uid": derive_uid("job-1", "sr/instance"),
        "series_number": 9020,
        "equipment": Equipment(),
        "prior": study.prior,
    }
    defaults.update(kwargs)
    findings = defaults.pop("findings", None) or _findings(study, seg)
    return build_measurement_report(findings, [*study.flair, seg], **defaults)  # type: ignore[arg-type]


def _texts(sr: Dataset) -> list[str]:
    root = sr.ContentSequence
    evaluations = [item for item in root if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert len(evaluations) == 1
    return [item.TextValue for item in evaluations[0].ContentSequence if item.ValueType == "TEXT"]


def _comparison_done(sr: Dataset) -> str:
    root = sr.ContentSequence
    evaluations = next(i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "C0034375")
    item = next(i for i in evaluations.ContentSequence if i.ValueType == "CODE")
    assert item.ConceptNameCodeSequence[0].CodeMeaning == "Comparison with Prior Study Done"
    return str(item.ConceptCodeSequence[0].CodeMeaning)


def test_one_group_per_lesion_with_volume_tracking_and_segment(study: Study, seg: Dataset) -> None:
    sr = _report(study, seg)
    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = parsed.content.get_volumetric_roi_measurement_groups()
    table = lesion_table(study.lesion_mask)
    new_table = lesion_table(study.new_mask)
    lesion_groups = [g for g in groups if not g.tracking_identifier.startswith("Summary")]
    assert len(lesion_groups) == len(table) + len(new_table)
    by_id = {g.tracking_identifier: g for g in lesion_groups}
    for lesion in table:
        group = by_id[f"MS lesion (FLAIR) {lesion.lesion_id}"]
        volume = group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))[0]
        assert volume.value == pytest.approx(lesion.volume_ml, rel=1e-9)
        assert volume.unit.value == "ml"
        diameter = group.get_measurements(name=hd.sr.CodedConcept("103339001", "SCT", "Long Axis"))
        assert diameter[0].value == pytest.approx(lesion.longest_diameter_mm, rel=1e-9)
        reference = group.referenced_segment
        assert reference is not None
        assert reference.referenced_segment_numbers == [1]
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert group.tracking_uid == derive_uid("job-1", f"tracking/ms_lesion/{lesion.lesion_id}")
    new_group = by_id[f"New MS lesion {new_table[0].lesion_id}"]
    assert new_group.referenced_segment.referenced_segment_numbers == [2]


def test_summary_groups_count_and_total_volume(study: Study, seg: Dataset) -> None:
    sr = _report(study, seg)
    content = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    groups = content.get_volumetric_roi_measurement_groups()
    summaries = {
        g.tracking_identifier: g for g in groups if g.tracking_identifier.startswith("Summary")
    }
    assert set(summaries) == {"Summary: MS lesion (FLAIR)", "Summary: New MS lesion"}
    cases = [("MS lesion (FLAIR)", study.lesion_mask), ("New MS lesion", study.new_mask)]
    for label, mask in cases:
        group = summaries[f"Summary: {label}"]
        count = group.get_measurements(name=NUMBER_OF_LESIONS)
        volume = group.get_measurements(name=VOLUME)
        assert count[0].value == len(lesion_table(mask))
        expected_ml = float(mask.array.sum()) * mask.voxel_volume_mm3 / 1000
        assert volume[0].value == pytest.approx(expected_ml, rel=1e-9)


def test_prior_comparison_and_states_reach_the_reader(study: Study, seg: Dataset) -> None:
    notes = [
        AnalysisNote(
            AnalysisState.SERIES_MISSING, "no T1 post-contrast series; enhancing not assessed"
        ),
        AnalysisNote(AnalysisState.QUALITY_WARNING, "motion artefacts on FLAIR"),
    ]
    sr = _report(study, seg, notes=notes)
    assert _comparison_done(sr) == "Yes"
    texts = _texts(sr)
    assert texts[0] == (
        f"Compared with prior study of 2023-03-01 (Study Instance UID "
        f"{study.prior.study_instance_uid})"
    )
    assert "Series missing: no T1 post-contrast series; enhancing not assessed" in texts
    assert "Quality warning: motion artefacts on FLAIR" in texts
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.PatientID == study.flair[0].PatientID
    assert sr.StudyInstanceUID == study.flair[0].StudyInstanceUID
    procedure = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"
    )
    assert procedure.ConceptCodeSequence[0].CodeValue == "25056-3"  # CID 100


def test_without_prior_the_report_says_so(study: Study, seg: Dataset) -> None:
    sr = _report(
        study,
        seg,
        prior=None,
        findings=_findings(study, seg, with_new=False),
        notes=[AnalysisNote(AnalysisState.NO_PRIOR_AVAILABLE, "first MRI of this patient")],
    )
    assert _comparison_done(sr) == "No"
    assert _texts(sr) == ["No prior study available: first MRI of this patient"]


def test_new_lesions_need_a_prior(study: Study, seg: Dataset) -> None:
    with pytest.raises(ValueError, match="no prior study reference"):
        _report(study, seg, prior=None)


def test_prior_images_become_pertinent_other_evidence(study: Study, seg: Dataset) -> None:
    prior_image = Dataset()
    prior_image.SOPClassUID = study.flair[0].SOPClassUID
    prior_image.SOPInstanceUID = derive_uid("prior", "image")
    prior_image.SeriesInstanceUID = derive_uid("prior", "series")
    prior_image.StudyInstanceUID = study.prior.study_instance_uid
    prior = PriorStudyReference(study.prior.study_instance_uid, "20230301", [prior_image])
    sr = _report(study, seg, prior=prior)
    assert [s.StudyInstanceUID for s in sr.PertinentOtherEvidenceSequence] == [
        study.prior.study_instance_uid
    ]
    current = {s.StudyInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence}
    assert current == {study.flair[0].StudyInstanceUID}
    referenced = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in referenced


def test_lesion_measurement_takes_the_postprocess_lesion(study: Study) -> None:
    lesion = lesion_table(study.lesion_mask)[0]
    row = LesionMeasurement.from_lesion(lesion)
    assert row.lesion_id == lesion.lesion_id
    assert row.volume_ml == lesion.volume_ml
    assert row.centroid_lps_mm == lesion.centroid_lps_mm
    assert row.bbox_min_ijk == lesion.bbox_min_ijk and row.bbox_max_ijk == lesion.bbox_max_ijk
    assert row.longest_diameter_mm == lesion.longest_diameter_mm
    assert row.tracking_uid is None


def _pixel_to_lps(image: Dataset, column: float, row: float) -> np.ndarray:
    """SCOORD pixel coordinates ((0, 0) = top left corner of the top left pixel) -> LPS."""
    orientation = np.asarray(image.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
    return np.asarray(
        np.asarray(image.ImagePositionPatient, dtype=float)
        + (column - 0.5) * column_spacing * orientation[:3]
        + (row - 0.5) * row_spacing * orientation[3:]
    )


def test_each_lesion_is_located_by_a_point_inside_it_on_its_largest_slice(
    study: Study, seg: Dataset
) -> None:
    """What a viewer lists and jumps to: per lesion a TID 1410 group with its tracking UID and
    an "Image Region" POINT selected from a FLAIR image; the TID 1411 group keeps the
    measurements and the segment, without coordinates (PixelMed: nothing "not in template")."""
    sr = _report(study, seg)
    imaging = next(i for i in sr.ContentSequence if i.ValueType == "CONTAINER")
    groups = list(imaging.ContentSequence)
    images = {str(ds.SOPInstanceUID): ds for ds in study.flair}
    inverse = np.linalg.inv(study.lesion_mask.affine_lps)
    for finding_type, mask in (
        (FindingType.MS_LESION, study.lesion_mask),
        (FindingType.NEW_LESION, study.new_mask),
    ):
        table = lesion_table(mask)
        label = FINDING_CONCEPTS[finding_type].label
        labels, _ = ndimage.label(mask.array > 0, structure=np.ones((3, 3, 3), dtype=bool))
        for lesion in table:
            name = f"{label} {lesion.lesion_id}"
            pair = [g for g in groups if _text(g, "112039") == name]
            assert [g.ContentTemplateSequence[0].TemplateIdentifier for g in pair] == [
                "1411",
                "1410",
            ]
            volumetric, planar = pair
            assert _uid(volumetric, "112040") == _uid(planar, "112040")
            assert not [i for i in volumetric.ContentSequence if "SCOORD" in i.ValueType]
            for number in (i for i in volumetric.ContentSequence if i.ValueType == "NUM"):
                assert not [i for i in number.ContentSequence if "SCOORD" in i.ValueType]
            assert not [i for i in planar.ContentSequence if i.ValueType == "NUM"]
            (region,) = [i for i in planar.ContentSequence if i.ValueType == "SCOORD"]
            assert region.ConceptNameCodeSequence[0].CodeValue == "111030"  # Image Region
            assert region.GraphicType == "POINT"
            (source,) = region.ContentSequence
            assert source.RelationshipType == "SELECTED FROM"
            image = images[source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
            lps = _pixel_to_lps(image, *(float(v) for v in region.GraphicData))
            i, j, k = np.rint((inverse @ np.append(lps, 1.0))[:3]).astype(int)
            # inside this very lesion, on its largest slice
            component = labels == labels[k, j, i]
            assert labels[k, j, i] > 0 and int(component.sum()) == lesion.voxel_count
            areas = component.reshape(component.shape[0], -1).sum(axis=1)
            assert areas[k] == areas.max()


def _text(group: Dataset, code: str) -> str:
    return next(
        (
            str(i.TextValue)
            for i in group.ContentSequence
            if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == code
        ),
        "",
    )


def _uid(group: Dataset, code: str) -> str:
    return next(
        str(i.UID)
        for i in group.ContentSequence
        if i.ValueType == "UIDREF" and i.ConceptNameCodeSequence[0].CodeValue == code
    )


def test_change_since_prior_per_lesion_and_as_activity(study: Study, seg: Dataset) -> None:
    from dataclasses import replace

    from lesionwatch.dicom_io.sr import ChangeSummary

    findings = _findings(study, seg)
    statuses = ["new", "enlarging", "stable", "shrinking", None]
    flair = findings[0]
    tagged = [
        replace(lesion, change_status=statuses[i % len(statuses)], prior_volume_ml=0.01)
        for i, lesion in enumerate(flair.lesions)
    ]
    findings[0] = replace(flair, lesions=tagged)
    change = ChangeSummary(
        new=1,
        enlarging=1,
        stable=1,
        shrinking=1,
        disappeared=2,
        prior_lesions=5,
        registration="affine",
        similarity=0.91,
    )
    sr = _report(study, seg, findings=findings, prior=replace(study.prior, change=change))
    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = {
        g.tracking_identifier: g
        for g in parsed.content.get_volumetric_roi_measurement_groups()
        if not g.tracking_identifier.startswith("Summary")
    }
    expected = {
        "new": "New",
        "enlarging": "Enlarged",
        "stable": "No change",
        "shrinking": "Decreased",
    }
    for lesion in tagged:
        group = groups[f"MS lesion (FLAIR) {lesion.lesion_id}"]
        evaluations = group.get_qualitative_evaluations(
            name=hd.sr.CodedConcept("121375", "DCM", "Assessment By Comparison")
        )
        if lesion.change_status is None:
            assert evaluations == []
        else:
            assert [e.value.meaning for e in evaluations] == [expected[lesion.change_status]]
    root = sr.ContentSequence
    evaluations = next(i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "C0034375")
    activity = next(
        i for i in evaluations.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "ACT-T2"
    )
    assert activity.ConceptNameCodeSequence[0].CodingSchemeDesignator == "99LWATCH"
    assert activity.ConceptCodeSequence[0].CodeMeaning == "Yes"
    summary = next(t for t in _texts(sr) if t.startswith("Change since prior"))
    assert "1 new, 1 enlarging, 1 stable, 1 shrinking" in summary
    assert "2 of 5 prior lesion(s) no longer seen" in summary
    assert "Radiological activity: yes" in summary

    quiet = replace(change, new=0, enlarging=0)
    sr = _report(study, seg, prior=replace(study.prior, change=quiet))
    evaluations = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    )
    activity = next(
        i for i in evaluations.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "ACT-T2"
    )
    assert activity.ConceptCodeSequence[0].CodeMeaning == "No"
