"""Study assembly: decide when a study is complete and create its jobs in the same transaction.

A study is complete when it has been quiet for `quiet_period_s` and at least one enabled
pipeline has every series it requires. A study that never gets there is decided at
`deadline_s` after its receiving window opened: jobs for whatever can run, or INCOMPLETE with
the reason. Series that arrive after assembly are handled by `late_series_policy`.

In the deciding transaction: the study's state, one job row per pipeline that runs (with its
queue, the study's priority and, for new lesions, the prior study), a SKIPPED row with the
reason for each enabled pipeline that cannot (the report says which did not run and why),
the jobs' messages in the outbox, and an audit row per job. The messages are published
after the commit (`on_committed`), so a crash in between delays them and loses nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, selectinload, sessionmaker

from lesionwatch.config.schema import (
    AssemblyConfig,
    LateSeriesPolicy,
    PipelinesConfig,
    SeriesClass,
)

from .db.models import Job, JobState, Series, Study, StudyState, utcnow
from .db.prior_models import PriorSearch, PriorSource
from .jobs import create_job, publish_job
from .priors import prior_for_assembly

__all__ = ["AssemblyDecision", "StudyAssembler", "runnable_pipelines"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssemblyDecision:
    study_instance_uid: str
    state: StudyState
    jobs: tuple[str, ...]
    reason: str
    generation: int = 0


@dataclass
class _Plan:
    runnable: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # pipeline -> why it cannot run
    priors: dict[str, int] = field(default_factory=dict)  # pipeline -> prior study id
    waiting_for_prior: bool = False  # the prior search has not ended, nor its deadline


_SERIES_WORDS = {
    SeriesClass.FLAIR: "FLAIR",
    SeriesClass.T1_PRE: "T1 pre-contrast",
    SeriesClass.T1_POST: "T1 post-contrast",
    SeriesClass.T2: "T2",
}


def runnable_pipelines(
    session: Session,
    study: Study,
    pipelines: PipelinesConfig,
    only: Iterable[str] | None = None,
    now: datetime | None = None,
) -> _Plan:
    """Which enabled pipelines can run on `study` now, with a note for each that cannot.

    `waiting_for_prior`: the new-lesion pipeline waits for the study's prior search."""
    present = {s.series_class for s in study.series}
    plan = _Plan()
    wanted = set(only) if only is not None else None
    for name, cfg in pipelines.enabled().items():
        if wanted is not None and name not in wanted:
            continue
        missing = [c for c in cfg.required_series if c not in present]
        if missing:
            plan.notes.append(f"{name}: waiting for series {', '.join(c.value for c in missing)}")
            words = " and ".join(_SERIES_WORDS.get(c, c.value) for c in missing)
            plan.skipped[name] = f"no {words} series in this study"
            continue
        if name == "new_lesions":
            choice = prior_for_assembly(
                session, study, pipelines.new_lesions.prior_required_series, now or utcnow()
            )
            if choice.waiting:
                plan.notes.append(f"{name}: {choice.reason}")
                plan.waiting_for_prior = True
                # Used only when the study's own deadline forces a decision first.
                plan.skipped[name] = (
                    "no prior could be retrieved from PACS (search not finished at the "
                    "study's deadline)"
                )
                continue
            if choice.prior_study_id is None:
                plan.notes.append(f"{name}: {choice.reason}")
                plan.skipped[name] = choice.reason
                continue
            plan.priors[name] = choice.prior_study_id
        plan.runnable.append(name)
    return plan


