"""The comparison with the prior through the worker's executor, on a real longitudinal pair.

open_ms_data patient01 (baseline and follow-up FLAIR, cropped to the central 120 mm so each
network runs one window on CPU) as archived DICOM; the shipped FLAIR and new-lesion models.
A FLAIR job, a new-lesion job and the report job run as a worker runs them:
- registered well, the SR gives every FLAIR lesion its change since the prior and says
  whether there is radiological activity, with the same counts as the job;
- a registration below the similarity floor reports no new-lesion count at all: the SR says
  the comparison is unreliable, and no prior is claimed as compared.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
import pytest
import torch
from prior_studies import identity, write_study

from lesionwatch.config.schema import (
    InferenceConfig,
    NewLesionsPipelineConfig,
    PipelinesConfig,
    ResultsConfig,
    SeriesClass,
)
from lesionwatch.dicom_io.sr_reader import read_report_summary
from lesionwatch.pipelines.model_cache import ModelCache
from lesionwatch.service.job_execution import (
    ExecutorSettings,
    PipelineRequest,
    PriorStudy,
    ReportRequest,
    SeriesFiles,
    execute_pipeline,
    execute_report,
)

pytestmark = pytest.mark.slow

CURRENT = identity("change-current", dt.date(2024, 6, 1))
PRIOR = identity("change-prior", dt.date(2023, 3, 1))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SeriesFiles, SeriesFiles]:
    data_dir = tmp_path_factory.mktemp("lw")
    series = {}
    for who, volumes in ((PRIOR, 1), (CURRENT, 2)):
        [built] = write_study(
            who, volumes, [SeriesClass.FLAIR], data_dir / "archive" / who.study_instance_uid,
            crop_mm=120.0,
        )  # fmt: skip
        uid = str(pydicom.dcmread(built.files[0], stop_before_pixels=True).SeriesInstanceUID)
        files = tuple(str(path.relative_to(data_dir)) for path in built.files)
        series[volumes] = SeriesFiles(uid, files)
    return data_dir, series[1], series[2]


def _settings(data_dir: Path, new_lesions: NewLesionsPipelineConfig) -> ExecutorSettings:
    return ExecutorSettings(
        data_dir=str(data_dir),
        inference=InferenceConfig(device="cpu", step_mm=128),
        pipelines=PipelinesConfig(new_lesions=new_lesions),
        results=ResultsConfig(secondary_capture=False),
    )


def _run(
    archive: tuple[Path, SeriesFiles, SeriesFiles], new_lesions: NewLesionsPipelineConfig
) -> tuple[dict, dict, pydicom.Dataset]:
    data_dir, prior_flair, current_flair = archive
    settings = _settings(data_dir, new_lesions)
    models = ModelCache(settings.pipelines, torch.device("cpu"))
    current = {SeriesClass.FLAIR: current_flair}
    prior = PriorStudy(PRIOR.study_instance_uid, "20230301", {SeriesClass.FLAIR: prior_flair})
    tag = new_lesions.min_registration_similarity
    flair = execute_pipeline(
        PipelineRequest(1, "flair", CURRENT.study_instance_uid, current, None, f"out/{tag}/1"),
        models,
        settings,
    )
    new = execute_pipeline(
        PipelineRequest(2, "new_lesions", CURRENT.study_instance_uid, current, prior,
                        f"out/{tag}/2"),
        models,
        settings,
    )  # fmt: skip
    report = execute_report(
        ReportRequest(3, CURRENT.study_instance_uid, 1, [flair.record, new.record], [], [],
                      f"out/{tag}/3"),
        settings,
    )  # fmt: skip
    [sr_file] = report.files
    return flair.record, new.record, pydicom.dcmread(data_dir / sr_file)


def test_a_good_registration_gives_each_flair_lesion_its_change(archive) -> None:
    flair, new, sr = _run(archive, NewLesionsPipelineConfig())
    change = new["change"]
    assert change["reliable"] and change["similarity"] > 0.6
    assert len(change["lesions"]) == flair["lesion_count"]  # one tracking row per FLAIR lesion
    summary = read_report_summary(sr)
    assert {f.label for f in summary.findings} == {"MS lesion (FLAIR)", "New MS lesion"}
    statuses = summary.change_statuses["MS lesion (FLAIR)"]
    counts = change["counts"]
    assert statuses.get("Enlarged", 0) == counts["enlarging"]
    assert statuses.get("No change", 0) == counts["stable"]
    assert statuses.get("Decreased", 0) == counts["shrinking"]
    [text] = [s for s in summary.statements if s.startswith("Change since prior")]
    assert f"{new['lesion_count']} new, {counts['enlarging']} enlarging" in text
    assert summary.radiological_activity == (new["lesion_count"] + counts["enlarging"] > 0)


def test_a_failed_registration_check_reports_no_count(archive) -> None:
    flair, new, sr = _run(archive, NewLesionsPipelineConfig(min_registration_similarity=0.999))
    assert new["comparison_unreliable"] and new["seg"] is None and new["lesion_count"] is None
    summary = read_report_summary(sr)
    assert {f.label for f in summary.findings} == {"MS lesion (FLAIR)"}
    assert summary.radiological_activity is None
    [note] = [s for s in summary.statements if "New lesions" in s]
    assert "comparison with the prior study of 2023-03-01 unreliable" in note
    assert "below the required 1.00" in note
    assert not any(s.startswith("Compared with prior") for s in summary.statements)
