"""The embedded queue on SQLite wakes a waiting consumer when another process publishes.

Two engines stand for two processes (`lesionwatch listen` publishing, `lesionwatch work`
waiting): the consumer sees the commit through ``PRAGMA data_version`` within its 50 ms
check, not at its next poll, which has backed off to seconds by then.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from lesionwatch.service.broker.embedded import EmbeddedBroker
from lesionwatch.service.db.engine import create_db_engine, migrate


def test_a_publish_from_another_process_wakes_the_waiting_consumer(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    producer_engine, consumer_engine = create_db_engine(url), create_db_engine(url)
    migrate(producer_engine)
    producer = EmbeddedBroker(producer_engine)
    consumer = EmbeddedBroker(consumer_engine, poll_interval_s=30.0)
    got: list[float] = []

    def wait() -> None:
        message = consumer.receive(["jobs"], timeout_s=60)
        if message is not None:
            got.append(time.monotonic())
            message.ack()

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(7.0)  # the consumer's poll has backed off to 6.4 s by now
    published = time.monotonic()
    producer.publish("jobs", b'{"n": 1}')
    thread.join(60)
    assert got, "the consumer never received the message"
    # Without the commit watch it would look again only ~5 s later.
    assert got[0] - published < 3.0
    producer_engine.dispose()
    consumer_engine.dispose()
