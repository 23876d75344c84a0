"""All result objects of a job: grouping per source series, config switches, stable UIDs."""

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
    build_result_objects,
)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return build_study(tmp_path_factory.mktemp("study"))


def test_one_seg_per_source_series_segments_per_finding_type(study: Study) -> None:
    results = build_result_objects(study.findings(), job=JobIdentity("job-1"), prior=study.prior)
    flair_seg, t1_seg = results.segmentations
    labels = [s.SegmentLabel for s in flair_seg.SegmentSequence]
    assert labels == ["MS lesion (FLAIR)", "New MS lesion"]
    assert [s.SegmentLabel for s in t1_seg.SegmentSequence] == ["Enhancing MS lesion"]
    flair_uid, t1_uid = study.flair[0].SeriesInstanceUID, study.t1_post[0].SeriesInstanceUID
    assert flair_seg.ReferencedSeriesSequence[0].SeriesInstanceUID == flair_uid
    assert t1_seg.ReferencedSeriesSequence[0].SeriesInstanceUID == t1_uid
    assert [ds.SeriesNumber for ds in results.datasets[:2]] == [9001, 9002]
    assert results.report is not None and results.report.SeriesNumber == 9020
    assert {sc.SeriesNumber for sc in results.secondary_captures} == {9011, 9012}


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
    assert [ds.Modality for ds in only_seg.datasets] == ["SEG", "SEG"]
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
