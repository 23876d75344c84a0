"""Broker fixtures: every broker test runs on the embedded queue (SQLite, PostgreSQL) and on a
real RabbitMQ, each with its own queues (a unique prefix), cleaned up afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from lesionwatch.service.broker import Broker

BrokerFactory = Callable[[], Broker]

BROKER_KINDS = ["embedded-sqlite", "embedded-postgresql", "rabbitmq"]
# Short leases so that a test sees a dead consumer's message come back within seconds.
TEST_LEASE_S = 2.0


def delete_rabbitmq_queues(url: str, prefix: str) -> None:
    """Remove the queues and exchanges a test's broker declared under `prefix`."""
    from lesionwatch.service.broker.rabbitmq import delete_prefixed

    delete_prefixed(url, prefix)


@pytest.fixture(params=BROKER_KINDS)
def broker_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerFactory]:
    """Makes independent broker objects (think: processes) on one backend."""
    from conftest import RABBITMQ_URL, fresh_postgres_schema, require_rabbitmq

    from lesionwatch.service.broker.embedded import EmbeddedBroker
    from lesionwatch.service.db.engine import create_db_engine, migrate

    kind = request.param
    created: list[Broker] = []
    with ExitStack() as stack:
        if kind == "rabbitmq":
            require_rabbitmq()
            from lesionwatch.service.broker.rabbitmq import RabbitMQBroker

            prefix = f"lwtest-{uuid.uuid4().hex[:8]}"
            stack.callback(delete_rabbitmq_queues, RABBITMQ_URL, prefix)

            def make() -> Broker:
                broker = RabbitMQBroker(RABBITMQ_URL, queue_prefix=prefix, heartbeat_s=10)
                created.append(broker)
                return broker

        else:
            if kind == "embedded-sqlite":
                url = f"sqlite:///{tmp_path / 'queue.db'}"
            else:
                url = stack.enter_context(fresh_postgres_schema(request.node.nodeid))
            engine = create_db_engine(url)
            migrate(engine)
            stack.callback(engine.dispose)

            def make() -> Broker:
                broker = EmbeddedBroker(engine, lease_s=TEST_LEASE_S, poll_interval_s=0.2)
                created.append(broker)
                return broker

        try:
            yield make
        finally:
            for broker in created:
                broker.close()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> Broker:
    return broker_factory()
