"""From a claimed job to the files it runs on: series chosen, prior found, notes for the report.

The worker reads the database here and hands the executor plain file lists, so the executor
never needs a database connection.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import PurePosixPath

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from lesionwatch.config.schema import LesionWatchConfig, SeriesClass
from lesionwatch.dicom_io.sr import AnalysisState

from .db.models import REPORT_PIPELINE, Instance, Job, JobState, Series, Study
from .job_execution import PipelineRequest, PriorStudy, ReportNote, ReportRequest, SeriesFiles
from .jobs import JobTicket, inputs_signature, latest_per_pipeline
from .priors import find_local_prior

__all__ = [
    "ARCHIVE_DIR",
    "JobSkippedError",
    "PIPELINE_LABELS",
    "pipeline_request",
    "report_request",
    "result_dir",
    "series_files",
]

ARCHIVE_DIR = "archive"  # under the data directory (dicom_io.archive)
PIPELINE_LABELS = {
    "flair": "FLAIR lesions",
    "new_lesions": "New lesions since the prior study",
    "enhancing": "Gadolinium-enhancing lesions",
}


class JobSkippedError(Exception):
    """The job cannot run for its study (e.g. no prior any more): it is skipped, not failed."""


def result_dir(study_instance_uid: str, job_id: int) -> str:
    """Where a job writes its result objects, relative to the data directory."""
    return str(PurePosixPath("results") / study_instance_uid / f"job-{job_id}")


def _best_series(candidates: Sequence[Series], counts: dict[int, int]) -> Series:
    # Several series of one class (a repeat after motion, 2D and 3D): the one with the most
    # images (usually the 3D acquisition), then the later one.
    return max(
        candidates,
        key=lambda s: (counts.get(s.id, 0), s.series_number or 0, s.first_received_at),
    )


def series_files(session: Session, study: Study) -> dict[SeriesClass, SeriesFiles]:
    """The chosen series of each class in `study`, as archive files relative to the data dir."""
    counts = dict(
        session.execute(
            select(Instance.series_id, func.count())
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study.id)
            .group_by(Instance.series_id)
        ).all()
    )
    by_class: dict[SeriesClass, list[Series]] = {}
    for series in study.series:
        if counts.get(series.id):
            by_class.setdefault(series.series_class, []).append(series)
    chosen: dict[SeriesClass, SeriesFiles] = {}
    for series_class, candidates in by_class.items():
        if series_class == SeriesClass.OTHER:
            continue
        best = _best_series(candidates, counts)
        paths = session.scalars(
            select(Instance.path)
            .where(Instance.series_id == best.id)
            .order_by(Instance.instance_number, Instance.id)
        ).all()
        chosen[series_class] = SeriesFiles(
            best.series_instance_uid,
            tuple(str(PurePosixPath(ARCHIVE_DIR) / path) for path in paths),
        )
    return chosen


def _study(session: Session, study_id: int) -> Study:
    return session.scalars(
        select(Study).where(Study.id == study_id).options(selectinload(Study.series))
    ).one()


def pipeline_request(
    session: Session, ticket: JobTicket, config: LesionWatchConfig
) -> PipelineRequest:
    """The executor request of a pipeline job; JobSkippedError when it cannot run."""
    from lesionwatch.pipelines.registry import get_pipeline

    spec = get_pipeline(ticket.pipeline)
    study = _study(session, ticket.study_id)
    current = series_files(session, study)
    missing = [c.value for c in spec.required_series if c not in current]
    if missing:
        raise JobSkippedError(f"the study has no {', '.join(missing)} series")
    prior: PriorStudy | None = None
    if spec.needs_prior:
        prior_row = (
            _study(session, ticket.prior_study_id) if ticket.prior_study_id is not None else None
        )
        if prior_row is None:
            required = getattr(config.pipelines, spec.name).prior_required_series
            found = find_local_prior(session, study, required)
            prior_row = _study(session, found.id) if found is not None else None
        if prior_row is None:
            raise JobSkippedError("no prior study with a FLAIR series for this patient")
        prior = PriorStudy(
            prior_row.study_instance_uid, prior_row.study_date, series_files(session, prior_row)
        )
    return PipelineRequest(
        job_id=ticket.job_id,
        pipeline=ticket.pipeline,
        study_instance_uid=ticket.study_instance_uid,
        current=current,
        prior=prior,
        output_dir=result_dir(ticket.study_instance_uid, ticket.job_id),
        previous_capture_slices=_previous_capture_slices(session, ticket),
        reference_mask=_reference_mask(session, ticket, spec.reference),
    )


def _reference_mask(session: Session, ticket: JobTicket, reference: str | None) -> str | None:
    """The mask file of the study's latest successful job of the `reference` pipeline."""
    if reference is None:
        return None
    jobs = session.scalars(
        select(Job).where(Job.study_id == ticket.study_id, Job.pipeline == reference)
    ).all()
    latest = latest_per_pipeline(jobs).get(reference)
    if latest is None or latest.state != JobState.SUCCEEDED or not latest.result_json:
        return None
    mask_file = json.loads(latest.result_json).get("mask_file")
    return str(mask_file) if mask_file else None


