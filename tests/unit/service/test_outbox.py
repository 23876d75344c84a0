"""The outbox: a message exists once its transaction commits, and is published after, even when
the broker is away at that moment; a rolled-back transaction leaves no message."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesionwatch.service.broker import BrokerUnavailableError
from lesionwatch.service.broker.embedded import EmbeddedBroker
from lesionwatch.service.db.work_models import OutboxMessage
from lesionwatch.service.messages import DeliveryMessage, JobMessage, decode_message
from lesionwatch.service.outbox import OutboxRelay, add_message


class _FlakyBroker(EmbeddedBroker):
    """The embedded queue, refusing the first `failures` publishes (a broker outage)."""

    def __init__(self, *args: object, failures: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.failures = failures

    def publish(self, queue: str, body: bytes, *, priority: int = 0, message_id: str = "") -> None:
        if self.failures:
            self.failures -= 1
            raise BrokerUnavailableError("broker restarting")
        super().publish(queue, body, priority=priority, message_id=message_id)


def _job(n: int) -> JobMessage:
    return JobMessage(job_id=n, study_instance_uid="1.2", pipeline="flair", generation=0, attempt=0)


def test_only_committed_messages_are_published(sessions: sessionmaker[Session]) -> None:
    broker = EmbeddedBroker(sessions.kw["bind"], poll_interval_s=0.1)
    relay = OutboxRelay(sessions, broker)
    with sessions.begin() as session:
        add_message(session, "jobs", _job(1), priority=8)
    with pytest.raises(RuntimeError), sessions.begin() as session:
        add_message(session, "jobs", _job(2))
        raise RuntimeError("the transaction that would have created job 2 failed")
    assert relay.publish_pending() == 1
    assert relay.pending() == 0
    message = broker.receive(["jobs"], timeout_s=1)
    assert message is not None and message.priority == 8
    assert decode_message(message.body) == _job(1)
    message.ack()
    assert broker.receive(["jobs"], timeout_s=0.2) is None


def test_a_broker_outage_delays_messages_and_loses_none(sessions: sessionmaker[Session]) -> None:
    broker = _FlakyBroker(sessions.kw["bind"], poll_interval_s=0.1, failures=2)
    relay = OutboxRelay(sessions, broker)
    with sessions.begin() as session:
        add_message(session, "jobs", _job(1))
        add_message(session, "deliveries", DeliveryMessage(job_id=1))
    assert relay.publish_pending() == 0  # the broker refused: both wait, with the reason
    with sessions() as session:
        rows = session.scalars(select(OutboxMessage)).all()
        assert [row.last_error for row in rows] == ["broker restarting"] * 2
        assert all(row.claimed_until is None for row in rows)  # free for the next pass
    assert relay.publish_pending() == 0
    assert relay.publish_pending() == 2
    assert relay.pending() == 0
    assert broker.depth("jobs").ready == 1 and broker.depth("deliveries").ready == 1


def test_rows_a_crashed_relay_had_claimed_are_published_by_another(
    sessions: sessionmaker[Session],
) -> None:
    from datetime import timedelta

    from lesionwatch.service.db.models import utcnow

    broker = EmbeddedBroker(sessions.kw["bind"], poll_interval_s=0.1)
    with sessions.begin() as session:
        add_message(session, "jobs", _job(1))
    with sessions.begin() as session:  # a relay claimed the row, then its process died
        row = session.scalars(select(OutboxMessage)).one()
        row.claimed_until = utcnow() + timedelta(seconds=30)
    survivor = OutboxRelay(sessions, broker)
    assert survivor.publish_pending() == 0  # the claim still holds
    with sessions.begin() as session:
        session.scalars(select(OutboxMessage)).one().claimed_until = utcnow() - timedelta(seconds=1)
    assert survivor.publish_pending() == 1
    assert broker.depth("jobs").ready == 1
