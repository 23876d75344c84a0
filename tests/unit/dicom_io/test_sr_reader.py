"""Reading back a report: the numbers a PACS user sees are the numbers LesionWatch measured."""

from __future__ import annotations

import pytest
from result_cases import Study, build_study

from lesionwatch.dicom_io.results import (
    AnalysisNote,
    AnalysisState,
    JobIdentity,
    build_result_objects,
)
from lesionwatch.dicom_io.sr_reader import read_report_summary
from lesionwatch.pipelines.postprocess import lesion_table


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return build_study(tmp_path_factory.mktemp("study"))


def test_counts_volumes_and_statements_round_trip(study: Study) -> None:
    note = AnalysisNote(AnalysisState.SERIES_MISSING, "Gadolinium-enhancing lesions not assessed")
    results = build_result_objects(
        study.findings(with_enhancing=False), job=JobIdentity("s"), prior=study.prior, notes=[note]
    )
    assert results.report is not None
    summary = read_report_summary(results.report)
    by_label = {f.label: f for f in summary.findings}
    assert set(by_label) == {"MS lesion (FLAIR)", "New MS lesion"}
    table = lesion_table(study.lesion_mask)
    flair = by_label["MS lesion (FLAIR)"]
    assert flair.lesion_count == len(table)
    assert flair.total_volume_ml == pytest.approx(sum(x.volume_ml for x in table))
    assert sorted(flair.lesion_volumes_ml) == pytest.approx(sorted(x.volume_ml for x in table))
    assert summary.statements[0].startswith("Compared with prior study of 2023-03-01")
    assert summary.statements[1] == "Series missing: Gadolinium-enhancing lesions not assessed"
    assert summary.study_instance_uid == str(study.flair[0].StudyInstanceUID)
