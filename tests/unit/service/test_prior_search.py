"""The prior search's state machine and the assembler's wait for it (SQLite and PostgreSQL).

The PACS side here is a stand-in for `PriorFetcher` (our own class) that fails or must not
be called; the DICOM exchanges themselves are tested against Orthanc in
tests/integration/test_prior_search_orthanc.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from test_assembler import add_study

from lesionwatch.config.schema import (
    AssemblyConfig,
    PipelinesConfig,
    PriorSearchConfig,
    SeriesClass,
)
from lesionwatch.dicom_io.query_retrieve import QueryRetrieveError
from lesionwatch.service.assembler import StudyAssembler
from lesionwatch.service.db import Job, JobState, Study, StudyState
from lesionwatch.service.db.prior_models import PriorSearch, PriorSearchState, PriorSource
from lesionwatch.service.prior_search import PriorSearcher

T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
PACS = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}


class FailingFetcher:
    """Stands in for the PACS half: every query fails (or must never be made)."""

    def __init__(self, transient: bool = True, *, forbidden: bool = False) -> None:
        self.transient = transient
        self.forbidden = forbidden
        self.calls = 0

    def find(self, current: object) -> object:
        assert not self.forbidden, "the PACS was asked although a local prior exists"
        self.calls += 1
        raise QueryRetrieveError(
            f"connection refused (call {self.calls})", transient=self.transient
        )


def searcher(
    sessions: sessionmaker[Session], fetcher: FailingFetcher | None, **settings: object
) -> PriorSearcher:
    config = PriorSearchConfig.model_validate({"pacs": PACS} | settings)
    return PriorSearcher(sessions, config, (SeriesClass.FLAIR,), Path("/nonexistent"), fetcher)  # type: ignore[arg-type]


def search_of(sessions: sessionmaker[Session], uid: str) -> PriorSearch:
    with sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        return session.scalars(select(PriorSearch).where(PriorSearch.study_id == study.id)).one()


def test_local_prior_is_found_first_without_asking_the_pacs(
    sessions: sessionmaker[Session],
) -> None:
    add_study(sessions, "1.1", [SeriesClass.FLAIR], T0 - timedelta(days=300), study_date="20260101")
    add_study(sessions, "1.2", [SeriesClass.FLAIR], T0)
    with sessions.begin() as session:  # the old study was processed long ago
        old = session.scalars(select(Study).where(Study.study_instance_uid == "1.1")).one()
        old.state = StudyState.READY
    finder = searcher(sessions, FailingFetcher(forbidden=True))
    assert finder.run_once(T0) == 1
    search = search_of(sessions, "1.2")
    assert (search.state, search.source) == (PriorSearchState.FOUND, PriorSource.LOCAL)
    assert search.prior_study_instance_uid == "1.1"
    decisions = StudyAssembler(sessions, AssemblyConfig(), PipelinesConfig()).run_once(
        T0 + timedelta(seconds=61)
    )
    assert [d.jobs for d in decisions] == [("flair", "new_lesions")]


def test_no_local_prior_and_no_pacs_is_none_with_the_reason(
    sessions: sessionmaker[Session],
) -> None:
    add_study(sessions, "1.2", [SeriesClass.FLAIR], T0)
    searcher(sessions, None).run_once(T0)
    search = search_of(sessions, "1.2")
    assert search.state == PriorSearchState.NONE
    assert search.reason == "none in LesionWatch's archive and no PACS configured for queries"


def test_failures_are_retried_with_backoff_then_recorded_as_failed(
    sessions: sessionmaker[Session],
) -> None:
    add_study(sessions, "1.2", [SeriesClass.FLAIR], T0)
    fetcher = FailingFetcher()
    finder = searcher(
        sessions, fetcher, max_attempts=3, retry_initial_delay_s=10, retry_backoff_factor=2
    )
    assert finder.run_once(T0) == 1
    search = search_of(sessions, "1.2")
    assert search.state == PriorSearchState.SEARCHING  # still open: a retry is due at +10 s
    assert search.next_attempt_at == T0 + timedelta(seconds=10)
    assert search.reason == "connection refused (call 1)"
    assert finder.run_once(T0 + timedelta(seconds=9)) == 0
    assert finder.run_once(T0 + timedelta(seconds=10)) == 1
    assert search_of(sessions, "1.2").next_attempt_at == T0 + timedelta(seconds=30)
    assert finder.run_once(T0 + timedelta(seconds=30)) == 1
    search = search_of(sessions, "1.2")
    assert (search.state, search.attempts) == (PriorSearchState.FAILED, 3)
    assert search.reason == "connection refused (call 3)"
    assert search.finished_at == T0 + timedelta(seconds=30)
    assert finder.run_once(T0 + timedelta(seconds=300)) == 0  # ended: never tried again


def test_a_permanent_failure_is_not_retried(sessions: sessionmaker[Session]) -> None:
    add_study(sessions, "1.2", [SeriesClass.FLAIR], T0)
    fetcher = FailingFetcher(transient=False)
    assert searcher(sessions, fetcher).run_once(T0) == 1
    assert search_of(sessions, "1.2").state == PriorSearchState.FAILED
    assert fetcher.calls == 1


def test_a_claimed_search_is_not_taken_by_a_second_searcher(
    sessions: sessionmaker[Session],
) -> None:
    add_study(sessions, "1.2", [SeriesClass.FLAIR], T0)
    first, second = searcher(sessions, FailingFetcher()), searcher(sessions, FailingFetcher())
    first.start_searches(T0)
    assert first._claim_due(T0) is not None
    assert second._claim_due(T0) is None  # claimed until the attempt's time budget lapses
    assert second.start_searches(T0) == []  # one search per study


def test_the_study_waits_for_the_search_but_never_past_its_deadline(
    sessions: sessionmaker[Session],
) -> None:
    add_study(sessions, "1.2", [SeriesClass.FLAIR], T0)
    finder = searcher(sessions, FailingFetcher(), deadline_s=120, retry_initial_delay_s=50)
    finder.run_once(T0)  # attempt 1 fails; the retry is due at +50 s
    assembler = StudyAssembler(sessions, AssemblyConfig(quiet_period_s=60), PipelinesConfig())
    # Quiet since +60 s, but the search is still open: nothing is decided yet.
    assert assembler.run_once(T0 + timedelta(seconds=61)) == []
    # At the search's deadline the study goes on without a prior, and the report will say why.
    [decision] = assembler.run_once(T0 + timedelta(seconds=120))
    assert decision.jobs == ("flair",)
    with sessions() as session:
        skipped = session.scalars(select(Job).where(Job.pipeline == "new_lesions")).one()
    assert skipped.state == JobState.SKIPPED
    assert skipped.reason == (
        "no prior could be retrieved from PACS (search still searching at its deadline; "
        "last error: connection refused (call 1))"
    )
    # The searcher closes the search when it next looks.
    finder.run_once(T0 + timedelta(seconds=121))
    search = search_of(sessions, "1.2")
    assert search.state == PriorSearchState.FAILED
    assert search.reason == "not finished within 120 s (last: connection refused (call 1))"


@pytest.mark.parametrize("state", [PriorSearchState.FAILED, PriorSearchState.NONE])
def test_an_ended_search_decides_at_once(
    sessions: sessionmaker[Session], state: PriorSearchState
) -> None:
    add_study(sessions, "1.2", [SeriesClass.FLAIR], T0)
    searcher(sessions, None).start_searches(T0)
    with sessions.begin() as session:
        search = session.scalars(select(PriorSearch)).one()
        search.state, search.reason = state, "why"
    [decision] = StudyAssembler(sessions, AssemblyConfig(), PipelinesConfig()).run_once(
        T0 + timedelta(seconds=61)
    )
    with sessions() as session:
        skipped = session.scalars(select(Job).where(Job.pipeline == "new_lesions")).one()
    expected = {
        PriorSearchState.FAILED: "no prior could be retrieved from PACS (why)",
        PriorSearchState.NONE: "no prior study with a FLAIR series for this patient (why)",
    }
    assert skipped.reason == expected[state]