def _previous_capture_slices(session: Session, ticket: JobTicket) -> tuple[int, ...]:
    """Slices with secondary captures in any earlier result of this pipeline for the study
    (another generation, or this job's previous run before an operator's retry)."""
    records = session.scalars(
        select(Job.result_json).where(
            Job.study_id == ticket.study_id,
            Job.pipeline == ticket.pipeline,
            Job.result_json.is_not(None),
        )
    ).all()
    slices: set[int] = set()
    for record in records:
        slices.update(json.loads(record or "{}").get("capture_slices", []))
    return tuple(sorted(slices))


def _note(name: str, job: Job | None, enabled: bool) -> ReportNote | None:
    label = PIPELINE_LABELS.get(name, name)
    if not enabled:
        return ReportNote(AnalysisState.NOT_ENABLED.value, f"{label}: not enabled at this site")
    if job is None:
        return ReportNote(AnalysisState.SERIES_MISSING.value, f"{label}: not assessed")
    if job.state == JobState.SUCCEEDED:
        return None
    if job.state == JobState.SKIPPED:
        no_prior = "prior" in job.reason
        state = AnalysisState.NO_PRIOR_AVAILABLE if no_prior else AnalysisState.SERIES_MISSING
        return ReportNote(state.value, f"{label} not assessed ({job.reason})")
    if job.state == JobState.CANCELLED:
        return ReportNote(
            AnalysisState.ANALYSIS_FAILED.value, f"{label}: not assessed (stopped by an operator)"
        )
    # FAILED: the reason may carry paths and exception text; the report says it plainly.
    kind = {"permanent": "the images could not be analysed", "timeout": "the analysis timed out"}
    return ReportNote(
        AnalysisState.ANALYSIS_FAILED.value,
        f"{label}: not assessed, {kind.get(job.failure_kind, 'the analysis failed')} "
        f"(LesionWatch job {job.id})",
    )


def report_request(session: Session, ticket: JobTicket, config: LesionWatchConfig) -> ReportRequest:
    """The executor request of a study report job: every pipeline's latest outcome."""
    jobs = list(session.scalars(select(Job).where(Job.study_id == ticket.study_id)))
    latest = latest_per_pipeline(jobs)
    findings = [
        json.loads(job.result_json)
        for job in latest.values()
        if job.state == JobState.SUCCEEDED and job.result_json
    ]
    if not findings:
        raise JobSkippedError("no pipeline of the study succeeded: nothing to report")
    notes = []
    enabled = config.pipelines.enabled()
    for name in ("flair", "new_lesions", "enhancing"):
        note = _note(name, latest.get(name), name in enabled)
        if note is not None:
            notes.append(note)
    return ReportRequest(
        job_id=ticket.job_id,
        study_instance_uid=ticket.study_instance_uid,
        version=ticket.report_version,
        findings=findings,
        notes=notes,
        inputs=inputs_signature(latest),
        output_dir=result_dir(ticket.study_instance_uid, ticket.job_id),
    )


def is_report(ticket: JobTicket) -> bool:
    return ticket.pipeline == REPORT_PIPELINE
