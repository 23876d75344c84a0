"""The worker: takes job messages, runs them in its executor, commits, then acknowledges.

For each message:
1. claim the job row (a lease in the database; a finished job is acknowledged and skipped,
   one another live worker holds is put back for later);
2. gather its input files (series from the archive, the prior study, or the findings of the
   study's pipelines for a report job);
3. run it in the executor process, renewing the lease meanwhile (a lost lease, i.e. the job
   was cancelled or taken over, stops the run);
4. in ONE transaction: mark the job succeeded, store its findings, queue its result objects
   for every destination (and the dispatcher's message), and the study report when it was the
   study's last job; or record the failed attempt;
5. only then settle the message: ack, retry with a delay, or dead-letter after the last attempt.

A crash at any point repeats work, never loses it: an unacked message comes back, the lease
fences the old run, results are rebuilt with the same UIDs.

SIGTERM (`stop` set): no new message is taken; the running job may finish within
`worker.shutdown_grace_s`, else it is stopped and given back (released, not counted).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import CursorResult, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from lesionwatch.config.schema import LesionWatchConfig

from .broker import Broker, BrokerError, BrokerUnavailableError, ReceivedMessage
from .db.engine import write_session
from .db.models import utcnow
from .db.work_models import WorkerRecord
from .executor import (
    ExecutionFailedError,
    ExecutorCrashedError,
    JobAbortedError,
    JobTimeoutError,
    SubprocessExecutor,
)
from .job_execution import (
    ExecResult,
    PermanentJobError,
    PipelineRequest,
    ReportRequest,
    is_permanent,
)
from .job_inputs import JobSkippedError, is_report, pipeline_request, report_request
from .jobs import (
    Claim,
    ClaimKind,
    Completion,
    FailureKind,
    JobTicket,
    RetryPolicy,
    claim_job,
    complete_job,
    fail_attempt,
    release_job,
    renew_lease,
    skip_job,
)
from .messages import JobMessage, MessageFormatError, decode_message
from .metrics import METRICS
from .outbox import OutboxRelay

__all__ = ["Worker", "worker_id"]

LOG = logging.getLogger(__name__)

T = TypeVar("T")

_DB_ERRORS = (OperationalError, DBAPIError)
_IDLE_HEARTBEAT_S = 10.0
_CLAIM_DB_WAIT_S = 60.0  # how long a message is held while the database is away
_COMMIT_DB_WAIT_S = 1800.0  # finished results wait this long for the database to return


def worker_id(index: int) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{index}"[:128]


class _Stop(Exception):
    """The worker is stopping while waiting for the database."""


class Worker:
    """One job at a time; run several (threads, each with its own executor) for parallelism."""

    def __init__(
        self,
        *,
        identity: str,
        config: LesionWatchConfig,
        sessions: sessionmaker[Session],
        broker: Broker,
        relay: OutboxRelay,
        executor: SubprocessExecutor,
        queues: tuple[str, ...] | None = None,
    ) -> None:
        self.identity = identity
        self._config = config
        self._sessions = sessions
        self._broker = broker
        self._relay = relay
        self._executor = executor
        self._queues = tuple(queues or config.worker.queues)
        self._policy = RetryPolicy.from_config(config.worker)
        self._data_dir = config.storage.data_dir.resolve()
        self._destinations = [d.name for d in config.destinations if d.enabled]
        self._last_heartbeat = 0.0
        self.jobs_done = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Take and run jobs until `stop` is set."""
        if not self._start_executor(stop):
            return
        self._record_worker("idle", None, force=True)
        outage_logged = False
        try:
            while not stop.is_set():
                try:
                    message = self._broker.receive(self._queues, timeout_s=1.0)
                    outage_logged = False
                except BrokerUnavailableError as exc:
                    if not outage_logged:
                        LOG.warning("%s: broker unavailable, waiting: %s", self.identity, exc)
                        outage_logged = True
                    stop.wait(2.0)
                    continue
                if message is None:
                    self._record_worker("idle", None)
                    continue
                try:
                    self._handle(message, stop)
                except _Stop:
                    if not message.settled:
                        self._settle(message.release)
                except Exception:  # one bad message must not end the worker
                    LOG.exception("%s: unexpected error handling a message", self.identity)
                    if not message.settled:
                        self._settle(functools.partial(message.retry, 30.0, "worker error"))
        finally:
            self._record_worker("stopped", None, force=True)
            self._executor.stop()

    def _start_executor(self, stop: threading.Event) -> bool:
        """Start the executor (models load there); while that fails (unreadable weights, a
        card that does not fit), say why and try again every minute, taking no jobs."""
        while not stop.is_set():
            try:
                self._executor.start()
                return True
            except (ExecutionFailedError, ExecutorCrashedError) as exc:
                LOG.error(
                    "%s: cannot start its executor, taking no jobs (retrying in 60 s): %s",
                    self.identity,
                    exc,
                )
                self._record_worker("error", None, force=True)
                stop.wait(60.0)
        return False

    # -- one message ----------------------------------------------------------------------------

    def _handle(self, message: ReceivedMessage, stop: threading.Event) -> None:
        try:
            decoded = decode_message(message.body)
        except MessageFormatError as exc:
            problem = str(exc)
            LOG.error("%s: dead-lettering a message from %s: %s", self.identity, message.queue, exc)
            self._settle(lambda: message.dead_letter(problem))
            return
        if not isinstance(decoded, JobMessage):
            self._settle(lambda: message.dead_letter(f"a {decoded.kind} message on a job queue"))
            return
        claim: Claim = self._with_db(
            lambda s: claim_job(
                s, decoded.job_id, self.identity, lease_s=self._config.worker.lease_s, now=utcnow()
            ),
            message,
            stop,
            _CLAIM_DB_WAIT_S,
        )
        if claim.kind == ClaimKind.SKIP:
            LOG.info("%s: %s; acknowledging", self.identity, claim.reason)
            self._settle(message.ack)
            return
        if claim.kind == ClaimKind.BUSY:
            self._settle(lambda: message.retry(claim.retry_after_s, claim.reason))
            return
        assert claim.ticket is not None
        self._run_claimed(claim.ticket, message, stop)

    def _run_claimed(
        self, ticket: JobTicket, message: ReceivedMessage, stop: threading.Event
    ) -> None:
        LOG.info(
            "%s: job %d (%s, study %s) attempt %d",
            self.identity,
            ticket.job_id,
            ticket.pipeline,
            ticket.study_instance_uid,
            ticket.attempt,
        )
        self._record_worker("busy", ticket.job_id)
        started = time.monotonic()
        try:
            request = self._with_db(
                lambda s: self._request(s, ticket), message, stop, _CLAIM_DB_WAIT_S, write=False
            )
        except JobSkippedError as exc:
            why = str(exc)
            self._with_db(
                lambda s: skip_job(
                    s,
                    ticket.job_id,
                    self.identity,
                    reason=why,
                    report_queue=self._config.worker.report_queue,
                    now=utcnow(),
                ),
                message,
                stop,
                _COMMIT_DB_WAIT_S,
            )
            self._settle(message.ack)
            self._relay.publish_pending()
            LOG.info("%s: job %d skipped: %s", self.identity, ticket.job_id, exc)
            return
        except _Stop:
            raise
        except Exception as exc:  # e.g. a pipeline this version does not know
            kind = FailureKind.PERMANENT if is_permanent(exc) else FailureKind.TRANSIENT
            if not isinstance(exc, PermanentJobError):
                LOG.exception("%s: job %d: cannot gather its inputs", self.identity, ticket.job_id)
            self._failed(ticket, message, stop, f"{type(exc).__name__}: {exc}", kind)
            return

        keeper = _LeaseKeeper(self, ticket, message)
        keeper.start()
        grace_until: list[float] = []

        def should_stop() -> str | None:
            if keeper.lost.is_set():
                return "the job's lease was lost (cancelled or taken over)"
            if stop.is_set():
                if not grace_until:
                    grace_until.append(time.monotonic() + self._config.worker.shutdown_grace_s)
                    LOG.info(
                        "%s: stopping; job %d may finish within %g s",
                        self.identity,
                        ticket.job_id,
                        self._config.worker.shutdown_grace_s,
                    )
                if time.monotonic() > grace_until[0]:
                    return "the worker is shutting down"
            return None

        try:
            result = self._executor.run(
                request, timeout_s=self._config.worker.job_timeout_s, should_stop=should_stop
            )
        except JobAbortedError as exc:
            keeper.stop()
            if keeper.lost.is_set():
                LOG.warning("%s: job %d stopped: %s", self.identity, ticket.job_id, exc)
                self._settle(message.ack)
            else:
                self._with_db(
                    lambda s: release_job(
                        s,
                        ticket.job_id,
                        self.identity,
                        reason="requeued: the worker shut down during the job",
                        now=utcnow(),
                    ),
                    message,
                    None,
                    _CLAIM_DB_WAIT_S,
                )
                self._settle(message.release)
            return
        except JobTimeoutError as exc:
            keeper.stop()
            self._failed(ticket, message, stop, str(exc), FailureKind.TIMEOUT)
            return
        except ExecutorCrashedError as exc:
            keeper.stop()
            self._failed(ticket, message, stop, str(exc), FailureKind.TRANSIENT)
            return
        except ExecutionFailedError as exc:
            keeper.stop()
            if exc.details:
                LOG.debug("job %d traceback:\n%s", ticket.job_id, exc.details)
            kind = FailureKind.PERMANENT if exc.permanent else FailureKind.TRANSIENT
            self._failed(ticket, message, stop, str(exc), kind)
            return
        keeper.stop()
        self._succeeded(ticket, message, result, time.monotonic() - started)

    def _request(self, session: Session, ticket: JobTicket) -> PipelineRequest | ReportRequest:
        if is_report(ticket):
            return report_request(session, ticket, self._config)
        return pipeline_request(session, ticket, self._config)

    def _succeeded(
        self, ticket: JobTicket, message: ReceivedMessage, result: ExecResult, seconds: float
    ) -> None:
        completion = Completion(
            result=result.record,
            timings_s={**result.timings_s, "total": seconds},
            files=[self._data_dir / f for f in result.files],
            data_dir=self._data_dir,
            summary=result.summary,
        )
        committed = self._with_db(
            lambda s: complete_job(
                s,
                ticket.job_id,
                self.identity,
                completion,
                destinations=self._destinations,
                report_queue=self._config.worker.report_queue,
                now=utcnow(),
            ),
            message,
            None,
            _COMMIT_DB_WAIT_S,
        )
        self._settle(message.ack)
        if not committed:
            LOG.warning(
                "%s: job %d finished after losing its lease; results discarded",
                self.identity,
                ticket.job_id,
            )
            return
        self.jobs_done += 1
        METRICS.job_finished(ticket.pipeline, "succeeded", seconds, result.timings_s)
        LOG.info(
            "%s: job %d (%s) succeeded in %.1f s: %s",
            self.identity,
            ticket.job_id,
            ticket.pipeline,
            seconds,
            result.summary,
        )
        self._relay.publish_pending()
        self._record_worker("idle", None)

    def _failed(
        self,
        ticket: JobTicket,
        message: ReceivedMessage,
        stop: threading.Event | None,
        reason: str,
        kind: FailureKind,
    ) -> None:
        decision = self._with_db(
            lambda s: fail_attempt(
                s,
                ticket.job_id,
                self.identity,
                reason=reason,
                kind=kind,
                policy=self._policy,
                report_queue=self._config.worker.report_queue,
                now=utcnow(),
            ),
            message,
            None,
            _COMMIT_DB_WAIT_S,
        )
        if decision is None:
            self._settle(message.ack)
            return
        if decision.dead_lettered:
            LOG.error(
                "%s: job %d (%s) dead-lettered: %s",
                self.identity,
                ticket.job_id,
                ticket.pipeline,
                decision.reason,
            )
            METRICS.job_finished(ticket.pipeline, "failed", None, {})
            self._settle(lambda: message.dead_letter(decision.reason))
            self._relay.publish_pending()
        else:
            LOG.warning(
                "%s: job %d (%s): %s",
                self.identity,
                ticket.job_id,
                ticket.pipeline,
                decision.reason,
            )
            METRICS.job_finished(ticket.pipeline, "retrying", None, {})
            self._settle(lambda: message.retry(decision.retry_in_s, decision.reason))
        self._record_worker("idle", None)

    # -- helpers --------------------------------------------------------------------------------

    def _with_db(
        self,
        work: Callable[[Session], T],
        message: ReceivedMessage,
        stop: threading.Event | None,
        max_wait_s: float,
        *,
        write: bool = True,
    ) -> T:
        """Run `work` in a transaction (a write one unless `write` is False), waiting out a
        database outage up to `max_wait_s` while keeping the message (heartbeats)."""
        deadline = time.monotonic() + max_wait_s
        pause = 1.0
        while True:
            try:
                if not write:
                    with self._sessions() as session:
                        return work(session)
                with write_session(self._sessions) as session:
                    return work(session)
            except _DB_ERRORS as exc:
                if time.monotonic() > deadline:
                    raise
                LOG.warning(
                    "%s: database unavailable (%s); retrying in %.0f s",
                    self.identity,
                    type(getattr(exc, "orig", exc)).__name__,
                    pause,
                )
            message.heartbeat()
            if stop is not None and stop.wait(pause):
                raise _Stop()
            if stop is None:
                time.sleep(pause)
            pause = min(pause * 2, 15.0)

    def _settle(self, action: Callable[[], None]) -> None:
        try:
            action()
        except BrokerError as exc:
            # The message comes back by itself (lease runs out, connection closed); the job
            # state already says what happened, so the redelivery is skipped or retried.
            LOG.warning("%s: could not settle a message: %s", self.identity, exc)

    def _record_worker(self, state: str, job_id: int | None, *, force: bool = False) -> None:
        now_s = time.monotonic()
        if not force and now_s - self._last_heartbeat < _IDLE_HEARTBEAT_S:
            return
        self._last_heartbeat = now_s
        now = utcnow()
        values = {
            "state": state,
            "current_job_id": job_id,
            "last_heartbeat_at": now,
            "jobs_done": self.jobs_done,
            "device": self._executor.device,
        }
        try:
            with self._sessions.begin() as session:
                result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
                    update(WorkerRecord).where(WorkerRecord.id == self.identity).values(**values)
                )
                changed = result.rowcount
                if not changed:
                    session.add(
                        WorkerRecord(
                            id=self.identity,
                            hostname=socket.gethostname(),
                            pid=os.getpid(),
                            queues=",".join(self._queues),
                            started_at=now,
                            **values,
                        )
                    )
        except _DB_ERRORS:
            pass  # a heartbeat is best effort

    def renew(self, ticket: JobTicket) -> bool | None:
        """Renew the job's lease; None when the database could not be reached."""
        try:
            with write_session(self._sessions) as session:
                held = renew_lease(
                    session,
                    ticket.job_id,
                    self.identity,
                    lease_s=self._config.worker.lease_s,
                    now=utcnow(),
                )
        except _DB_ERRORS:
            return None
        self._record_worker("busy", ticket.job_id)
        return held


class _LeaseKeeper:
    """Renews the job lease and the message while the executor works."""

    def __init__(self, worker: Worker, ticket: JobTicket, message: ReceivedMessage) -> None:
        self._worker = worker
        self._ticket = ticket
        self._message = message
        self._interval_s = max(1.0, worker._config.worker.lease_s / 3)
        self._done = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{ticket.job_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._done.wait(self._interval_s):
            try:
                self._message.heartbeat()
            except BrokerError as exc:
                LOG.debug("message heartbeat failed: %s", exc)
            held = self._worker.renew(self._ticket)
            if held is False:
                self.lost.set()
                return
