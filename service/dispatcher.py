"""The dispatcher process: sends queued results to their destinations, retrying with backoff.

It runs apart from the GPU workers (a worker only queues rows with
`service.delivery.enqueue_results` and a message on the dispatcher's own queue), so a slow
or absent PACS never holds a GPU. A message wakes it at once; between messages it makes a
pass every `delivery.poll_interval_s` for retries that have come due. Each pass claims due
rows per destination (committed), sends them over one association per batch, and records
every instance's outcome with an audit row (who sent what where), committed together.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lesionwatch.config.schema import DeliveryConfig, DestinationConfig
from lesionwatch.dicom_io.scu import StoreItem, store_files
from lesionwatch.service.audit import record_event
from lesionwatch.service.broker import Broker, BrokerError
from lesionwatch.service.db.delivery_models import Delivery, DeliveryState
from lesionwatch.service.db.models import utcnow
from lesionwatch.service.delivery import claim_due, record_result
from lesionwatch.service.messages import DELIVERY_QUEUE
from lesionwatch.service.metrics import METRICS

__all__ = ["DispatchSummary", "Dispatcher"]

LOG = logging.getLogger(__name__)


@dataclass
class DispatchSummary:
    """What one pass did, counted by the resulting delivery state."""

    claimed: int = 0
    sent: int = 0
    retry_scheduled: int = 0
    failed_permanent: int = 0
    gave_up: int = 0
    # Pending rows whose destination is not (or no longer) configured: they wait, visibly.
    unknown_destinations: list[str] = field(default_factory=list)

    def add(self, state: DeliveryState) -> None:
        if state == DeliveryState.SENT:
            self.sent += 1
        elif state == DeliveryState.PENDING:
            self.retry_scheduled += 1
        elif state == DeliveryState.FAILED_PERMANENT:
            self.failed_permanent += 1
        elif state == DeliveryState.GAVE_UP:
            self.gave_up += 1


class Dispatcher:
    """Delivers the outbox. `run_once` is one pass; `run_forever` loops until stopped."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        destinations: Sequence[DestinationConfig],
        delivery_cfg: DeliveryConfig,
        *,
        base_dir: Path | None = None,
        lease_s: float = 600.0,
        actor: str = "dispatcher",
    ) -> None:
        self._sessions = session_factory
        self._destinations = [d for d in destinations if d.enabled]
        self._known = {d.name for d in destinations}
        self._policy = delivery_cfg
        self._base_dir = base_dir
        # How long a claim shields a row from other dispatchers; after a crash the row is
        # resent once this has passed.
        self._lease_s = lease_s
        self._actor = actor

    def _resolve(self, path: str) -> Path:
        resolved = Path(path)
        if not resolved.is_absolute() and self._base_dir is not None:
            resolved = self._base_dir / resolved
        return resolved

    def _send_destination(
        self, destination: DestinationConfig, now: datetime, summary: DispatchSummary
    ) -> None:
        with self._sessions() as session:
            claimed = claim_due(
                session,
                now,
                destination=destination.name,
                limit=self._policy.batch_size,
                lease_s=self._lease_s,
                max_attempts=self._policy.max_attempts,
            )
            session.commit()
        if not claimed:
            return
        summary.claimed += len(claimed)
        started = time.monotonic()
        items = [StoreItem(c.delivery_id, self._resolve(c.path)) for c in claimed]
        results = store_files(destination, items)
        finished = now + timedelta(seconds=time.monotonic() - started)
        with self._sessions() as session:
            for claim, result in zip(claimed, results, strict=True):
                state = record_result(
                    session,
                    claim,
                    result.outcome,
                    result.status,
                    result.reason,
                    now=finished,
                    policy=self._policy,
                )
                summary.add(state)
                METRICS.deliveries.labels(destination.name, result.outcome.value).inc()
                record_event(
                    session,
                    self._actor,
                    "object.sent" if state == DeliveryState.SENT else f"object.{state.value}",
                    job_id=claim.job_id,
                    sop_instance_uid=claim.sop_instance_uid,
                    sop_class_uid=claim.sop_class_uid,
                    destination=f"{destination.name} "
                    f"{destination.ae_title}@{destination.host}:{destination.port}",
                    detail=f"attempt {claim.attempts}: {result.outcome.value}"
                    + (f" (status 0x{result.status:04X})" if result.status is not None else "")
                    + (f": {result.reason}" if result.reason else ""),
                    at=finished,
                )
                if state != DeliveryState.SENT:
                    LOG.warning(
                        "delivery of %s to %s: %s (%s)",
                        claim.sop_instance_uid,
                        destination.name,
                        state.value,
                        result.reason,
                    )
            session.commit()

    def run_once(self, now: datetime | None = None) -> DispatchSummary:
        """Send everything due at `now` (default: the current time) to every enabled destination."""
        now = now or utcnow()
        summary = DispatchSummary()
        for destination in self._destinations:
            self._send_destination(destination, now, summary)
        with self._sessions() as session:
            pending = session.scalars(
                select(Delivery.destination)
                .where(Delivery.state == DeliveryState.PENDING)
                .distinct()
            ).all()
        summary.unknown_destinations = sorted(set(pending) - self._known)
        if summary.unknown_destinations:
            LOG.warning(
                "results wait for destinations that are not configured: %s",
                ", ".join(summary.unknown_destinations),
            )
        return summary

    def run_with_broker(self, stop_event: threading.Event, broker: Broker) -> None:
        """Consume the dispatcher's queue: each message triggers a pass; a pass also runs
        every poll interval for retries that came due. A message is acked after its pass."""
        while not stop_event.is_set():
            try:
                message = broker.receive([DELIVERY_QUEUE], self._policy.poll_interval_s)
            except BrokerError as exc:
                LOG.warning("dispatcher: broker unavailable (%s); polling the outbox", exc)
                message = None
                stop_event.wait(self._policy.poll_interval_s)
            try:
                summary = self.run_once()
                while summary.claimed >= self._policy.batch_size and not stop_event.is_set():
                    summary = self.run_once()
            except SQLAlchemyError:
                LOG.exception("dispatcher pass failed on the database; retrying")
                if message is not None:
                    self._settle(lambda m=message: m.retry(self._policy.poll_interval_s, "db"))
                stop_event.wait(self._policy.poll_interval_s)
                continue
            if message is not None:
                self._settle(message.ack)

    @staticmethod
    def _settle(action: object) -> None:
        try:
            action()  # type: ignore[operator]
        except BrokerError as exc:
            LOG.warning("dispatcher: could not settle a message: %s", exc)

    def run_forever(self, stop_event: threading.Event) -> None:
        """Pass after pass until `stop_event` is set; a database outage is logged and waited out."""
        while not stop_event.is_set():
            try:
                summary = self.run_once()
            except SQLAlchemyError:
                LOG.exception("dispatcher pass failed on the database; retrying")
                stop_event.wait(self._policy.poll_interval_s)
                continue
            # A full batch means more may be due right now; otherwise sleep.
            if summary.claimed < self._policy.batch_size:
                stop_event.wait(self._policy.poll_interval_s)
