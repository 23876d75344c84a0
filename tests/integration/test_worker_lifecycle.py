"""A worker's own limits, with its real executor process: the per-job timeout stops a job that
runs too long, and SIGTERM gives a running job back instead of losing or half-finishing it."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from work_harness import QuickExecutor, seed_flair_jobs, site, wait_for

from lesionwatch.config.schema import SeriesClass
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.series_identity import StudyIdentity
from lesionwatch.dicom_io.series_writer import write_series
from lesionwatch.service.db.models import Instance, Job, JobState, Series
from lesionwatch.service.executor import SubprocessExecutor
from lesionwatch.service.job_execution import ExecutorSettings
from lesionwatch.service.server import Runtime
from lesionwatch.service.worker import Worker

pytestmark = pytest.mark.integration

PATIENT07 = Path(__file__).resolve().parents[1] / "data" / "open_ms_data" / "cross_sectional"
PATIENT07 = PATIENT07 / "patient07"


def _archive_real_series(runtime: Runtime, data_dir: Path) -> None:
    """Point the seeded study's FLAIR series at a real FLAIR (open_ms_data patient 07, written
    as DICOM into the archive): the pipeline takes tens of seconds on it."""
    identity = StudyIdentity.from_seed(
        "timeout-test", patient_id="P0", patient_name="Test^Timeout", birth_date=None, sex="O",
        study_date=dt.date(2025, 1, 1),
    )  # fmt: skip
    volume = ImageVolume.load(PATIENT07 / "FLAIR.nii.gz")
    files = write_series(
        volume, data_dir / "archive" / "real", contrast=SeriesClass.FLAIR, identity=identity,
        series_number=2,
    )  # fmt: skip
    with runtime.sessions.begin() as session:
        instance = session.scalars(select(Instance)).one()
        series = session.get_one(Series, instance.series_id)
        series.series_instance_uid = str(
            pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        )
        instance.path = f"real/{files[0].name}"
        for n, path in enumerate(files[1:], start=2):
            session.add(
                Instance(
                    series_id=instance.series_id,
                    sop_instance_uid=f"{instance.sop_instance_uid}.{n}",
                    sop_class_uid=instance.sop_class_uid,
                    transfer_syntax_uid=instance.transfer_syntax_uid, path=f"real/{path.name}",
                    size_bytes=1, sha256="0" * 64,
                )
            )  # fmt: skip


def test_a_job_past_its_timeout_is_stopped_and_counted(tmp_path: Path) -> None:
    overrides = {"worker.job_timeout_s": 3, "worker.max_attempts": 1}
    with site("embedded-sqlite", tmp_path, **overrides) as where:
        runtime = Runtime(where.config)
        [job_id] = seed_flair_jobs(runtime.sessions, 1)
        _archive_real_series(runtime, where.config.storage.data_dir)
        executor = SubprocessExecutor(
            ExecutorSettings(
                data_dir=str(where.config.storage.data_dir.resolve()),
                inference=where.config.inference,
                pipelines=where.config.pipelines,
                results=where.config.results,
            )
        )
        worker = Worker(identity="test:0", config=where.config, sessions=runtime.sessions,
                        broker=runtime.broker, relay=runtime.relay, executor=executor)  # fmt: skip
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        try:
            runtime.relay.publish_pending()

            def failed() -> bool:
                with runtime.sessions() as session:
                    return session.get_one(Job, job_id).state is JobState.FAILED

            wait_for(failed, 120, "the job to time out")
            with runtime.sessions() as session:
                job = session.get_one(Job, job_id)
            assert job.failure_kind == "timeout"
            assert "stopped after the job timeout of 3 s" in job.reason
        finally:
            stop.set()
            thread.join(60)
            runtime.close()


def test_sigterm_gives_a_running_job_back_and_another_worker_finishes_it(tmp_path: Path) -> None:
    with site("embedded-sqlite", tmp_path, **{"worker.shutdown_grace_s": 0.5}) as where:
        runtime = Runtime(where.config)
        calls: Counter[int] = Counter()
        lock = threading.Lock()
        [job_id] = seed_flair_jobs(runtime.sessions, 1)
        runtime.relay.publish_pending()

        def run_worker(name: str, seconds: float) -> tuple[threading.Event, threading.Thread]:
            stop = threading.Event()
            worker = Worker(identity=name, config=where.config, sessions=runtime.sessions,
                            broker=runtime.broker, relay=runtime.relay,
                            executor=QuickExecutor(seconds, calls, lock))  # type: ignore[arg-type]  # fmt: skip
            thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
            thread.start()
            return stop, thread

        stop, thread = run_worker("slow:0", 60.0)
        try:
            wait_for(lambda: calls[job_id] == 1, 30, "the job to start")
            stop.set()  # what the SIGTERM handler does
            thread.join(30)
            assert not thread.is_alive()
            with runtime.sessions() as session:
                job = session.get_one(Job, job_id)
                assert (job.state, job.attempt, job.lease_owner) == (JobState.PENDING, 0, None)
                assert "shut down" in job.reason
            stop, thread = run_worker("fast:0", 0.1)

            def done() -> bool:
                with runtime.sessions() as session:
                    return session.get_one(Job, job_id).state is JobState.SUCCEEDED

            wait_for(done, 30, "the second worker to finish the job")
            with runtime.sessions() as session:
                assert session.get_one(Job, job_id).attempt == 1  # the released one not counted
        finally:
            stop.set()
            thread.join(30)
            runtime.close()
