"""A `lesionwatch work` process SIGKILLed in the middle of a real FLAIR job: the job is taken
again and completes, and the destination holds exactly one set of results.

Real everything: a study C-STOREd to a real listener, the shipped FLAIR model on the real
open_ms_data FLAIR, the worker as its own process (killed with its executor), results sent by
the dispatcher to a DICOM receiver that counts every C-STORE. On the embedded queue (SQLite)
and on RabbitMQ with PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_DATA, free_port
from sqlalchemy import select
from work_harness import BACKENDS, Site, site, wait_for

from lesionwatch.config.schema import SeriesClass
from lesionwatch.dicom_io.scu import Outcome, StoreItem, store_files
from lesionwatch.dicom_io.series_identity import StudyIdentity, derive_uid
from lesionwatch.dicom_io.store_receiver import StoreReceiver
from lesionwatch.dicom_io.study_builder import SeriesSpec, build_study_from_nifti
from lesionwatch.service.db.delivery_models import Delivery, DeliveryState
from lesionwatch.service.db.models import REPORT_PIPELINE, Job, JobState
from lesionwatch.service.db.work_models import AuditEvent
from lesionwatch.service.server import Roles, ServiceProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PATIENT01 = TEST_DATA / "open_ms_data" / "longitudinal" / "patient01"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_worker(where: Site, config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **where.environment()}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lesionwatch.service.cli", "work", "--config", str(config_file)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _send_flair_study(where: Site, tmp_path: Path) -> str:
    identity = StudyIdentity(
        patient_id="OMS-LONG-01",
        patient_name="OpenMS^Patient01",
        birth_date=dt.date(1980, 5, 17),
        sex="F",
        study_instance_uid=derive_uid("crash-test", where.backend),
        study_date=dt.date(2024, 3, 12),
        study_time=dt.time(9, 30),
    )
    spec = SeriesSpec(PATIENT01 / "study1_FLAIR.nii.gz", SeriesClass.FLAIR)
    [series] = build_study_from_nifti([spec], identity, tmp_path / "outgoing")
    listener = where.config.listener
    from lesionwatch.config.schema import DestinationConfig

    sender = DestinationConfig(
        name="scanner", ae_title=listener.ae_title, host=listener.host, port=listener.port,
        calling_ae_title="MR1",
    )  # fmt: skip
    results = store_files(sender, [StoreItem(i, f) for i, f in enumerate(series.files)])
    assert all(r.outcome is Outcome.SUCCESS for r in results)
    return identity.study_instance_uid


@pytest.mark.parametrize("backend", BACKENDS)
def test_worker_killed_mid_job_the_job_completes_once(backend: str, tmp_path: Path) -> None:
    pacs = StoreReceiver(tmp_path / "pacs", ae_title="PACS").start()
    overrides = {
        "listener.port": free_port(),
        "destinations": [{"name": "PACS", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": pacs.port}],
        # One window pass instead of eight half-overlapping ones: the same model and
        # pipeline, a third of the CPU time (this test is about the crash, not accuracy).
        "inference.step_mm": 128,
        "worker.lease_s": 6,
    }  # fmt: skip
    logs = tmp_path / "worker.log"
    workers: list[subprocess.Popen[bytes]] = []
    with site(backend, tmp_path, **overrides) as where:
        config_file = where.write_config(tmp_path / "lesionwatch.yaml")
        front = ServiceProcess(where.config, Roles(listen=True, dispatch=True))
        front.start()
        try:
            _send_flair_study(where, tmp_path)
            sessions = front.sessions

            def flair_job() -> Job | None:
                with sessions() as session:
                    return session.scalars(select(Job).where(Job.pipeline == "flair")).first()

            wait_for(lambda: flair_job() is not None, 60, "assembly to create the FLAIR job")
            workers.append(_start_worker(where, config_file, logs))

            def running_for(seconds: float) -> bool:
                job = flair_job()
                return bool(
                    job is not None
                    and job.state is JobState.RUNNING
                    and job.started_at is not None
                    and (dt.datetime.now(dt.UTC) - job.started_at).total_seconds() > seconds
                )

            wait_for(lambda: running_for(8.0), 180, "the FLAIR job to be well under way")
            executors = _children(workers[0].pid)
            assert executors, "the worker should run its job in an executor process"
            workers[0].send_signal(signal.SIGKILL)
            workers[0].wait(10)
            # The executor notices its worker is gone and stops too (no orphaned GPU/CPU use).
            wait_for(lambda: not any(_alive(pid) for pid in executors), 10, "the executor exit")
            job = flair_job()
            assert job is not None and job.state is JobState.RUNNING and job.attempt == 1

            workers.append(_start_worker(where, config_file, logs))

            def delivered() -> bool:
                with sessions() as session:
                    report = session.scalars(
                        select(Job).where(Job.pipeline == REPORT_PIPELINE)
                    ).first()
                    pending = session.scalars(
                        select(Delivery).where(Delivery.state != DeliveryState.SENT)
                    ).all()
                    sent = session.scalars(select(Delivery)).all()
                return bool(
                    report is not None
                    and report.state is JobState.SUCCEEDED
                    and sent
                    and not pending
                )

            wait_for(delivered, 420, "the job to complete and its results to be delivered", 1.0)
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGTERM)
                    try:
                        worker.wait(90)
                    except subprocess.TimeoutExpired:
                        worker.kill()
            front.request_stop()
            front.stop()
            pacs.stop()

        job = flair_job()
        assert job is not None and job.state is JobState.SUCCEEDED and job.attempt == 2, (
            logs.read_text(errors="replace")[-3000:]
        )
        with sessions() as session:
            taken_over = session.scalars(
                select(AuditEvent).where(
                    AuditEvent.job_id == job.id, AuditEvent.detail.contains("taken over")
                )
            ).all()
        assert len(taken_over) == 1
        # Exactly one set of results at the destination, each object stored once.
        assert len(pacs.files("SEG")) == 1 and len(pacs.files("SR")) == 1
        assert pacs.received and set(pacs.received.values()) == {1}, pacs.received
        assert workers[1].returncode == 0  # SIGTERM: a clean stop