class StudyAssembler:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        assembly: AssemblyConfig,
        pipelines: PipelinesConfig,
        *,
        on_committed: Callable[[], object] | None = None,
    ) -> None:
        self._sessions = sessions
        self._assembly = assembly
        self._pipelines = pipelines
        # Called after each decision that created jobs has committed (publishes the outbox).
        self._on_committed = on_committed

    def run_once(self, now: datetime | None = None) -> list[AssemblyDecision]:
        """One pass over open studies; each decision is its own transaction."""
        now = now or utcnow()
        decisions: list[AssemblyDecision] = []
        for study_id in self._candidate_ids(now):
            decision = self._decide(study_id, now)
            if decision is not None:
                decisions.append(decision)
                if decision.jobs and self._on_committed is not None:
                    self._on_committed()
                log.info(
                    "study %s -> %s (generation %d) jobs=%s %s",
                    decision.study_instance_uid,
                    decision.state.value,
                    decision.generation,
                    ",".join(decision.jobs) or "-",
                    decision.reason,
                )
        return decisions

    def _candidate_ids(self, now: datetime) -> list[int]:
        quiet_since = now - timedelta(seconds=self._assembly.quiet_period_s)
        deadline_since = now - timedelta(seconds=self._assembly.deadline_s)
        # A prior being retrieved from PACS arrives like any study; it is never processed.
        retrieved_priors = select(PriorSearch.prior_study_instance_uid).where(
            PriorSearch.prior_study_instance_uid.is_not(None),
            PriorSearch.source == PriorSource.PACS,
        )
        with self._sessions() as session:
            receiving = select(Study.id).where(
                Study.state == StudyState.RECEIVING,
                (Study.last_received_at <= quiet_since) | (Study.receiving_since <= deadline_since),
                Study.study_instance_uid.not_in(retrieved_priors),
            )
            # Assembled studies with a series newer than the last look at late series.
            late = (
                select(Study.id)
                .join(Series, Series.study_id == Study.id)
                .where(
                    Study.state.in_((StudyState.READY, StudyState.INCOMPLETE)),
                    Study.study_instance_uid.not_in(retrieved_priors),
                    Series.first_received_at > Study.assembled_at,
                    (Study.late_checked_at.is_(None))
                    | (Series.first_received_at > Study.late_checked_at),
                )
                .distinct()
            )
            return sorted(set(session.scalars(receiving)) | set(session.scalars(late)))

    def _decide(self, study_id: int, now: datetime) -> AssemblyDecision | None:
        with self._sessions.begin() as session:
            # Row lock (PostgreSQL) so that several assemblers never decide the same study twice.
            study = session.scalars(
                select(Study)
                .where(Study.id == study_id)
                .options(selectinload(Study.series))
                .with_for_update(skip_locked=True, of=Study)
            ).one_or_none()
            if study is None:
                return None
            if study.state == StudyState.RECEIVING:
                return self._assemble(session, study, now)
            return self._handle_late_series(session, study, now)

    def _assemble(self, session: Session, study: Study, now: datetime) -> AssemblyDecision | None:
        quiet = now - study.last_received_at >= timedelta(seconds=self._assembly.quiet_period_s)
        overdue = now - study.receiving_since >= timedelta(seconds=self._assembly.deadline_s)
        only = self._pending_pipeline_filter(study)
        plan = runnable_pipelines(session, study, self._pipelines, only, now)
        if not plan.runnable and not overdue:
            return None  # quiet but nothing can run yet: wait for series until the deadline
        if plan.waiting_for_prior and not overdue:
            return None  # the prior search ends (or reaches its own deadline) first
        if not quiet and not overdue:
            return None
        reason_parts = [] if quiet else [f"forced at deadline ({self._assembly.deadline_s:g} s)"]
        reason_parts += plan.notes
        study.assembled_at = now
        study.late_checked_at = now
        if not plan.runnable:
            study.state = StudyState.INCOMPLETE
            study.state_reason = "; ".join(reason_parts) or "no pipeline can run"
            return AssemblyDecision(
                study.study_instance_uid, study.state, (), study.state_reason, study.generation
            )
        # Earlier generations' unstarted jobs of the pipelines that run again are replaced.
        session.execute(
            update(Job)
            .where(
                Job.study_id == study.id,
                Job.generation < study.generation,
                Job.pipeline.in_(plan.runnable),
                Job.state.in_((JobState.PENDING, JobState.RETRYING)),
            )
            .values(
                state=JobState.SUPERSEDED, reason=f"superseded by generation {study.generation}"
            )
        )
        for name in plan.runnable:
            job = create_job(
                session,
                "assembler",
                study,
                name,
                queue=getattr(self._pipelines, name).queue,
                priority=study.priority,
                prior_study_id=plan.priors.get(name),
                now=now,
            )
            publish_job(session, job, study.study_instance_uid)
        for name, why in plan.skipped.items():
            exists = session.scalar(
                select(Job.id).where(
                    Job.study_id == study.id,
                    Job.pipeline == name,
                    Job.generation == study.generation,
                )
            )
            if exists is None:
                create_job(
                    session,
                    "assembler",
                    study,
                    name,
                    queue=getattr(self._pipelines, name).queue,
                    priority=study.priority,
                    state=JobState.SKIPPED,
                    reason=why,
                    now=now,
                )
        study.state = StudyState.READY
        study.state_reason = "; ".join(reason_parts)
        return AssemblyDecision(
            study.study_instance_uid,
            study.state,
            tuple(plan.runnable),
            study.state_reason,
            study.generation,
        )

    def _pending_pipeline_filter(self, study: Study) -> list[str] | None:
        """In a reprocessing generation under REPROCESS_IF_REQUIRED, only the pipelines whose
        required series arrived late run again; otherwise every enabled pipeline is considered."""
        if (
            study.generation == 0
            or self._assembly.late_series_policy != LateSeriesPolicy.REPROCESS_IF_REQUIRED
        ):
            return None
        late_classes = {
            s.series_class for s in study.series if s.first_received_at >= study.receiving_since
        }
        return [
            name
            for name, cfg in self._pipelines.enabled().items()
            if late_classes & set(cfg.required_series)
        ]

    def _handle_late_series(
        self, session: Session, study: Study, now: datetime
    ) -> AssemblyDecision | None:
        checked = study.late_checked_at or study.assembled_at
        assert checked is not None
        late = [s for s in study.series if s.first_received_at > checked]
        if not late:
            return None
        study.late_checked_at = now
        described = ", ".join(f"{s.series_number or '?'} {s.series_class.value}" for s in late)
        if study.state == StudyState.INCOMPLETE:
            # Nothing ran: a study waiting for series simply resumes receiving.
            return self._reopen(
                study,
                now,
                f"series arrived after it was marked incomplete: {described}",
                bump=False,
            )
        policy = self._assembly.late_series_policy
        required: set[SeriesClass] = set()
        for cfg in self._pipelines.enabled().values():
            required |= set(cfg.required_series)
        if policy == LateSeriesPolicy.IGNORE or (
            policy == LateSeriesPolicy.REPROCESS_IF_REQUIRED
            and not ({s.series_class for s in late} & required)
        ):
            note = f"late series ignored ({policy.value}): {described}"
            study.state_reason = "; ".join(p for p in (study.state_reason, note) if p)
            return AssemblyDecision(
                study.study_instance_uid, study.state, (), note, study.generation
            )
        return self._reopen(
            study, min(s.first_received_at for s in late), f"late series: {described}", bump=True
        )

    @staticmethod
    def _reopen(study: Study, since: datetime, reason: str, *, bump: bool) -> AssemblyDecision:
        if bump:
            study.generation += 1
        study.state = StudyState.RECEIVING
        study.receiving_since = since
        study.state_reason = reason
        return AssemblyDecision(study.study_instance_uid, study.state, (), reason, study.generation)
