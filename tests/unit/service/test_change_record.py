"""The comparison with the prior from a new-lesion job's record to the report's objects."""

from __future__ import annotations

import json

import numpy as np

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.sr import LesionMeasurement
from lesionwatch.pipelines.lesion_tracking import track_lesions
from lesionwatch.pipelines.new_lesions import ChangeAnalysis
from lesionwatch.pipelines.postprocess import label_lesions
from lesionwatch.service.change_record import (
    attach_change_status,
    change_record,
    change_summary,
)


def _labels(cubes: list[tuple[int, int, int, int]]) -> tuple[ImageVolume, list]:
    array = np.zeros((30, 30, 30), np.float32)
    for k, j, i, edge in cubes:
        array[k : k + edge, j : j + edge, i : i + edge] = 1.0
    return label_lesions(ImageVolume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))


def _analysis() -> tuple[ChangeAnalysis, list]:
    prior_labels, prior = _labels([(2, 2, 2, 3), (20, 20, 20, 3)])
    current_labels, current = _labels([(2, 2, 2, 4), (10, 10, 10, 3)])
    tracking = track_lesions(current_labels, current, prior_labels, prior)
    new_id = next(t.lesion_id for t in tracking.lesions if t.status.value == "new")
    analysis = ChangeAnalysis("tracking", "affine", 0.9, 0.6, tracking, frozenset({new_id}))
    return analysis, current


def test_the_record_is_json_and_gives_the_summary_and_each_flair_lesion_its_status() -> None:
    analysis, current = _analysis()
    record = json.loads(json.dumps(change_record(analysis)))
    assert record["reliable"] and record["radiological_activity"]
    assert record["counts"] == {
        "new": 1,
        "enlarging": 1,
        "stable": 0,
        "shrinking": 0,
        "disappeared": 1,
    }
    summary = change_summary(record, new_lesion_count=1)
    assert summary.active and summary.disappeared == 1 and summary.prior_lesions == 2

    flair = [LesionMeasurement.from_lesion(lesion) for lesion in current]
    tagged, matched = attach_change_status(flair, record)
    assert matched
    assert sorted(str(lesion.change_status) for lesion in tagged) == ["enlarging", "new"]
    enlarged = next(lesion for lesion in tagged if lesion.change_status == "enlarging")
    assert enlarged.prior_volume_ml == 0.027


def test_a_tracked_new_lesion_the_method_did_not_report_gets_no_status() -> None:
    analysis, current = _analysis()
    from dataclasses import replace

    record = change_record(replace(analysis, reported_new_ids=frozenset()))
    tagged, matched = attach_change_status(
        [LesionMeasurement.from_lesion(lesion) for lesion in current], record
    )
    assert matched
    assert sorted(str(lesion.change_status) for lesion in tagged) == ["None", "enlarging"]


def test_a_flair_table_that_does_not_match_gets_no_status() -> None:
    analysis, current = _analysis()
    record = change_record(analysis)
    flair = [LesionMeasurement.from_lesion(lesion) for lesion in current]
    moved = [
        LesionMeasurement(lesion.lesion_id, lesion.volume_ml, (50.0, 50.0, 50.0))
        for lesion in flair
    ]
    for lesions in (flair[:1], moved):
        tagged, matched = attach_change_status(lesions, record)
        assert not matched
        assert all(lesion.change_status is None for lesion in tagged)


def test_an_unreliable_comparison_records_why_and_no_counts() -> None:
    analysis = ChangeAnalysis("tracking", "rigid", 0.31, 0.6, None)
    record = change_record(analysis)
    assert record["reliable"] is False
    assert "counts" not in record
    assert "similarity 0.31 below the required 0.60" in record["reason"]
