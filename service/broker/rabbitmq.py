"""The RabbitMQ broker (pika): durable queues, publisher confirms, delayed retries, dead letters.

Names, for logical queue ``q`` under prefix ``p`` (``lesionwatch`` by default):

- ``p.q``: the queue itself (durable; classic with ``x-max-priority``, or quorum), dead-lettering
  to ``p.dlx`` so that messages RabbitMQ rejects land with the dead letters too;
- ``p.q.dead``: the dead letters, bound to the direct exchange ``p.dlx`` with key ``p.q``;
- ``p.q.delay.<ms>``: retries waiting out a delay; a message's TTL there runs out and RabbitMQ
  dead-letters it back to ``p.q`` (no plugin needed). Delays round up to a fixed ladder, so a
  queue has at most ``len(DELAY_LADDER_S)`` of these, and ``x-expires`` removes idle ones;
- ``p:catalog``: one message per logical queue ever declared, so that `delete_prefixed` finds
  every name without the management plugin (``:`` cannot occur in a logical queue name).

Threads (`rabbitmq_link`). pika is not thread-safe, so every connection belongs to one I/O
thread (a `Link`) that loops over ``process_data_events``, which also keeps AMQP heartbeats
flowing while a worker spends ten minutes on a job. Other threads hand it work as commands
and wait for the result. Each thread that calls `receive` gets a consumer link of its own: it
takes a waiting message with basic.get, else consumes (prefetch 1) until one arrives, and
consumes only while its thread waits in `receive`, so no message sits in a client buffer
while an urgent one arrives. One more link publishes and runs declarations, counts and
`ping`. A link reconnects with backoff by itself; messages delivered on a lost connection can
no longer be settled (`heartbeat` says False, settling logs a warning) and RabbitMQ delivers
them again.

Settling: retry, release and dead-letter publish a copy (confirmed) and then ack the original;
a crash in between duplicates the message, which consumers tolerate (at least once).

Delivery counts: the copy carries the deliveries so far in header ``x-lw-deliveries`` (a
released one minus the release, as in the embedded queue); RabbitMQ's ``redelivered`` flag
(quorum queues: ``x-delivery-count``) adds deliveries lost with a consumer. Rarely a message
counts one delivery too many: one pushed to a consumer just as it stopped waiting goes back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue as queue_module
import re
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import BasicProperties

from .base import (
    Broker,
    BrokerError,
    BrokerUnavailableError,
    DeadLetter,
    QueueDepth,
    ReceivedMessage,
)
from .rabbitmq_link import (
    PIKA_QUIET,
    ConsumerLink,
    Link,
    LinkLost,
    RabbitMessage,
    Unroutable,
    close_quietly,
    server_version,
)
from .rabbitmq_names import (
    DELAY_LADDER_S,
    NOT_FOUND,
    PERSISTENT,
    QueueNames,
    dead_reason,
    message_counts,
)

__all__ = ["DELAY_LADDER_S", "RabbitMQBroker", "delete_prefixed"]

LOG = logging.getLogger(__name__)

_PUBLISH_ATTEMPTS = 5
_PRECONDITION_FAILED = 406
_CONSUMER_TIMEOUT_SINCE = (3, 12)  # first RabbitMQ with the x-consumer-timeout queue argument
# A logical name that would collide with another queue's companions.
_RESERVED_NAME = re.compile(r"(^|\.)dead$|\.delay\.\d+$")
_OUTAGE_QUIET_S = 30.0  # failures closer together than this are one outage (one warning)

_TOLD_LOCK = threading.Lock()
_TOLD: set[tuple[int, ...]] = set()  # server versions whose consumer timeout was logged


class RabbitMQBroker(Broker):
    """Queues in RabbitMQ; see the module notes for names, threads and delivery counts."""

    def __init__(
        self,
        url: str,
        *,
        queue_prefix: str = "lesionwatch",
        quorum_queues: bool = False,
        heartbeat_s: int = 60,
        consumer_timeout_s: float = 3600.0,
        connect_timeout_s: float = 10.0,
        max_priority: int = 10,
    ) -> None:
        try:
            parsed = pika.URLParameters(url)
        except Exception as exc:  # noqa: BLE001 - never echo the URL: it holds the password
            raise BrokerError(f"invalid RabbitMQ URL ({type(exc).__name__})") from None
        self._url = url
        self._names = QueueNames(queue_prefix)
        self._quorum = quorum_queues
        self._heartbeat_s = heartbeat_s
        self._consumer_timeout_s = consumer_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_priority = max_priority
        self._op_timeout_s = max(5.0, 3 * connect_timeout_s)  # waits for a connection
        self._where = f"{parsed.host}:{parsed.port}/{quote(parsed.virtual_host, safe='')}"
        self._lock = threading.Lock()
        self._closed = False
        self._admin: Link | None = None
        self._consumers: dict[int, ConsumerLink] = {}
        self._server: tuple[int, ...] | None = None
        self._last_trouble = -_OUTAGE_QUIET_S
        self._warned = False

    @property
    def description(self) -> str:
        kind = "quorum" if self._quorum else "classic"
        return f"rabbitmq at {self._where} ({kind} queues, prefix {self._names.prefix})"

    # -- connections -------------------------------------------------------------------------

    def _parameters(self, role: str) -> pika.URLParameters:
        parameters = pika.URLParameters(self._url)
        parameters.heartbeat = self._heartbeat_s
        parameters.blocked_connection_timeout = max(60.0, self._connect_timeout_s)
        parameters.socket_timeout = self._connect_timeout_s
        parameters.stack_timeout = self._connect_timeout_s
        parameters.connection_attempts = 1  # the link retries, with backoff
        parameters.client_properties = {
            "connection_name": f"lesionwatch {self._names.prefix} {role} "
            f"{socket.gethostname()}:{os.getpid()}"
        }
        return parameters

    def _learn_server(self, connection: BlockingConnection) -> None:
        version = server_version(connection)
        self._server = version
        with _TOLD_LOCK:
            first = version not in _TOLD
            _TOLD.add(version)
        if first and version < _CONSUMER_TIMEOUT_SINCE:
            LOG.info(
                "RabbitMQ %s has no per-queue consumer timeout (3.12+): its global "
                "consumer_timeout (default 30 min) applies instead of %.0f s",
                ".".join(map(str, version)),
                self._consumer_timeout_s,
            )

    def _note_outage(self, what: str) -> None:
        """Warn once per outage, however many links notice it and retry meanwhile."""
        now = time.monotonic()
        with self._lock:
            new = now - self._last_trouble > _OUTAGE_QUIET_S and not self._closed
            self._last_trouble = now
            self._warned = self._warned or new
        if new:
            LOG.warning("RabbitMQ at %s unavailable (%s); reconnecting", self._where, what)

    def _note_recovered(self) -> None:
        with self._lock:
            warned, self._warned = self._warned, False
        if warned:
            LOG.info("RabbitMQ at %s reachable again", self._where)

    def _admin_link(self) -> Link:
        with self._lock:
            if self._closed:
                raise BrokerError(f"{self.description}: the broker was closed")
            if self._admin is None:
                self._admin = Link(self, "publisher")
                self._admin.start()
            return self._admin

    def _consumer_link(self) -> ConsumerLink:
        me = threading.current_thread()
        with self._lock:
            if self._closed:
                raise BrokerError(f"{self.description}: the broker was closed")
            link = self._consumers.get(me.ident or 0)
            if link is not None and link.owner is me and not link.stopped:
                return link
            for ident, other in list(self._consumers.items()):
                if other.stopped:  # its thread ended (and the link with it)
                    del self._consumers[ident]
            link = ConsumerLink(self, me)
            self._consumers[me.ident or 0] = link
            link.start()  # under the lock: an unstarted link looks stopped to the sweep above
        return link

    # -- topology ------------------------------------------------------------------------------

    def _check_name(self, queue: str) -> None:
        if not queue or _RESERVED_NAME.search(queue):
            raise BrokerError(f"queue name {queue!r} is reserved for retry and dead letters")

    def _kind_arguments(self) -> dict[str, Any]:
        if not self._quorum:
            return {}
        # At-least-once dead-lettering (3.10+) needs reject-publish overflow.
        return {
            "x-queue-type": "quorum",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def _main_arguments(self, queue: str, with_timeout: bool) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "x-dead-letter-exchange": self._names.dlx,
            "x-dead-letter-routing-key": self._names.main(queue),
            **self._kind_arguments(),
        }
        if not self._quorum:
            arguments["x-max-priority"] = self._max_priority
        if with_timeout:
            arguments["x-consumer-timeout"] = int(self._consumer_timeout_s * 1000)
        return arguments

    def _declare_topology(self, connection: BlockingConnection, queue: str) -> None:
        """Exchange, dead-letter queue and queue (throwaway channels: errors close them)."""
        self._check_name(queue)
        names = self._names
        main = names.main(queue)
        channel = connection.channel()
        try:
            try:
                channel.queue_declare(main, passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != NOT_FOUND:
                    raise
                channel = connection.channel()
                self._register(channel, queue)
            channel.exchange_declare(names.dlx, exchange_type="direct", durable=True)
            dead_arguments = {"x-queue-type": "quorum"} if self._quorum else {}
            channel.queue_declare(names.dead(queue), durable=True, arguments=dead_arguments)
            channel.queue_bind(names.dead(queue), names.dlx, routing_key=main)
            with_timeout = (self._server or (0,)) >= _CONSUMER_TIMEOUT_SINCE
            try:
                channel.queue_declare(
                    main, durable=True, arguments=self._main_arguments(queue, with_timeout)
                )
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != _PRECONDITION_FAILED or not with_timeout:
                    raise
                # Declared before without the per-queue timeout (an older server or client).
                LOG.warning(
                    "cannot declare %s with x-consumer-timeout (%s); trying without",
                    main,
                    exc.reply_text,
                )
                channel = connection.channel()
                channel.queue_declare(
                    main, durable=True, arguments=self._main_arguments(queue, False)
                )
        except pika.exceptions.ChannelClosedByBroker as exc:
            hint = ""
            if exc.reply_code == _PRECONDITION_FAILED:
                hint = " (it exists with other arguments: classic or quorum, priorities?)"
            raise BrokerError(
                f"cannot declare queue {queue!r} ({main} and its companions): "
                f"{exc.reply_text}{hint}"
            ) from exc
        finally:
            if channel.is_open:
                channel.close()

    def _register(self, channel: BlockingChannel, queue: str) -> None:
        """Record a new logical queue in the catalog, for `delete_prefixed`."""
        channel.queue_declare(self._names.catalog, durable=True)
        channel.confirm_delivery()
        channel.basic_publish(
            "",
            self._names.catalog,
            queue.encode(),
            properties=BasicProperties(delivery_mode=PERSISTENT),
            mandatory=True,
        )

    def _declare_delay(self, connection: BlockingConnection, queue: str, delay_ms: int) -> str:
        name = self._names.delay(queue, delay_ms)
        arguments = {
            "x-message-ttl": delay_ms,
            # Longer than the TTL: a queue never expires with a message still waiting.
            "x-expires": delay_ms + max(delay_ms, 600_000),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self._names.main(queue),
            **self._kind_arguments(),
        }
        channel = connection.channel()
        try:
            channel.queue_declare(name, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise BrokerError(f"cannot declare {name}: {exc.reply_text}") from exc
        finally:
            if channel.is_open:
                channel.close()
        return name

    def declare(self, queues: Sequence[str]) -> None:
        for queue in queues:
            self._check_name(queue)
        link = self._admin_link()

        def run(link: Link) -> None:
            for queue in queues:
                link.declare(queue)

        link.call(run, self._op_timeout_s)

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, queue: str, body: bytes, *, priority: int = 0, message_id: str = "") -> None:
        self._check_name(queue)
        link = self._admin_link()
        properties = BasicProperties(
            delivery_mode=PERSISTENT,
            priority=max(0, min(int(priority), 255)),
            message_id=message_id or uuid.uuid4().hex,
            headers={},
        )
        main = self._names.main(queue)

        def run(link: Link) -> None:
            link.declare(queue)
            try:
                link.publish("", main, body, properties)
            except Unroutable:  # deleted since we declared it
                link.forget(queue)
                link.declare(queue)
                link.publish("", main, body, properties)

        deadline = time.monotonic() + self._op_timeout_s
        last: Exception | None = None
        for attempt in range(_PUBLISH_ATTEMPTS):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                link.call(run, remaining)
                return
            except LinkLost as exc:  # the link reconnects; try again on the new connection
                last = exc
                time.sleep(min(0.2 * (attempt + 1), max(0.0, deadline - time.monotonic())))
        raise BrokerUnavailableError(f"{self.description}: cannot publish to {queue}: {last}")

    # -- consuming -----------------------------------------------------------------------------

    def receive(self, queues: Sequence[str], timeout_s: float) -> ReceivedMessage | None:
        if not queues:
            raise ValueError("receive needs at least one queue")
        for queue in queues:
            self._check_name(queue)
        wanted = tuple(dict.fromkeys(queues))
        link = self._consumer_link()
        held = link.held
        if held is not None and not held.settled and link.holds(held):
            raise BrokerError("this thread still holds an unsettled message: settle it first")
        message = self._take(link, wanted, block_s=0)  # one that came as a wait timed out
        if message is not None:
            return message
        deadline = time.monotonic() + max(0.0, timeout_s)
        link.want(wanted)
        while not link.stopped:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            message = self._take(link, wanted, block_s=min(remaining, 0.5))
            if message is not None:
                return message
        link.want(None)
        if link.connected.is_set() and not link.stopped:
            # After this the consumers are cancelled: what came meanwhile is queued.
            with contextlib.suppress(BrokerError):
                link.call(ConsumerLink.sync, min(5.0, self._op_timeout_s))
        return self._take(link, wanted, block_s=0)

    def _take(
        self, link: ConsumerLink, wanted: tuple[str, ...], block_s: float
    ) -> RabbitMessage | None:
        """The next delivery of `link` still valid; raises what the I/O thread reported."""
        while True:
            try:
                if block_s > 0:
                    item = link.deliveries.get(timeout=block_s)
                else:
                    item = link.deliveries.get_nowait()
            except queue_module.Empty:
                return None
            if isinstance(item, BrokerError):
                raise item
            if not link.holds(item):
                continue  # its connection is gone; RabbitMQ delivers it again
            if item.queue not in wanted:  # left over from a wait on other queues
                item.release()
                continue
            link.held = item
            return item

    # -- inspection ----------------------------------------------------------------------------

    def depth(self, queue: str) -> QueueDepth:
        self._check_name(queue)
        names = self._names

        def run(link: Link) -> QueueDepth:
            assert link.connection is not None
            counts = message_counts(
                link.connection,
                [
                    names.main(queue),
                    names.dead(queue),
                    *(names.delay(queue, s * 1000) for s in DELAY_LADDER_S),
                ],
            )
            return QueueDepth(
                queue,
                ready=counts[0],
                in_flight=-1,  # RabbitMQ tells unacked counts only via the management API
                delayed=sum(counts[2:]),
                dead=counts[1],
            )

        return self._admin_link().call(run, self._op_timeout_s)

    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        self._check_name(queue)
        dead = self._names.dead(queue)

        def run(link: Link) -> list[DeadLetter]:
            assert link.connection is not None
            channel = link.connection.channel()
            letters: list[DeadLetter] = []
            try:
                # Read without acking; closing the channel puts them all back in order.
                while len(letters) < limit:
                    method, properties, body = channel.basic_get(dead, auto_ack=False)
                    if method is None:
                        break
                    letters.append(DeadLetter(queue, body, dead_reason(properties)))
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != NOT_FOUND:
                    raise
            finally:
                if channel.is_open:
                    channel.close()
            return letters

        return self._admin_link().call(run, self._op_timeout_s)

    def ping(self) -> None:
        def run(link: Link) -> None:
            assert link.connection is not None
            link.connection.channel().close()  # a round trip

        try:
            self._admin_link().call(run, self._connect_timeout_s)
        except BrokerUnavailableError:
            raise
        except BrokerError as exc:
            raise BrokerUnavailableError(f"{self.description}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links: list[Link] = list(self._consumers.values())
            if self._admin is not None:
                links.append(self._admin)
            self._consumers.clear()
            self._admin = None
        for link in links:
            link.stop()
        for link in links:
            link.join(5.0)


def delete_prefixed(url: str, prefix: str) -> None:
    """Delete every queue and exchange a `RabbitMQBroker` declared under `prefix`."""
    names = QueueNames(prefix)
    parameters = pika.URLParameters(url)
    parameters.connection_attempts = 1
    quiet, PIKA_QUIET.active = getattr(PIKA_QUIET, "active", False), True  # catalog probe
    try:
        connection = BlockingConnection(parameters)
    except BaseException:
        PIKA_QUIET.active = quiet
        raise
    try:
        queues: set[str] = set()
        channel = connection.channel()
        try:
            while True:
                method, _properties, body = channel.basic_get(names.catalog, auto_ack=False)
                if method is None:
                    break
                queues.add(body.decode())
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != NOT_FOUND:
                raise
        if channel.is_open:
            channel.close()
        channel = connection.channel()
        for queue in sorted(queues):
            for name in names.all_for(queue):
                channel.queue_delete(name)  # deleting a missing queue is fine in RabbitMQ
        channel.exchange_delete(names.dlx)
        channel.queue_delete(names.catalog)
        channel.close()
    finally:
        PIKA_QUIET.active = quiet
        close_quietly(connection)
