"""The LesionWatch processes and what they run.

- `lesionwatch serve`: everything in one process (listener, assembler, workers, dispatcher),
  on the embedded defaults (SQLite and the embedded queue) or on PostgreSQL and RabbitMQ;
- `lesionwatch listen`: the listener and the study assembler;
- `lesionwatch work`: workers (one executor process each) for some queues;
- `lesionwatch dispatch`: the dispatcher, delivering results to the destinations.

Every process also runs the outbox relay (publishing committed messages) and, unless
`metrics.enabled` is off, serves /metrics and /healthz.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from lesionwatch.config.schema import LesionWatchConfig

from .assembler import StudyAssembler
from .broker import Broker, QueueDepth, open_broker
from .db.engine import create_db_engine, migrate, session_factory
from .metrics import METRICS, HealthCheck, MetricsServer, SiteCollector
from .outbox import OutboxRelay

__all__ = [
    "DatabaseMissingError",
    "ListenerService",
    "Roles",
    "Runtime",
    "ServiceProcess",
    "open_database",
]

log = logging.getLogger(__name__)

_RELAY_INTERVAL_S = 2.0


class DatabaseMissingError(LookupError):
    """A command that reads a site's state found no embedded database where it looked."""


def open_database(
    config: LesionWatchConfig, *, existing: bool = False
) -> tuple[Engine, sessionmaker[Session]]:
    """Engine at the configured URL with the schema migrated to the newest revision.

    `existing`: refuse to create an embedded (SQLite) database that is not there yet: a
    command run without the site's config would otherwise show an empty, new one.
    """
    url = config.database_url()
    if existing and url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise DatabaseMissingError(
                f"no LesionWatch database at {path}: pass the site's --config FILE (or set "
                "LESIONWATCH_CONFIG), or --data-dir DIR / --database URL"
            )
    engine = create_db_engine(
        config.database_url(), echo=config.database.echo, pool_size=config.database.pool_size
    )
    migrate(engine)
    return engine, session_factory(engine)


