"""Result objects: one SEG per finding type on its source grid, config switches, stable UIDs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from pydicom.uid import UID
from result_cases import Study, build_study, shuffled

from lesionwatch.config.schema import ResultsConfig
from lesionwatch.dicom_io.output_uids import derive_uid
from lesionwatch.dicom_io.results import (
    JobIdentity,
    ResultsInputError,
    build_finding_objects,
    build_result_objects,
)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return build_study(tmp_path_factory.mktemp("study"))


def test_one_seg_per_finding_type_on_the_grid_of_its_source_series(study: Study) -> None:
    results = build_result_objects(study.findings(), job=JobIdentity("job-1"), prior=study.prior)
    flair_seg, new_seg, t1_seg = results.segmentations
    assert [s.SegmentLabel for s in flair_seg.SegmentSequence] == ["MS lesion (FLAIR)"]
    assert [s.SegmentLabel for s in new_seg.SegmentSequence] == ["New MS lesion"]
    assert [s.SegmentLabel for s in t1_seg.SegmentSequence] == ["Enhancing MS lesion"]
    flair_uid, t1_uid = study.flair[0].SeriesInstanceUID, study.t1_post[0].SeriesInstanceUID
    assert flair_seg.ReferencedSeriesSequence[0].SeriesInstanceUID == flair_uid
    assert new_seg.ReferencedSeriesSequence[0].SeriesInstanceUID == flair_uid
    assert t1_seg.ReferencedSeriesSequence[0].SeriesInstanceUID == t1_uid
    assert [ds.SeriesNumber for ds in results.datasets[:3]] == [9001, 9002, 9003]
    assert len({ds.SeriesInstanceUID for ds in results.segmentations}) == 3
    assert results.report is not None and results.report.SeriesNumber == 9020
    assert {sc.SeriesNumber for sc in results.secondary_captures} == {9011, 9012, 9013}


def test_finding_objects_built_apart_match_those_built_together(study: Study) -> None:
    """The worker builds each finding type in its own job, the SR later: same objects."""
    together = build_result_objects(study.findings(), job=JobIdentity("s"), prior=study.prior)
    apart = [build_finding_objects(f, job=JobIdentity("s")) for f in study.findings()]
    assert [o.segmentation.SOPInstanceUID for o in apart] == [
        ds.SOPInstanceUID for ds in together.segmentations
    ]
    assert [sc.SOPInstanceUID for o in apart for sc in o.secondary_captures] == [
        sc.SOPInstanceUID for sc in together.secondary_captures
    ]


def test_rebuilding_a_job_gives_the_same_uids_and_another_job_new_ones(study: Study) -> None:
    first = build_result_objects(study.findings(), job=JobIdentity("job-1"), prior=study.prior)
    again = build_result_objects(
        [
            type(f)(f.finding_type, shuffled(list(f.source_series)), f.mask, f.lesions, f.algorithm)
            for f in study.findings()
        ],
        job=JobIdentity("job-1"),
        prior=study.prior,
    )
    other = build_result_objects(study.findings(), job=JobIdentity("job-2"), prior=study.prior)
    uids = [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in first.datasets]
    assert uids == [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in again.datasets]
    assert len(set(uids)) == len(uids)
    assert not {u for pair in uids for u in pair} & {
        u for ds in other.datasets for u in (ds.SeriesInstanceUID, ds.SOPInstanceUID)
    }
    assert first.json == again.json


def test_config_switches_each_object(study: Study) -> None:
    findings = study.findings(with_new=False)
    only_seg = build_result_objects(
        findings,
        job=JobIdentity("job-1"),
        config=ResultsConfig(sr=False, secondary_capture=False, json_export=False),
    )
    assert [ds.Modality for ds in only_seg.datasets] == ["SEG", "SEG"]  # FLAIR and enhancing
    assert only_seg.json is None and only_seg.report is None
    only_sc = build_result_objects(
        findings,
        job=JobIdentity("job-1"),
        config=ResultsConfig(seg=False, sr=False, json_export=True),
    )
    assert {ds.Modality for ds in only_sc.datasets} == {"OT"}
    assert only_sc.json is not None
    assert only_sc.json["findings"]["ms_lesion"]["seg_sop_instance_uid"] is None
    with pytest.raises(ValidationError, match="results.sr needs results.seg"):
        ResultsConfig(seg=False, sr=True)


def test_uid_prefix_from_config_roots_every_uid(study: Study) -> None:
    results = build_result_objects(
        study.findings(with_new=False, with_enhancing=False),
        job=JobIdentity("job-1"),
        config=ResultsConfig(uid_prefix="1.2.999.7."),
    )
    for ds in results.datasets:
        assert str(ds.SOPInstanceUID).startswith("1.2.999.7.")
        assert str(ds.SeriesInstanceUID).startswith("1.2.999.7.")


def test_inputs_that_do_not_fit_together_are_refused(study: Study) -> None:
    findings = study.findings()
    with pytest.raises(ResultsInputError, match="given twice"):
        build_result_objects([findings[0], findings[0]], job=JobIdentity("j"))
    mixed = type(findings[0])(
        findings[0].finding_type,
        [*study.flair[:-1], study.t1_post[0]],
        findings[0].mask,
        findings[0].lesions,
        findings[0].algorithm,
    )
    with pytest.raises(ResultsInputError, match="from 2 series"):
        build_result_objects([mixed], job=JobIdentity("j"))
    with pytest.raises(ResultsInputError, match="no findings"):
        build_result_objects([], job=JobIdentity("j"))


def test_derive_uid_is_stable_valid_and_role_specific() -> None:
    uid = derive_uid("study-1/flair/1.0", "seg/instance")
    assert uid == derive_uid("study-1/flair/1.0", "seg/instance")
    assert uid != derive_uid("study-1/flair/1.0", "seg/series")
    assert UID(uid).is_valid and len(uid) <= 64
    assert derive_uid("k", "r", "1.2.3.").startswith("1.2.3.")
    with pytest.raises(ValueError, match="must end with"):
        derive_uid("k", "r", "1.2.3")
    with pytest.raises(ValueError, match="job_key and a role"):
        derive_uid("", "r")


def test_a_new_version_replaces_every_object_of_the_earlier_one(study: Study) -> None:
    """Re-processing keeps the UIDs; captures of slices that no longer show a lesion are sent
    again (labelled so) so that none of the earlier version's outlines stays at the PACS."""
    [flair, new, _] = study.findings()
    first = build_finding_objects(flair, job=JobIdentity("study-uid"))
    fewer = type(new)(flair.finding_type, new.source_series, new.mask, new.lesions, new.algorithm)
    second = build_finding_objects(
        fewer, job=JobIdentity("study-uid"), also_capture_slices=first.capture_slices
    )
    assert first.segmentation is not None and second.segmentation is not None
    assert second.segmentation.SOPInstanceUID == first.segmentation.SOPInstanceUID
    old = {str(sc.SOPInstanceUID) for sc in first.secondary_captures}
    assert old <= {str(sc.SOPInstanceUID) for sc in second.secondary_captures}
    assert set(second.capture_slices) == set(first.capture_slices)
    # The smaller finding leaves some earlier slices without a lesion: still replaced.
    assert any(not fewer.mask.array[k].any() for k in second.capture_slices)
