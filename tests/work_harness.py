"""Helpers for the worker tests: a site config per backend, seeded jobs, waiting for states.

Two backends, as sites run them: the embedded queue on SQLite (one machine) and RabbitMQ with
PostgreSQL (a large site). Each test gets its own SQLite file or PostgreSQL schema and its own
RabbitMQ queue prefix.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from lesionwatch.config import load_config
from lesionwatch.config.schema import LesionWatchConfig, SeriesClass
from lesionwatch.service.db.engine import write_session
from lesionwatch.service.db.models import Instance, Job, JobState, Series, Study
from lesionwatch.service.db.work_models import AuditEvent
from lesionwatch.service.executor import JobAbortedError
from lesionwatch.service.job_execution import ExecResult, PipelineRequest, ReportRequest
from lesionwatch.service.jobs import publish_job

BACKENDS = ["embedded-sqlite", "rabbitmq-postgresql"]


@dataclass(frozen=True)
class Site:
    backend: str
    config: LesionWatchConfig
    database_url: str
    broker_url: str | None  # amqp URL for RabbitMQ, None for the embedded queue
    queue_prefix: str

    def cli_args(self) -> list[str]:
        """--database/--broker/--data-dir options naming this site, for `lesionwatch ...`."""
        args = ["--database", self.database_url, "--data-dir", str(self.config.storage.data_dir)]
        args += ["--broker", self.broker_url or "embedded"]
        return args

    def write_config(self, path: Path) -> Path:
        """The site as a YAML file for `lesionwatch ... --config` (secrets stay in the env)."""
        import yaml

        data = self.config.model_dump(
            mode="json", exclude={"database": {"url"}, "broker": {"url"}}, exclude_none=True
        )
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def environment(self) -> dict[str, str]:
        """The same site as LESIONWATCH_* variables (for subprocesses)."""
        env = {
            "LESIONWATCH_DATABASE__URL": self.database_url,
            "LESIONWATCH_STORAGE__DATA_DIR": str(self.config.storage.data_dir),
            "LESIONWATCH_BROKER__QUEUE_PREFIX": self.queue_prefix,
        }
        if self.broker_url:
            env["LESIONWATCH_BROKER__KIND"] = "rabbitmq"
            env["LESIONWATCH_BROKER__URL"] = self.broker_url
        return env


@contextlib.contextmanager
def site(backend: str, tmp_path: Path, **overrides: Any) -> Iterator[Site]:
    """A fresh site on `backend`; `overrides` are dotted config paths."""
    from broker_fixtures import delete_rabbitmq_queues
    from conftest import RABBITMQ_URL, fresh_postgres_schema, require_rabbitmq

    prefix = f"lwtest-{uuid.uuid4().hex[:8]}"
    data_dir = tmp_path / "site"
    with contextlib.ExitStack() as stack:
        if backend == "rabbitmq-postgresql":
            require_rabbitmq()
            database_url = stack.enter_context(fresh_postgres_schema(str(tmp_path)))
            broker_url: str | None = RABBITMQ_URL
            stack.callback(delete_rabbitmq_queues, RABBITMQ_URL, prefix)
        else:
            database_url = f"sqlite:///{data_dir / 'lesionwatch.db'}"
            broker_url = None
        values: dict[str, Any] = {
            "storage.data_dir": str(data_dir),
            "storage.min_free_disk_mb": 16,
            "database.url": database_url,
            "broker.queue_prefix": prefix,
            "metrics.enabled": False,
            "worker.lease_s": 6,
            "worker.retry_initial_delay_s": 1,
            "worker.retry_max_delay_s": 2,
            "assembly.quiet_period_s": 2,
            "assembly.poll_interval_s": 0.5,
            "broker.poll_interval_s": 0.2,
            "delivery.poll_interval_s": 0.5,
            "log_level": "INFO",
        }
        if broker_url:
            values["broker.kind"] = "rabbitmq"
            values["broker.url"] = broker_url
            values["broker.heartbeat_s"] = 10
        values.update(overrides)
        config = load_config(None, environ={}, overrides=values)
        yield Site(backend, config, database_url, broker_url, prefix)


class QuickExecutor:
    """Stands in for the executor process in tests of the message path: claim, commit, ack,
    crash and restart handling. It runs nothing on images (tests/e2e runs the real pipelines)
    and counts how often each job was started."""

    device = "cpu"

    def __init__(self, seconds: float, calls: Counter[int], lock: threading.Lock) -> None:
        self._seconds = seconds
        self.calls = calls
        self._lock = lock

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def run(
        self,
        request: PipelineRequest | ReportRequest,
        *,
        timeout_s: float,
        should_stop: Callable[[], str | None] = lambda: None,
    ) -> ExecResult:
        with self._lock:
            self.calls[request.job_id] += 1
        deadline = time.monotonic() + self._seconds
        while time.monotonic() < deadline:
            reason = should_stop()
            if reason:
                raise JobAbortedError(reason)
            time.sleep(0.02)
        if isinstance(request, ReportRequest):
            record = {"kind": "report", "version": request.version, "inputs": request.inputs}
        else:
            record = {"kind": "finding", "finding_type": "ms_lesion", "lesion_count": 0}
        return ExecResult((), record, {"quick": self._seconds}, "quick job")


@dataclass(frozen=True)
class SeededStudy:
    study_id: int
    uid: str


def seed_studies(
    sessions: sessionmaker[Session], count: int, *, hold_open: bool = False
) -> list[SeededStudy]:
    """`count` studies, each with a FLAIR series of one (unread) instance, as the listener
    would have recorded them. `hold_open`: each also gets a pending enhancing job that never
    runs, so finishing its other jobs queues no study report (benchmarks: one job, one
    message)."""
    now = datetime.now(UTC)
    seeded = []
    with write_session(sessions) as session:
        for n in range(count):
            uid = f"1.2.826.0.1.3680043.10.99.{uuid.uuid4().int % 10**12}.{n}"
            study = Study(study_instance_uid=uid, patient_id=f"P{n}", first_received_at=now,
                          last_received_at=now, receiving_since=now)  # fmt: skip
            session.add(study)
            session.flush()
            series = Series(study_id=study.id, series_instance_uid=f"{uid}.1",
                            series_class=SeriesClass.FLAIR)  # fmt: skip
            session.add(series)
            session.flush()
            session.add(Instance(series_id=series.id, sop_instance_uid=f"{uid}.1.1",
                                 sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                                 transfer_syntax_uid="1.2.840.10008.1.2.1",
                                 path=f"{uid}/{uid}.1/{uid}.1.1.dcm", size_bytes=1,
                                 sha256="0" * 64))  # fmt: skip
            if hold_open:
                session.add(Job(study_id=study.id, pipeline="enhancing", created_at=now,
                                updated_at=now))  # fmt: skip
            seeded.append(SeededStudy(study.id, uid))
    return seeded


def seed_flair_jobs(
    sessions: sessionmaker[Session], count: int, *, publish: bool = True
) -> list[int]:
    """`count` seeded studies, each with a FLAIR job whose message is in the outbox."""
    now = datetime.now(UTC)
    job_ids = []
    studies = seed_studies(sessions, count)
    with write_session(sessions) as session:
        for study in studies:
            job = Job(study_id=study.study_id, pipeline="flair", created_at=now, updated_at=now)
            session.add(job)
            session.flush()
            if publish:
                publish_job(session, job, study.uid)
            job_ids.append(job.id)
    return job_ids


def wait_for(check: Callable[[], bool], timeout_s: float, what: str, pause_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # a database or broker restarting: look again
            pass
        time.sleep(pause_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def job_states(sessions: sessionmaker[Session]) -> Counter[str]:
    with sessions() as session:
        rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return Counter({state.value: n for state, n in rows})


def succeeded_events(sessions: sessionmaker[Session]) -> Counter[int]:
    """How many times each job was marked succeeded (the audit trail)."""
    with sessions() as session:
        rows = session.scalars(
            select(AuditEvent.job_id).where(AuditEvent.action == f"job.{JobState.SUCCEEDED.value}")
        ).all()
    return Counter(rows)
