"""Workers against real RabbitMQ and PostgreSQL restarts: every job completes, none twice.

The executor is `work_harness.QuickExecutor` (these tests are about the message path); the
real pipelines run in tests/e2e/test_worker_crash.py and test_serve_orthanc.py.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import require_executable
from work_harness import (
    QuickExecutor,
    Site,
    job_states,
    seed_flair_jobs,
    site,
    succeeded_events,
    wait_for,
)

from lesionwatch.service.db.engine import write_session
from lesionwatch.service.db.models import Job, utcnow
from lesionwatch.service.jobs import Completion, claim_job, complete_job, publish_job
from lesionwatch.service.server import Runtime
from lesionwatch.service.worker import Worker

pytestmark = pytest.mark.integration

JOBS = 50


@contextmanager
def running_workers(
    where: Site, count: int, seconds: float
) -> Iterator[tuple[Runtime, Counter[int]]]:
    runtime = Runtime(where.config)
    runtime.broker.declare(runtime.queues())
    calls: Counter[int] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    threads = []
    for index in range(count):
        worker = Worker(
            identity=f"test:{index}",
            config=where.config,
            sessions=runtime.sessions,
            broker=runtime.broker,
            relay=runtime.relay,
            executor=QuickExecutor(seconds, calls, lock),  # type: ignore[arg-type]
        )
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        threads.append(thread)

    def relay() -> None:
        while not stop.wait(0.5):
            runtime.relay.publish_pending()

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    try:
        yield runtime, calls
    finally:
        stop.set()
        for thread in [*threads, relay_thread]:
            thread.join(30)
        runtime.close()


def _all_done(runtime: Runtime, total: int) -> bool:
    states = job_states(runtime.sessions)
    return states.get("succeeded", 0) == total


def _assert_each_ran_once(runtime: Runtime, calls: Counter[int], total: int) -> None:
    succeeded = succeeded_events(runtime.sessions)
    assert len(succeeded) == total, job_states(runtime.sessions)
    assert set(succeeded.values()) == {1}, "a job was marked succeeded twice"
    twice = {job: n for job, n in calls.items() if n != 1}
    assert not twice, f"jobs run more than once: {twice}"


def test_rabbitmq_restart_with_jobs_in_flight(tmp_path: Path) -> None:
    rabbitmqctl = require_executable("rabbitmqctl")
    with (
        site("rabbitmq-postgresql", tmp_path) as where,
        running_workers(where, 2, seconds=0.3) as (runtime, calls),
    ):
        flair_jobs = seed_flair_jobs(runtime.sessions, JOBS)
        runtime.relay.publish_pending()
        wait_for(lambda: sum(calls.values()) >= 8, 60, "the first jobs to start")
        try:
            subprocess.run([rabbitmqctl, "stop_app"], check=True, capture_output=True)
            time.sleep(3)  # jobs in flight finish and commit while the broker is down
        finally:
            subprocess.run([rabbitmqctl, "start_app"], check=True, capture_output=True)
            subprocess.run(
                [rabbitmqctl, "await_startup"], check=True, capture_output=True, timeout=120
            )
        # Every study's FLAIR job and its report job complete, each exactly once.
        wait_for(lambda: _all_done(runtime, 2 * JOBS), 240, "all jobs to succeed")
        _assert_each_ran_once(runtime, calls, 2 * JOBS)
        assert set(flair_jobs) <= set(calls)
        for queue in runtime.queues():
            depth = runtime.broker.depth(queue)
            assert (depth.ready, depth.delayed, depth.dead) == (0, 0, 0), depth


def test_postgresql_restart_jobs_resume(tmp_path: Path) -> None:
    pg_ctlcluster = require_executable("pg_ctlcluster")
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[0]
    with (
        site("rabbitmq-postgresql", tmp_path) as where,
        running_workers(where, 2, seconds=0.3) as (runtime, calls),
    ):
        seed_flair_jobs(runtime.sessions, 20)
        runtime.relay.publish_pending()
        wait_for(lambda: sum(calls.values()) >= 4, 60, "the first jobs to start")
        cluster = [pg_ctlcluster, "--skip-systemctl-redirect", version, "main"]
        try:
            subprocess.run([*cluster, "stop"], check=True, capture_output=True)
            time.sleep(3)
        finally:
            subprocess.run([*cluster, "start"], check=True, capture_output=True)
            wait_for(
                lambda: subprocess.run(["pg_isready", "-h", "127.0.0.1"]).returncode == 0,
                60,
                "PostgreSQL to accept connections",
            )
        wait_for(lambda: _all_done(runtime, 40), 240, "all jobs to succeed")
        _assert_each_ran_once(runtime, calls, 40)


@pytest.mark.parametrize("backend", ["embedded-sqlite", "rabbitmq-postgresql"])
def test_a_stalled_lease_is_taken_over_and_the_late_result_discarded(
    backend: str, tmp_path: Path
) -> None:
    """A worker that stops renewing (paused VM, lost network) loses its job to another; when it
    wakes up its commit is refused, so the job still succeeds exactly once."""
    with (
        site(backend, tmp_path) as where,
        running_workers(where, 1, seconds=0.2) as (runtime, _calls),
    ):
        [job_id] = seed_flair_jobs(runtime.sessions, 1, publish=False)
        with write_session(runtime.sessions) as session:
            claim_job(session, job_id, "stalled:0", lease_s=1, now=utcnow())
            publish_job(session, session.get_one(Job, job_id), "1.2.3")  # its redelivery
        runtime.relay.publish_pending()
        wait_for(lambda: _all_done(runtime, 2), 60, "the job and its report to succeed")
        with runtime.sessions() as session:
            job = session.get_one(Job, job_id)
            assert job.attempt == 2 and job.lease_owner is None
        with write_session(runtime.sessions) as session:
            late = complete_job(
                session, job_id, "stalled:0",
                Completion({}, {}, [], where.config.storage.data_dir, "late"),
                destinations=[], report_queue="jobs", now=utcnow(),
            )  # fmt: skip
        assert late is False
        assert succeeded_events(runtime.sessions)[job_id] == 1
