"""RabbitMQ beyond the shared contract: heartbeats during long jobs, lost connections, a server
restart, and quorum queues. Needs a real RabbitMQ (and rabbitmqctl for the server-side steps).

Two tests act on the server (close this broker's connections; stop and start the RabbitMQ
app); the restart one always starts the app again, since other tests share the server.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import RABBITMQ_URL, require_executable, require_rabbitmq

from lesionwatch.service.broker import BrokerError, BrokerUnavailableError
from lesionwatch.service.broker.rabbitmq import RabbitMQBroker, delete_prefixed

pytestmark = pytest.mark.integration

MakeBroker = Callable[..., RabbitMQBroker]


@pytest.fixture
def prefix() -> str:
    return f"lwtest-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_broker(prefix: str) -> Iterator[MakeBroker]:
    """RabbitMQ brokers sharing one test prefix; closed and their queues deleted afterwards."""
    require_rabbitmq()
    created: list[RabbitMQBroker] = []

    def make(**options: Any) -> RabbitMQBroker:
        options.setdefault("heartbeat_s", 10)
        broker = RabbitMQBroker(RABBITMQ_URL, queue_prefix=prefix, **options)
        created.append(broker)
        return broker

    try:
        yield make
    finally:
        for broker in created:
            broker.close()
        _wait_for_rabbitmq()
        delete_prefixed(RABBITMQ_URL, prefix)


def _rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        [require_executable("rabbitmqctl"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def _wait_for_rabbitmq(timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        probe = RabbitMQBroker(RABBITMQ_URL, connect_timeout_s=2)
        try:
            probe.ping()
            return
        except BrokerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        finally:
            probe.close()


def _close_connections_of(prefix: str) -> int:
    """Close, server side, the connections whose client-given name carries `prefix`."""
    closed = 0
    for line in _rabbitmqctl("list_connections", "-q", "pid", "client_properties").splitlines():
        pid, _, properties = line.partition("\t")
        if f"lesionwatch {prefix} " in properties:
            _rabbitmqctl("close_connection", pid, "test: connection lost")
            closed += 1
    return closed


def _queue() -> str:
    return f"rmq-{uuid.uuid4().hex[:8]}"


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_heartbeats_keep_the_connection_through_a_long_job(make_broker: MakeBroker) -> None:
    broker = make_broker(heartbeat_s=2)
    queue = _queue()
    broker.declare([queue])
    broker.publish(queue, b"ten-minute job")
    message = broker.receive([queue], timeout_s=10)
    assert message is not None
    # The job thread blocks well past two heartbeat intervals (RabbitMQ drops a silent
    # connection after about two): the broker's I/O thread must keep answering meanwhile.
    time.sleep(10)
    assert message.heartbeat() is True
    message.ack()
    assert broker.receive([queue], timeout_s=1) is None
    other = make_broker(heartbeat_s=2)
    assert other.receive([queue], timeout_s=1) is None  # not redelivered anywhere
    assert other.depth(queue).ready == 0


def test_a_lost_connection_redelivers_held_messages_and_consumers_reconnect(
    make_broker: MakeBroker, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    require_executable("rabbitmqctl")
    broker = make_broker()
    queue = _queue()
    broker.declare([queue])
    broker.publish(queue, b"held when the connection went")
    held = broker.receive([queue], timeout_s=10)
    assert held is not None and held.delivery_count == 1
    assert held.heartbeat() is True

    assert _close_connections_of(prefix) >= 2  # the publisher's and this consumer's
    assert _wait_until(lambda: held.heartbeat() is False, 10), "loss not noticed"

    again = broker.receive([queue], timeout_s=15)  # the same thread, a new connection
    assert again is not None
    assert again.body == b"held when the connection went"
    assert again.delivery_count == 2
    again.ack()
    with caplog.at_level(logging.WARNING, logger="lesionwatch.service.broker.rabbitmq"):
        held.ack()  # too late: only a warning, RabbitMQ has redelivered it already
    assert "connection to RabbitMQ was lost" in caplog.text
    assert broker.receive([queue], timeout_s=0.5) is None

    broker.publish(queue, b"after the loss")  # the publisher reconnected too
    after = broker.receive([queue], timeout_s=10)
    assert after is not None and after.body == b"after the loss"
    after.ack()


def test_quorum_queues_publish_receive_retry_and_dead_letter(make_broker: MakeBroker) -> None:
    broker = make_broker(quorum_queues=True)
    queue = _queue()
    broker.declare([queue])
    broker.publish(queue, b"transient")
    broker.publish(queue, b"poison")

    first = broker.receive([queue], timeout_s=10)
    assert first is not None and first.body == b"transient" and first.delivery_count == 1
    first.retry(1, "transient: PACS busy")
    assert broker.depth(queue).delayed == 1
    second = broker.receive([queue], timeout_s=10)
    assert second is not None and second.body == b"poison"
    second.dead_letter("permanent: not a FLAIR series")
    again = broker.receive([queue], timeout_s=15)
    assert again is not None and again.body == b"transient" and again.delivery_count == 2
    again.ack()

    assert _wait_until(lambda: broker.depth(queue).dead == 1, 10)
    [dead] = broker.dead_letters(queue)
    assert (dead.body, dead.reason) == (b"poison", "permanent: not a FLAIR series")
    assert broker.depth(queue).dead == 1  # reading dead letters leaves them in place

    # A consumer that dies: the quorum queue's own count (x-delivery-count) is used.
    broker.publish(queue, b"worker died")
    dying = make_broker(quorum_queues=True)
    taken = dying.receive([queue], timeout_s=10)
    assert taken is not None and taken.delivery_count == 1
    dying.close()
    redelivered = broker.receive([queue], timeout_s=10)
    assert redelivered is not None and redelivered.delivery_count == 2
    redelivered.ack()

    # The same names as classic queues are refused, with a message that says why.
    with pytest.raises(BrokerError, match="other arguments"):
        make_broker(quorum_queues=False).declare([queue])


def test_publishing_resumes_after_a_rabbitmq_restart(make_broker: MakeBroker) -> None:
    require_executable("rabbitmqctl")
    broker = make_broker(connect_timeout_s=1)
    queue = _queue()
    broker.declare([queue])
    broker.publish(queue, b"before the restart")
    try:
        _rabbitmqctl("stop_app")
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError):
            broker.publish(queue, b"while stopped")
        assert time.monotonic() - started < 20  # bounded, not forever
        with pytest.raises(BrokerUnavailableError):
            broker.ping()
    finally:
        _rabbitmqctl("start_app")
        _rabbitmqctl("await_startup")
    _wait_for_rabbitmq()
    broker.publish(queue, b"after the restart")
    bodies = []
    for _ in range(2):
        message = broker.receive([queue], timeout_s=10)
        assert message is not None
        bodies.append(message.body)
        message.ack()
    assert bodies == [b"before the restart", b"after the restart"]


def test_each_receiving_thread_gets_its_own_consumer(make_broker: MakeBroker) -> None:
    broker = make_broker()
    queue = _queue()
    broker.declare([queue])
    for n in range(4):
        broker.publish(queue, f"job {n}".encode())
    got: list[bytes] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def work() -> None:
        message = broker.receive([queue], timeout_s=10)
        assert message is not None
        barrier.wait(10)  # all four hold one message at the same time (prefetch 1 each)
        with lock:
            got.append(message.body)
        message.ack()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(got) == [f"job {n}".encode() for n in range(4)]


def test_names_of_companion_queues_are_refused(make_broker: MakeBroker) -> None:
    broker = make_broker()
    for name in ("jobs.dead", "jobs.delay.5000"):
        with pytest.raises(BrokerError, match="reserved"):
            broker.publish(name, b"x")