class Runtime:
    """What every process shares: the config, the database, the broker and the outbox relay."""

    def __init__(
        self, config: LesionWatchConfig, *, broker: Broker | None = None, existing: bool = False
    ) -> None:
        self.config = config
        self.engine, self.sessions = open_database(config, existing=existing)
        self.broker = broker or open_broker(config, self.engine)
        self.relay = OutboxRelay(self.sessions, self.broker)

    def queues(self) -> list[str]:
        """Every queue this site uses (pipelines, reports, deliveries)."""
        from .messages import DELIVERY_QUEUE

        names = [cfg.queue for cfg in self.config.pipelines.enabled().values()]
        names += [*self.config.worker.queues, self.config.worker.report_queue, DELIVERY_QUEUE]
        return list(dict.fromkeys(names))

    def queue_depths(self) -> list[QueueDepth]:
        return [self.broker.depth(queue) for queue in self.queues()]

    def job_counts(self) -> dict[str, int]:
        from .db.models import Job

        with self.sessions() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        return {state.value: count for state, count in rows}

    def delivery_counts(self) -> dict[str, int]:
        from .db.delivery_models import Delivery

        with self.sessions() as session:
            rows = session.execute(
                select(Delivery.state, func.count()).group_by(Delivery.state)
            ).all()
        return {state.value: count for state, count in rows}

    def check_database(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(select(1))

    def close(self) -> None:
        self.broker.close()
        self.engine.dispose()


@dataclass(frozen=True)
class Roles:
    """Which parts a process runs."""

    listen: bool = False
    work: bool = False
    dispatch: bool = False
    queues: tuple[str, ...] | None = None  # work: the queues to take jobs from
    concurrency: int | None = None  # work: worker count (default worker.concurrency)


class ServiceProcess:
    """Starts the parts of a LesionWatch process named by `roles`, and stops them cleanly."""

    def __init__(
        self, config: LesionWatchConfig, roles: Roles, *, broker: Broker | None = None
    ) -> None:
        self.config = config
        self.roles = roles
        self.runtime = Runtime(config, broker=broker)
        self.sessions = self.runtime.sessions
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.workers: list[object] = []
        self.scp: object | None = None
        self._backlog: Any = None
        self.metrics_server: MetricsServer | None = None
        self.assembler = StudyAssembler(
            self.sessions,
            config.assembly,
            config.pipelines,
            on_committed=self.runtime.relay.publish_pending,
        )

    # -- start ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.runtime.broker.declare(self.runtime.queues())
        if self.roles.listen:
            self._start_listener()
        if self.roles.work:
            self._start_workers()
        if self.roles.dispatch:
            self._start_dispatcher()
        self._spawn(self._relay_loop, "outbox-relay")
        if self.config.metrics.enabled:
            self._start_metrics()

    def _spawn(self, target: object, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _start_listener(self) -> None:
        from lesionwatch.dicom_io.scp import StoreSCP

        from .ingest import InstanceRecorder
        from .prior_search import build_prior_searcher
        from .record_backlog import BufferedRecorder

        recorder = InstanceRecorder(
            self.sessions, self.config.classification, priority=self.config.priority
        )
        # While the database is away, instances are archived, acknowledged and recorded when
        # it returns (the backlog); the listener never refuses a study for a database outage.
        buffered = BufferedRecorder(recorder, self.config.storage.data_dir / "archive")
        scp = StoreSCP(
            self.config.listener,
            self.config.storage,
            buffered,
            on_outcome=lambda outcome: METRICS.instances_received.labels(outcome).inc(),
        )
        # The prior search starts on a study's first image (live or from the backlog).
        searcher = build_prior_searcher(self.config, self.sessions, scp.archive, recorder)
        if searcher is not None:
            scp.on_recorded = searcher.notify
            buffered.on_recorded = searcher.notify
        # Before accepting: re-index archive files whose rows a crash lost (OS crash with
        # SQLite WAL, or a backlog not yet recorded when the process ended).
        self._reconcile(scp.archive.root, recorder)
        buffered.start()
        scp.start()
        self.scp = scp
        self._backlog = buffered
        self._spawn(self._assemble_loop, "assembler")
        if searcher is not None:
            self._spawn(lambda: searcher.run(self._stop), "prior-search")
            pacs = self.config.prior_search.pacs
            assert pacs is not None
            log.info(
                "prior search on: %s@%s:%d by C-%s (deadline %g s)",
                pacs.ae_title,
                pacs.host,
                pacs.port,
                pacs.retrieve_method.value.upper(),
                self.config.prior_search.deadline_s,
            )
        listener = self.config.listener
        log.info(
            "LesionWatch listening as %s on %s:%d%s, archive in %s",
            listener.ae_title,
            listener.host,
            listener.port,
            " (TLS)" if listener.tls else "",
            self.config.storage.data_dir.resolve(),
        )

    def _start_workers(self) -> None:
        from .executor import SubprocessExecutor
        from .job_execution import ExecutorSettings
        from .worker import Worker, worker_id

        settings = ExecutorSettings(
            data_dir=str(self.config.storage.data_dir.resolve()),
            inference=self.config.inference,
            pipelines=self.config.pipelines,
            results=self.config.results,
            log_level=self.config.log_level,
        )
        queues = self.roles.queues or self.config.worker.queues
        count = self.roles.concurrency or self.config.worker.concurrency
        for index in range(count):
            identity = worker_id(index)
            worker = Worker(
                identity=identity,
                config=self.config,
                sessions=self.sessions,
                broker=self.runtime.broker,
                relay=self.runtime.relay,
                executor=SubprocessExecutor(settings, name=f"executor-{index}"),
                queues=tuple(queues),
            )
            self.workers.append(worker)
            self._spawn(lambda w=worker: w.run(self._stop), f"worker-{index}")
        log.info("%d worker(s) taking jobs from %s", count, ", ".join(queues))

    def _start_dispatcher(self) -> None:
        from .dispatcher import Dispatcher

        if not self.config.destinations:
            log.warning(
                "no destinations configured: results are kept under %s and not sent; add a "
                "`destinations:` section to send them to PACS",
                self.config.storage.data_dir.resolve() / "results",
            )
            return
        dispatcher = Dispatcher(
            self.sessions,
            self.config.destinations,
            self.config.delivery,
            base_dir=self.config.storage.data_dir.resolve(),
        )
        self._spawn(
            lambda: dispatcher.run_with_broker(self._stop, self.runtime.broker), "dispatcher"
        )
        names = ", ".join(d.name for d in self.config.destinations if d.enabled)
        log.info("dispatcher delivering results to %s", names)

    def _start_metrics(self) -> None:
        metrics = self.config.metrics
        health = HealthCheck(
            {"database": self.runtime.check_database, "broker": self.runtime.broker.ping}
        )
        collector = SiteCollector(
            self.runtime.job_counts, self.runtime.queue_depths, self.runtime.delivery_counts
        )
        try:
            server = MetricsServer(metrics.host, metrics.port, health, [collector])
        except OSError as exc:
            log.error(
                "metrics: cannot listen on %s:%d (%s); /metrics and /healthz are off",
                metrics.host,
                metrics.port,
                exc,
            )
            return
        server.start()
        self.metrics_server = server
        log.info("metrics on http://%s:%d/metrics (health: /healthz)", metrics.host, server.port)

    def _reconcile(self, archive_root: object, recorder: object) -> None:
        """Reconcile now; if the database is down, keep trying in the background (the
        listener starts anyway and backlogs what arrives meanwhile)."""
        from .reconcile import reconcile_archive
        from .record_backlog import database_unavailable

        def attempt() -> bool:
            try:
                reconcile_archive(archive_root, recorder)  # type: ignore[arg-type]
                return True
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                log.warning("archive reconciliation waits for the database: %s", exc)
                return False

        if attempt():
            return

        def retry() -> None:
            while not self._stop.wait(15.0):
                if attempt():
                    log.info("archive reconciliation done after the database returned")
                    return

        self._spawn(retry, "reconcile")

    # -- loops ----------------------------------------------------------------------------------

    def _assemble_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.assembler.run_once()
            except Exception:  # one bad pass must not end assembly for good
                log.exception(
                    "study assembly pass failed; retrying in %.0f s",
                    self.config.assembly.poll_interval_s,
                )
            self._stop.wait(self.config.assembly.poll_interval_s)

    def _relay_loop(self) -> None:
        from .jobs import requeue_stalled_jobs

        passes = 0
        while not self._stop.wait(_RELAY_INTERVAL_S):
            self.runtime.relay.publish_pending()
            passes += 1
            if passes % 30 == 0:  # about once a minute
                try:
                    requeue_stalled_jobs(self.sessions, self.config.worker.lease_s)
                except Exception:
                    log.exception("stalled-job check failed")

    # -- stop -----------------------------------------------------------------------------------

    def wait(self) -> None:
        self._stop.wait()

    def request_stop(self) -> None:
        """Ask every part to stop (signal-handler safe); `stop` then waits for them."""
        self._stop.set()

    def stop(self) -> None:
        """Stop taking work; a running job finishes within worker.shutdown_grace_s or is
        given back; then close connections."""
        self._stop.set()
        if self.scp is not None:
            self.scp.stop()  # type: ignore[attr-defined]
        if self._backlog is not None:
            self._backlog.stop()
        grace = self.config.worker.shutdown_grace_s + 30
        for thread in self._threads:
            thread.join(timeout=grace if thread.name.startswith("worker") else 15)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.runtime.close()


class ListenerService(ServiceProcess):
    """Listener, assembler, workers and dispatcher in one process (`lesionwatch serve`)."""

    def __init__(self, config: LesionWatchConfig, *, broker: Broker | None = None) -> None:
        super().__init__(config, Roles(listen=True, work=True, dispatch=True), broker=broker)
