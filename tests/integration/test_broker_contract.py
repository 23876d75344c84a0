"""One contract, every broker: the embedded queue on SQLite and on PostgreSQL, and RabbitMQ.

Each test runs against each implementation (fixture `broker`, see broker_fixtures.py) with
queues of its own, so the tests do not see each other's messages.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from broker_fixtures import BrokerFactory

from lesionwatch.service.broker import Broker

pytestmark = pytest.mark.integration


def _queue() -> str:
    return f"contract-{uuid.uuid4().hex[:10]}"


def _receive(broker: Broker, queue: str, timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    message = broker.receive([queue], timeout_s=timeout_s)
    assert message is not None, f"no message arrived on {queue} within {timeout_s} s"
    return message


def test_published_message_arrives_once_and_ack_removes_it(broker: Broker) -> None:
    queue = _queue()
    broker.declare([queue])
    broker.publish(queue, b'{"n": 1}')
    message = _receive(broker, queue)
    assert message.body == b'{"n": 1}'
    assert message.queue == queue
    assert message.delivery_count == 1
    message.ack()
    assert broker.receive([queue], timeout_s=0.5) is None
    depth = broker.depth(queue)
    assert (depth.ready, depth.delayed, depth.dead) == (0, 0, 0)


def test_higher_priority_first_then_oldest_first(broker: Broker) -> None:
    queue = _queue()
    broker.declare([queue])
    for body, priority in [(b"routine-1", 0), (b"routine-2", 0), (b"urgent", 8)]:
        broker.publish(queue, body, priority=priority)
    order = []
    for _ in range(3):
        message = _receive(broker, queue)
        order.append(message.body)
        message.ack()
    assert order == [b"urgent", b"routine-1", b"routine-2"]


def test_retry_waits_for_its_delay_and_counts_the_delivery(broker: Broker) -> None:
    queue = _queue()
    broker.declare([queue])
    broker.publish(queue, b"again")
    first = _receive(broker, queue)
    first.retry(1.5, "transient: PACS busy")
    started = time.monotonic()
    assert broker.receive([queue], timeout_s=0.5) is None  # not before its delay
    assert broker.depth(queue).delayed == 1
    second = _receive(broker, queue, timeout_s=15)
    assert time.monotonic() - started >= 1.0
    assert second.body == b"again"
    assert second.delivery_count == 2
    second.ack()


def test_release_gives_the_message_back_at_once(broker: Broker) -> None:
    queue = _queue()
    broker.declare([queue])
    broker.publish(queue, b"shutdown")
    _receive(broker, queue).release()
    again = _receive(broker, queue, timeout_s=5)
    assert again.body == b"shutdown"
    again.ack()


def test_dead_letter_keeps_the_message_with_its_reason(broker: Broker) -> None:
    queue = _queue()
    broker.declare([queue])
    broker.publish(queue, b"poison")
    _receive(broker, queue).dead_letter("permanent: FLAIR series unreadable")
    assert broker.receive([queue], timeout_s=0.5) is None
    deadline = time.monotonic() + 10
    while broker.depth(queue).dead != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert broker.depth(queue).dead == 1
    [dead] = broker.dead_letters(queue)
    assert dead.body == b"poison"
    assert "FLAIR series unreadable" in dead.reason


def test_one_consumer_holds_one_message_until_it_settles(broker: Broker) -> None:
    queue = _queue()
    broker.declare([queue])
    broker.publish(queue, b"a")
    broker.publish(queue, b"b")
    held = _receive(broker, queue)
    # Another consumer (thread) gets the other message meanwhile.
    got: list[bytes] = []

    def other() -> None:
        message = broker.receive([queue], timeout_s=10)
        if message is not None:
            got.append(message.body)
            message.ack()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(15)
    assert sorted([held.body, *got]) == [b"a", b"b"]
    held.ack()


def test_receive_takes_from_any_of_several_queues(broker: Broker) -> None:
    first, second = _queue(), _queue()
    broker.declare([first, second])
    broker.publish(second, b"from-second")
    assert broker.receive([first], timeout_s=0.3) is None
    message = broker.receive([first, second], timeout_s=10)
    assert message is not None and message.body == b"from-second" and message.queue == second
    message.ack()


def test_heartbeat_holds_the_message_while_work_goes_on(broker: Broker) -> None:
    queue = _queue()
    broker.declare([queue])
    broker.publish(queue, b"long job")
    message = _receive(broker, queue)
    for _ in range(3):
        assert message.heartbeat() is True
        time.sleep(0.2)
    message.ack()
    assert message.heartbeat() is False  # settled: nothing left to hold


def test_ping_answers(broker: Broker) -> None:
    broker.ping()
    assert broker.description


def test_a_consumer_that_dies_loses_its_message_to_another(broker_factory: BrokerFactory) -> None:
    queue = _queue()
    dying = broker_factory()
    dying.declare([queue])
    dying.publish(queue, b"in progress when the worker died")
    taken = _receive(dying, queue)
    assert taken.delivery_count == 1
    dying.close()  # its connection goes away, the message stays unacked
    survivor = broker_factory()
    # Embedded: after the (short, test-sized) lease runs out; RabbitMQ: at once.
    again = _receive(survivor, queue, timeout_s=30)
    assert again.body == b"in progress when the worker died"
    assert again.delivery_count == 2
    again.ack()
    assert survivor.receive([queue], timeout_s=0.5) is None
