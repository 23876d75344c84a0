"""The prior search against a real PACS (Orthanc): C-FIND, C-MOVE / C-GET, and its failures.

Orthanc holds, for one patient: the prior (FLAIR + T1), a more recent study without FLAIR,
the current study itself, and a later follow-up; and another patient's FLAIR study. Only the
current study's FLAIR is sent to LesionWatch. The search must choose the prior (the most
recent earlier study with a FLAIR series), fetch only its FLAIR series, and leave it
recognisable as a prior that the assembler never processes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, require_service
from orthanc_server import OrthancServer, orthanc_executable, running_orthanc
from prior_studies import identity, write_study
from scp_harness import LISTENER_AE, RunningListener, running_listener
from sqlalchemy import select

from lesionwatch.config.schema import (
    AssemblyConfig,
    DestinationConfig,
    LesionWatchConfig,
    PipelinesConfig,
    SeriesClass,
)
from lesionwatch.dicom_io.scu import Outcome, StoreItem, store_files
from lesionwatch.service.assembler import StudyAssembler
from lesionwatch.service.db.models import Job, JobState, Study, StudyState, utcnow
from lesionwatch.service.db.prior_models import PriorSearch, PriorSearchState, PriorSource
from lesionwatch.service.prior_search import PriorSearcher, build_prior_searcher

pytestmark = pytest.mark.integration

CURRENT = identity("current", dt.date(2024, 6, 1), accession_number="ACC-CUR")
PRIOR = identity("prior", dt.date(2023, 3, 1), accession_number="ACC-PRIOR")
NO_FLAIR = identity("no-flair", dt.date(2024, 1, 10))  # more recent, but no FLAIR
LATER = identity("later", dt.date(2025, 9, 1))  # after the current study: never a prior
OTHER_PATIENT = identity("other", dt.date(2023, 5, 1), patient_id="SOMEONE-ELSE")


@dataclass
class Pacs:
    orthanc: OrthancServer
    lw_port: int  # where Orthanc sends C-MOVE results (LISTENER_AE)
    current_flair: list[Path]
    prior_series: dict[SeriesClass, str]  # SeriesInstanceUID per class of the prior


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    require_service(orthanc_executable() is not None, "Orthanc is not installed (Debian package)")
    root = tmp_path_factory.mktemp("prior-pacs")
    flair, t1 = SeriesClass.FLAIR, SeriesClass.T1_PRE
    prior = write_study(PRIOR, 1, [flair, t1], root / "prior")
    current = write_study(CURRENT, 2, [flair], root / "current")
    uploads = [
        *prior,
        *current,
        *write_study(NO_FLAIR, 2, [t1], root / "no-flair"),
        *write_study(LATER, 2, [flair], root / "later"),
        *write_study(OTHER_PATIENT, 1, [flair], root / "other"),
    ]
    lw_port = free_port()
    with running_orthanc(
        root / "orthanc", modalities={"lw": (LISTENER_AE, "127.0.0.1", lw_port)}
    ) as orthanc:
        for series in uploads:
            for path in series.files:
                orthanc.upload(path)
        import pydicom

        prior_series = {
            s.contrast: str(pydicom.dcmread(s.files[0], stop_before_pixels=True).SeriesInstanceUID)
            for s in prior
        }
        yield Pacs(orthanc, lw_port, list(current[0].files), prior_series)


def _config(pacs_port: int, **prior_search: Any) -> LesionWatchConfig:
    return LesionWatchConfig.model_validate(
        {
            "listener": {"ae_title": LISTENER_AE},
            "prior_search": {
                "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}
                | prior_search.pop("pacs", {}),
                "retry_initial_delay_s": 0,
            }
            | prior_search,
        }
    )


def _searcher(lw: RunningListener, config: LesionWatchConfig) -> PriorSearcher:
    searcher = build_prior_searcher(config, lw.sessions, lw.scp.archive, lw.scp.recorder)  # type: ignore[arg-type]
    assert searcher is not None
    return searcher


def _send(lw: RunningListener, files: list[Path]) -> None:
    node = DestinationConfig(name="lw", ae_title=LISTENER_AE, host="127.0.0.1", port=lw.port)
    results = store_files(node, [StoreItem(i, path) for i, path in enumerate(files)])
    assert {r.outcome for r in results} == {Outcome.SUCCESS}


def _search_row(lw: RunningListener) -> PriorSearch:
    with lw.sessions() as session:
        current = session.scalars(
            select(Study).where(Study.study_instance_uid == CURRENT.study_instance_uid)
        ).one()
        return session.scalars(select(PriorSearch).where(PriorSearch.study_id == current.id)).one()


def test_search_moves_the_most_recent_prior_with_flair_and_it_is_never_processed(
    pacs: Pacs, tmp_path: Path, database_url: str
) -> None:
    with running_listener(tmp_path / "lw", database_url, pacs.lw_port) as lw:
        _send(lw, pacs.current_flair)
        searcher = _searcher(lw, _config(pacs.orthanc.dicom_port))
        assert searcher.run_once() == 1  # one attempt: query, choose, move, verify

        search = _search_row(lw)
        assert search.state == PriorSearchState.FOUND, search.reason
        assert search.source == PriorSource.PACS
        assert search.prior_study_instance_uid == PRIOR.study_instance_uid
        assert search.finished_at is not None and search.attempts == 1
        with lw.sessions() as session:
            prior = session.get(Study, search.prior_study_id)
            assert prior is not None
            assert prior.study_instance_uid == PRIOR.study_instance_uid
            assert prior.state == StudyState.PRIOR
            # Only the FLAIR series was fetched, all of it, and classified as FLAIR here.
            assert [(s.series_instance_uid, s.series_class) for s in prior.series] == [
                (pacs.prior_series[SeriesClass.FLAIR], SeriesClass.FLAIR)
            ]
            uids = {s.study_instance_uid for s in session.scalars(select(Study))}
        assert uids == {CURRENT.study_instance_uid, PRIOR.study_instance_uid}
        # The retrieved prior gets no search of its own ...
        assert searcher.start_searches() == []
        # ... and no jobs: the current study's new-lesion job compares with it.
        assembler = StudyAssembler(
            lw.sessions, AssemblyConfig(quiet_period_s=60), PipelinesConfig()
        )
        [decision] = assembler.run_once(utcnow() + timedelta(seconds=120))
        assert decision.study_instance_uid == CURRENT.study_instance_uid
        assert decision.jobs == ("flair", "new_lesions")
        with lw.sessions() as session:
            job = session.scalars(select(Job).where(Job.pipeline == "new_lesions")).one()
            assert job.prior_study_id == search.prior_study_id
            assert session.scalars(select(Job).where(Job.study_id == prior.id)).all() == []


def test_search_by_c_get_files_the_prior_in_the_archive(pacs: Pacs, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lw.db'}"
    with running_listener(tmp_path / "lw", url, pacs.lw_port) as lw:
        _send(lw, pacs.current_flair)
        searcher = _searcher(lw, _config(pacs.orthanc.dicom_port, pacs={"retrieve_method": "get"}))
        searcher.run_once()
        search = _search_row(lw)
        assert search.state == PriorSearchState.FOUND, search.reason
        with lw.sessions() as session:
            prior = session.get(Study, search.prior_study_id)
            assert prior is not None and prior.state == StudyState.PRIOR
            [series] = prior.series
            assert series.series_instance_uid == pacs.prior_series[SeriesClass.FLAIR]
            paths = [i.path for i in series.instances]
            assert {i.calling_ae_title for i in series.instances} == {"ORTHANC"}
        assert len(paths) == 36 and all((lw.archive_root / p).is_file() for p in paths)


def test_unknown_move_destination_fails_at_once_with_what_to_do(pacs: Pacs, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lw.db'}"
    with running_listener(tmp_path / "lw", url, pacs.lw_port) as lw:
        _send(lw, pacs.current_flair)
        config = _config(pacs.orthanc.dicom_port, pacs={"move_destination": "NOT_KNOWN"})
        searcher = _searcher(lw, config)
        assert searcher.run_once() == 1  # permanent: no retry
        search = _search_row(lw)
        assert search.state == PriorSearchState.FAILED
        assert "C-MOVE to NOT_KNOWN" in search.reason
        assert "check that the PACS knows the move destination AE title" in search.reason
        # The half-chosen prior is still never processed (no instances arrived here).
        assert searcher.start_searches() == []


def test_unreachable_pacs_is_retried_then_the_study_goes_on_without_a_prior(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'lw.db'}"
    nobody = free_port()  # nothing listens there
    with running_listener(tmp_path / "lw", url, free_port()) as lw:
        _send(lw, write_study(CURRENT, 2, [SeriesClass.FLAIR], tmp_path / "current")[0].files)
        searcher = _searcher(lw, _config(nobody, max_attempts=2))
        assert searcher.run_once() == 2  # the first attempt and one retry
        search = _search_row(lw)
        assert search.state == PriorSearchState.FAILED
        assert f"connection to 127.0.0.1:{nobody} refused" in search.reason
        assembler = StudyAssembler(
            lw.sessions, AssemblyConfig(quiet_period_s=60), PipelinesConfig()
        )
        [decision] = assembler.run_once(utcnow() + timedelta(seconds=120))
        assert decision.jobs == ("flair",)
        with lw.sessions() as session:
            skipped = session.scalars(select(Job).where(Job.pipeline == "new_lesions")).one()
        assert skipped.state == JobState.SKIPPED
        assert skipped.reason.startswith("no prior could be retrieved from PACS (C-FIND")
