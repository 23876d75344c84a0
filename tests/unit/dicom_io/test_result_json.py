"""JSON export: the SR's numbers, states and object UIDs in plain JSON."""

from __future__ import annotations

import json

import highdicom as hd
import pytest
from result_cases import Study, build_study

from lesionwatch.dicom_io.results import (
    AnalysisNote,
    AnalysisState,
    JobIdentity,
    ResultObjects,
    build_result_objects,
)
from lesionwatch.pipelines.postprocess import lesion_table


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return build_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def results(study: Study) -> ResultObjects:
    return build_result_objects(
        study.findings(),
        job=JobIdentity("job-42"),
        prior=study.prior,
        notes=[AnalysisNote(AnalysisState.QUALITY_WARNING, "FLAIR has 4 mm slices")],
    )


def test_export_is_plain_json_with_study_and_prior(results: ResultObjects, study: Study) -> None:
    document = json.loads(json.dumps(results.json))
    assert document["schema"] == "lesionwatch.result/1"
    assert document["computer_generated"] is True
    assert "NOT FOR DIAGNOSIS ALONE" in document["disclaimer"]
    assert document["study_instance_uid"] == study.flair[0].StudyInstanceUID
    assert document["patient_id"] == "LW-TEST-07"
    assert document["prior_study"] == {
        "study_instance_uid": study.prior.study_instance_uid,
        "study_date": "20230301",
        "change": None,  # no lesion tracking in this report
    }
    assert document["states"] == [{"state": "quality_warning", "detail": "FLAIR has 4 mm slices"}]


def test_export_numbers_equal_the_lesion_tables(results: ResultObjects, study: Study) -> None:
    findings = results.json["findings"]  # type: ignore[index]
    assert set(findings) == {"ms_lesion", "new_lesion", "enhancing_lesion"}
    for key, mask in [
        ("ms_lesion", study.lesion_mask),
        ("new_lesion", study.new_mask),
        ("enhancing_lesion", study.enhancing_mask),
    ]:
        table = lesion_table(mask)
        entry = findings[key]
        assert entry["lesion_count"] == len(table)
        assert entry["total_volume_ml"] == pytest.approx(sum(x.volume_ml for x in table))
        assert [row["volume_ml"] for row in entry["lesions"]] == [x.volume_ml for x in table]
        assert [row["bbox_min_ijk"] for row in entry["lesions"]] == [
            list(x.bbox_min_ijk) for x in table
        ]
    assert findings["ms_lesion"]["algorithm"]["model_card_sha256"] == "a1" * 32


def test_export_agrees_with_the_sr(results: ResultObjects) -> None:
    assert results.report is not None
    groups = hd.sr.Comprehensive3DSR.from_dataset(
        results.report
    ).content.get_volumetric_roi_measurement_groups()
    by_uid = {str(g.tracking_uid): g for g in groups}
    volume = hd.sr.CodedConcept("118565006", "SCT", "Volume")
    rows = [row for f in results.json["findings"].values() for row in f["lesions"]]  # type: ignore[union-attr]
    assert len(rows) == len(groups) - 3  # three summary groups
    for row in rows:
        group = by_uid[row["tracking_uid"]]
        assert group.get_measurements(name=volume)[0].value == pytest.approx(row["volume_ml"])


def test_export_lists_every_object_sent(results: ResultObjects) -> None:
    listed = [o["sop_instance_uid"] for o in results.json["objects"]]  # type: ignore[index]
    assert listed == [str(ds.SOPInstanceUID) for ds in results.datasets]
    modalities = [o["modality"] for o in results.json["objects"]]  # type: ignore[index]
    assert modalities.count("SEG") == 3 and modalities[-1] == "SR"  # one SEG per finding type
    segs = {o["sop_instance_uid"] for o in results.json["objects"] if o["modality"] == "SEG"}  # type: ignore[index]
    referenced = {f["seg_sop_instance_uid"] for f in results.json["findings"].values()}  # type: ignore[union-attr]
    assert referenced == segs
