"""The prior search: started on a study's first image, so the prior is here when it completes.

One `PriorSearch` row per new study (state machine in service.db.prior_models). An attempt
looks in LesionWatch's own archive first, then asks the query PACS (service.prior_fetch),
and retrieves the chosen prior's series. Failures are retried with backoff while attempts
and time are left; they never hold up the current study beyond the search's deadline
(the assembler then processes it without a prior, and the report says why).

Retrieved priors arrive like any study; their UID is recorded before the retrieve starts,
so no search is started for them and the assembler never processes them (StudyState.PRIOR).
Logs name studies by UID only, never by patient name or ID.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from lesionwatch.config.schema import LesionWatchConfig, PriorSearchConfig, SeriesClass
from lesionwatch.dicom_io.archive import Archive
from lesionwatch.dicom_io.query_retrieve import QueryRetrieveClient, QueryRetrieveError, pacs_node

from .db.engine import write_session
from .db.models import Instance, Series, Study, StudyState, utcnow
from .db.prior_models import PriorSearch, PriorSearchState, PriorSource
from .ingest import InstanceRecorder, RecordResult
from .prior_fetch import ArchiveStore, PacsPrior, PriorFetcher
from .prior_matching import CurrentStudy
from .priors import find_local_prior

__all__ = ["PriorSearcher", "build_prior_searcher"]

log = logging.getLogger(__name__)

_OPEN_STATES = (PriorSearchState.SEARCHING, PriorSearchState.RETRIEVING)


@dataclass(frozen=True)
class _Claim:
    search_id: int
    study_id: int
    state: PriorSearchState
    attempt: int
    prior: PacsPrior | None  # set when retrieving (a retry retrieves again, no new query)


class PriorSearcher:
    """Runs the prior searches of one process (the listener's).

    `fetcher` is None when no PACS is configured: only the local archive is searched.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: PriorSearchConfig,
        required: Sequence[SeriesClass],
        archive_root: Path,
        fetcher: PriorFetcher | None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.required = tuple(required)
        self.archive_root = archive_root
        self.fetcher = fetcher
        self._wake = threading.Event()
        # How long a claimed attempt may take before another searcher may take it over.
        pacs = settings.pacs
        self._claim_s = 60.0 + (pacs.timeout_s * 8 + pacs.retrieve_timeout_s if pacs else 0)

    # -- the listener's hook and the loop ------------------------------------------------------

    def notify(self, result: RecordResult) -> None:
        """`on_recorded` hook: a new study starts its search at once (cheap: sets an event)."""
        if result.new_study:
            self._wake.set()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # the database away, a bug: the next pass tries again
                log.exception("prior search pass failed")
            self._wake.wait(self.settings.poll_interval_s)
            self._wake.clear()

    def run_once(self, now: datetime | None = None) -> int:
        """Start searches for new studies, then run every due attempt; returns attempts run."""
        self.start_searches(now)
        done = 0
        while (claim := self._claim_due(now)) is not None:
            self._attempt(claim, now)
            done += 1
        return done

    # -- rows -----------------------------------------------------------------------------------

    def start_searches(self, now: datetime | None = None) -> list[int]:
        """A SEARCHING row for each receiving study that has none and is no prior itself."""
        now = now or utcnow()
        priors = select(PriorSearch.prior_study_instance_uid).where(
            PriorSearch.prior_study_instance_uid.is_not(None)
        )
        with self.sessions() as session:
            studies = session.execute(
                select(Study.id, Study.first_received_at)
                .outerjoin(PriorSearch, PriorSearch.study_id == Study.id)
                .where(
                    Study.state == StudyState.RECEIVING,
                    Study.generation == 0,
                    PriorSearch.id.is_(None),
                    Study.study_instance_uid.not_in(priors),
                )
            ).all()
        started = []
        for study_id, first_received_at in studies:
            deadline = first_received_at + timedelta(seconds=self.settings.deadline_s)
            try:
                with self.sessions.begin() as session:
                    session.add(
                        PriorSearch(
                            study_id=study_id,
                            state=PriorSearchState.SEARCHING,
                            started_at=now,
                            updated_at=now,
                            deadline_at=deadline,
                            next_attempt_at=now,
                        )
                    )
            except IntegrityError:
                continue  # another listener process started it
            started.append(study_id)
        return started

    def _claim_due(self, now: datetime | None) -> _Claim | None:
        now = now or utcnow()
        with write_session(self.sessions) as session:
            search = session.scalars(
                select(PriorSearch)
                .where(
                    PriorSearch.state.in_(_OPEN_STATES),
                    PriorSearch.next_attempt_at <= now,
                )
                .order_by(PriorSearch.next_attempt_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if search is None:
                return None
            if now >= search.deadline_at:
                last = f" (last: {search.reason})" if search.reason else ""
                self._finish(
                    search,
                    PriorSearchState.FAILED,
                    f"not finished within {self.settings.deadline_s:g} s{last}",
                    now,
                )
                return _Claim(search.id, search.study_id, PriorSearchState.FAILED, 0, None)
            search.attempts += 1
            search.next_attempt_at = now + timedelta(seconds=self._claim_s)
            prior = None
            if search.state == PriorSearchState.RETRIEVING and search.prior_study_instance_uid:
                prior = PacsPrior(
                    search.prior_study_instance_uid,
                    "",
                    tuple(search.prior_series_instance_uids.split()),
                )
            return _Claim(search.id, search.study_id, search.state, search.attempts, prior)

    # -- one attempt ----------------------------------------------------------------------------

    def _attempt(self, claim: _Claim, now: datetime | None) -> None:
        if claim.state.terminal:
            return  # closed at its deadline by _claim_due
        try:
            if claim.prior is None:
                self._search(claim, now)
            else:
                self._retrieve(claim, claim.prior, now)
        except QueryRetrieveError as exc:
            self._failed_attempt(claim, exc.reason, exc.transient, now)
        except Exception as exc:
            log.exception("prior search for study id %d failed", claim.study_id)
            self._failed_attempt(claim, f"internal error: {exc}", True, now)

    def _search(self, claim: _Claim, now: datetime | None) -> None:
        with self.sessions() as session:
            study = session.get(Study, claim.study_id)
            assert study is not None
            if not study.patient_id:
                self._close(claim, PriorSearchState.NONE, "the study has no Patient ID", now)
                return
            current = self._current(session, study)
            local = self._local_prior(session, study, current)
            study_uid = study.study_instance_uid
        if local is not None:
            self._close(
                claim,
                PriorSearchState.FOUND,
                "in LesionWatch's archive",
                now,
                prior_study_id=local,
                source=PriorSource.LOCAL,
            )
            return
        if self.fetcher is None:
            self._close(
                claim,
                PriorSearchState.NONE,
                "none in LesionWatch's archive and no PACS configured for queries",
                now,
            )
            return
        answer = self.fetcher.find(current)
        if answer.prior is None:
            self._close(claim, PriorSearchState.NONE, answer.reason, now)
            return
        log.info(
            "prior of study %s at the PACS: study %s (%s); retrieving %d series",
            study_uid,
            answer.prior.study_instance_uid,
            answer.prior.study_date,
            len(answer.prior.series_instance_uids),
        )
        if self._already_here(answer.prior) is None:
            with write_session(self.sessions) as session:
                search = session.get(PriorSearch, claim.search_id)
                assert search is not None
                search.state = PriorSearchState.RETRIEVING
                search.source = PriorSource.PACS
                search.prior_study_instance_uid = answer.prior.study_instance_uid
                search.prior_series_instance_uids = " ".join(answer.prior.series_instance_uids)
                search.reason = answer.reason
            self._retrieve(claim, answer.prior, now)
            return
        self._retrieve(claim, answer.prior, now, fetch=False)

    def _retrieve(
        self, claim: _Claim, prior: PacsPrior, now: datetime | None, *, fetch: bool = True
    ) -> None:
        if fetch:
            assert self.fetcher is not None
            outcome = self.fetcher.retrieve(prior)
            log.info(
                "retrieved prior %s: %d instance(s) stored, %d warning(s)",
                prior.study_instance_uid,
                outcome.completed,
                outcome.warning,
            )
        prior_id = self._already_here(prior)
        if prior_id is None:
            raise QueryRetrieveError(
                f"the PACS reported the retrieve of {prior.study_instance_uid} done, but its "
                "series are not (yet) recorded here",
                transient=True,
            )
        self._close(
            claim,
            PriorSearchState.FOUND,
            f"retrieved from PACS (study of {self._study_date(prior_id)})",
            now,
            prior_study_id=prior_id,
            source=PriorSource.PACS,
            prior=prior,
        )

    # -- helpers --------------------------------------------------------------------------------

    def _current(self, session: Session, study: Study) -> CurrentStudy:
        keywords = ["IssuerOfPatientID"]
        link = self.settings.accession_link_attribute
        if link:
            keywords.append(link)
        header = self._header(session, study.id, keywords)
        return CurrentStudy(
            study_instance_uid=study.study_instance_uid,
            patient_id=study.patient_id,
            study_date=study.study_date,
            study_time=study.study_time,
            accession_number=study.accession_number,
            issuer_of_patient_id=header.get("IssuerOfPatientID", ""),
            linked_accession_number=header.get(link, "") if link else "",
        )

    def _header(self, session: Session, study_id: int, keywords: list[str]) -> dict[str, str]:
        """Attributes of the study's first archived instance (the study row lacks them)."""
        path = session.scalar(
            select(Instance.path)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
            .order_by(Instance.id)
            .limit(1)
        )
        if path is None:
            return {}
        ds = dcmread(self.archive_root / path, stop_before_pixels=True, specific_tags=keywords)
        return {k: str(ds.get(k, "") or "").strip() for k in keywords}

    def _local_prior(self, session: Session, study: Study, current: CurrentStudy) -> int | None:
        local = find_local_prior(session, study, self.required)
        if local is None:
            return None
        if self.settings.match_issuer_of_patient_id:
            theirs = self._header(session, local.id, ["IssuerOfPatientID"]).get(
                "IssuerOfPatientID", ""
            )
            if not current.issuer_of_patient_id or theirs != current.issuer_of_patient_id:
                return None
        if (
            current.linked_accession_number
            and self.settings.accession_link_required
            and local.accession_number != current.linked_accession_number
        ):
            return None
        return local.id

    def _already_here(self, prior: PacsPrior) -> int | None:
        """The local study row of `prior` once every chosen series has instances here."""
        with self.sessions() as session:
            study = session.scalars(
                select(Study)
                .where(Study.study_instance_uid == prior.study_instance_uid)
                .options(selectinload(Study.series))
            ).one_or_none()
            if study is None:
                return None
            wanted = set(prior.series_instance_uids)
            counts = dict(
                session.execute(
                    select(Series.series_instance_uid, func.count(Instance.id))
                    .join(Instance, Instance.series_id == Series.id)
                    .where(Series.study_id == study.id)
                    .group_by(Series.series_instance_uid)
                ).all()
            )
            if any(not counts.get(uid) for uid in wanted):
                return None
            classes = {s.series_class for s in study.series if s.series_instance_uid in wanted}
            if not set(self.required) <= classes:
                raise QueryRetrieveError(
                    "the retrieved series are not classified "
                    f"{', '.join(c.value for c in self.required)} here (check the "
                    "classification rules)",
                    transient=False,
                )
            return study.id

    def _study_date(self, study_id: int) -> str:
        with self.sessions() as session:
            study = session.get(Study, study_id)
            return study.study_date if study is not None else ""

    def _failed_attempt(
        self, claim: _Claim, reason: str, transient: bool, now: datetime | None
    ) -> None:
        now = now or utcnow()
        with write_session(self.sessions) as session:
            search = session.get(PriorSearch, claim.search_id)
            if search is None or search.state.terminal:
                return
            delay = self.settings.retry_initial_delay_s * (
                self.settings.retry_backoff_factor ** (claim.attempt - 1)
            )
            retry_at = now + timedelta(seconds=delay)
            if (
                transient
                and claim.attempt < self.settings.max_attempts
                and retry_at < search.deadline_at
            ):
                search.reason = reason
                search.next_attempt_at = retry_at
                log.warning(
                    "prior search for study id %d: attempt %d failed, retrying in %.0f s: %s",
                    claim.study_id,
                    claim.attempt,
                    delay,
                    reason,
                )
                return
            self._finish(search, PriorSearchState.FAILED, reason, now)

    def _close(
        self,
        claim: _Claim,
        state: PriorSearchState,
        reason: str,
        now: datetime | None,
        *,
        prior_study_id: int | None = None,
        source: PriorSource | None = None,
        prior: PacsPrior | None = None,
    ) -> None:
        now = now or utcnow()
        with write_session(self.sessions) as session:
            search = session.get(PriorSearch, claim.search_id)
            assert search is not None
            if search.state.terminal:
                return
            search.prior_study_id = prior_study_id
            if source is not None:
                search.source = source
            if prior_study_id is not None:
                prior_row = session.get(Study, prior_study_id)
                assert prior_row is not None
                search.prior_study_instance_uid = prior_row.study_instance_uid
                if source == PriorSource.PACS:
                    self._mark_prior(prior_row, search, now)
            self._finish(search, state, reason, now)

    def _finish(
        self, search: PriorSearch, state: PriorSearchState, reason: str, now: datetime
    ) -> None:
        if state == PriorSearchState.FAILED and search.prior_study_instance_uid:
            # A retrieve that failed half-way leaves part of the prior here: still a prior.
            partial = self._session_of(search).scalar(
                select(Study).where(Study.study_instance_uid == search.prior_study_instance_uid)
            )
            if partial is not None:
                self._mark_prior(partial, search, now)
        _record_end(search, state, reason, now)

    @staticmethod
    def _mark_prior(prior_row: Study, search: PriorSearch, now: datetime) -> None:
        """A retrieved prior is never processed: a study only received as a prior gets the
        PRIOR state; one already processed here keeps its state, and the series fetched now
        are not taken for late series."""
        if prior_row.state == StudyState.RECEIVING:
            prior_row.state = StudyState.PRIOR
            prior_row.state_reason = f"retrieved from PACS as a prior (search {search.id})"
        else:
            prior_row.late_checked_at = now

    @staticmethod
    def _session_of(search: PriorSearch) -> Session:
        from sqlalchemy.orm import object_session

        session = object_session(search)
        assert session is not None
        return session


def _record_end(search: PriorSearch, state: PriorSearchState, reason: str, now: datetime) -> None:
    search.state = state
    search.reason = reason
    search.finished_at = now
    search.updated_at = now
    log.info(
        "prior search %d of study id %d -> %s: %s", search.id, search.study_id, state.value, reason
    )


def build_prior_searcher(
    config: LesionWatchConfig,
    sessions: sessionmaker[Session],
    archive: Archive,
    recorder: InstanceRecorder,
) -> PriorSearcher | None:
    """The listener's prior searcher, or None when there is nothing to search for (no query
    PACS configured, or the new-lesion pipeline off): the assembler then looks only in the
    local archive, as before."""
    settings = config.prior_search
    pacs = settings.pacs
    if pacs is None or not config.pipelines.new_lesions.enabled:
        return None
    required = config.pipelines.new_lesions.prior_required_series
    client = QueryRetrieveClient(
        pacs_node(pacs, config.listener.ae_title), retrieve_timeout_s=pacs.retrieve_timeout_s
    )
    fetcher = PriorFetcher(
        client,
        settings,
        config.classification,
        required,
        move_destination=pacs.move_destination or config.listener.ae_title,
        store=ArchiveStore(archive, recorder, pacs.ae_title),
    )
    return PriorSearcher(sessions, settings, required, archive.root, fetcher)
