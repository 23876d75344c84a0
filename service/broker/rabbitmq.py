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

Threads. pika is not thread-safe, so every connection belongs to one I/O thread (a `_Link`)
that loops over ``process_data_events``, which also keeps AMQP heartbeats flowing while a
worker spends ten minutes on a job. Other threads hand it work as commands and wait for the
result. Each thread that calls `receive` gets a consumer link of its own: it takes a waiting
message with basic.get, else consumes (prefetch 1) until one arrives, and consumes only while
its thread waits in `receive`, so no message sits in a client buffer while an urgent one
arrives. One more link publishes and runs declarations, counts and `ping`. A link reconnects
with backoff by itself; messages delivered on a lost connection can no longer be settled
(`heartbeat` says False, settling logs a warning) and RabbitMQ delivers them again.

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
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from .base import (
    Broker,
    BrokerError,
    BrokerUnavailableError,
    DeadLetter,
    QueueDepth,
    ReceivedMessage,
)

__all__ = ["DELAY_LADDER_S", "RabbitMQBroker", "delete_prefixed"]

LOG = logging.getLogger(__name__)

# Retry delays round up to one of these (seconds); longer ones are capped at the last.
DELAY_LADDER_S = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

_DELIVERIES_HEADER = "x-lw-deliveries"
_REASON_HEADER = "x-lw-reason"
_QUEUE_HEADER = "x-lw-queue"
# Headers RabbitMQ adds on dead-lettering and redelivery; a copy we publish starts without them.
_BROKER_HEADERS = frozenset(
    {
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        _REASON_HEADER,
    }
)
_PERSISTENT = 2
_TICK_S = 0.25  # longest pause of an I/O thread between looks at its commands
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 10.0
_PUBLISH_ATTEMPTS = 5
_NOT_FOUND = 404
_PRECONDITION_FAILED = 406
_CONSUMER_TIMEOUT_SINCE = (3, 12)  # first RabbitMQ with the x-consumer-timeout queue argument
# A logical name that would collide with another queue's companions.
_RESERVED_NAME = re.compile(r"(^|\.)dead$|\.delay\.\d+$")

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.StreamLostError,
    OSError,
)

_OUTAGE_QUIET_S = 30.0  # failures closer together than this are one outage (one warning)

T = TypeVar("T")

_PIKA_QUIET = threading.local()
_TOLD_LOCK = threading.Lock()
_TOLD: set[tuple[int, ...]] = set()  # server versions whose consumer timeout was logged


class _PikaToDebug(logging.Filter):
    """pika logs each channel at INFO, and each refused connect (7 ERROR lines), lost
    connection and probed missing queue at WARNING or ERROR. On the broker's own threads, which
    report outages themselves (once each), pika's records go to this module's DEBUG log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO or not getattr(_PIKA_QUIET, "active", False):
            return True
        if LOG.isEnabledFor(logging.DEBUG):
            LOG.debug("pika %s: %s", record.levelname, record.getMessage())
        return False


def _install_pika_filter() -> None:
    pika_filter = _PikaToDebug()
    for name, logger in list(logging.root.manager.loggerDict.items()):
        # A filter on a logger sees only that logger's own records, so every pika module's.
        if name.split(".")[0] == "pika" and isinstance(logger, logging.Logger):
            logger.addFilter(pika_filter)


_install_pika_filter()


class _LinkLost(BrokerUnavailableError):
    """The link has no connection (now, or any more for the delivery in question)."""


class _Names:
    """Every RabbitMQ name derived from a prefix; `delete_prefixed` relies on these."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.dlx = f"{prefix}.dlx"
        self.catalog = f"{prefix}:catalog"

    def main(self, queue: str) -> str:
        return f"{self.prefix}.{queue}"

    def dead(self, queue: str) -> str:
        return f"{self.prefix}.{queue}.dead"

    def delay(self, queue: str, delay_ms: int) -> str:
        return f"{self.prefix}.{queue}.delay.{delay_ms}"

    def all_for(self, queue: str) -> list[str]:
        delays = [self.delay(queue, seconds * 1000) for seconds in DELAY_LADDER_S]
        return [self.main(queue), self.dead(queue), *delays]


def _delay_ms(delay_s: float) -> int:
    """`delay_s` rounded up to the ladder, in ms; 0 means straight back to the queue."""
    if delay_s <= 0:
        return 0
    for step in DELAY_LADDER_S:
        if step >= delay_s:
            return step * 1000
    return DELAY_LADDER_S[-1] * 1000


def _header_int(headers: dict[str, Any], name: str) -> int:
    try:
        return max(0, int(headers.get(name) or 0))
    except (TypeError, ValueError):
        return 0


def _header_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _server_version(connection: BlockingConnection) -> tuple[int, ...]:
    raw = _header_text(connection._impl.server_properties.get("version"))
    return tuple(int(part) for part in re.findall(r"\d+", raw)[:3])


class _Command:
    """One piece of work for a link's I/O thread; the caller waits on `done`."""

    def __init__(self, fn: Callable[[Any], Any], epoch: int | None) -> None:
        self.fn = fn
        self.epoch = epoch  # only valid on this connection (settling a delivery)
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._state = "pending"

    def claim(self) -> bool:
        with self._lock:
            if self._state != "pending":
                return False
            self._state = "running"
            return True

    def cancel(self) -> bool:
        with self._lock:
            if self._state != "pending":
                return False
            self._state = "cancelled"
            return True

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class _Link:
    """A connection and channel (confirm mode, prefetch 1) owned by one I/O thread."""

    def __init__(self, broker: RabbitMQBroker, role: str) -> None:
        self.broker = broker
        self.role = role
        self.epoch = 0  # bumped by every connection; a delivery is valid only in its epoch
        self.connected = threading.Event()
        self.connection: BlockingConnection | None = None
        self.channel: BlockingChannel | None = None
        self._declared: set[str] = set()  # logical queues declared on this connection
        self._commands: queue_module.SimpleQueue[_Command] = queue_module.SimpleQueue()
        self._stop = threading.Event()
        self._kick = threading.Event()  # ends a reconnect backoff early: someone waits
        self._thread = threading.Thread(target=self._run, name=f"rabbitmq-{role}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set() or not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self.wake()

    def join(self, timeout_s: float) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def wake(self, *, reconnect_now: bool = True) -> None:
        """Have the I/O thread look at its work now (and end a reconnect backoff early)."""
        if reconnect_now:
            self._kick.set()
        connection = self.connection
        if connection is not None:
            # It may be closing meanwhile: the loop looks again within a tick anyway.
            with contextlib.suppress(Exception):
                connection.add_callback_threadsafe(lambda: None)

    def call(self, fn: Callable[[Any], T], timeout_s: float, epoch: int | None = None) -> T:
        """Run `fn(self)` on the I/O thread; _LinkLost when there was no connection in time."""
        if self._stop.is_set():
            raise BrokerError(f"{self.broker.description}: the broker was closed")
        command = _Command(fn, epoch)
        self._commands.put(command)
        self.wake()
        if not command.done.wait(timeout_s):
            if command.cancel():
                raise _LinkLost(f"no connection to RabbitMQ within {timeout_s:.0f} s")
            # Already running: pika's own timeouts (heartbeat, blocked connection) bound it.
            if not command.done.wait(max(60.0, timeout_s)):
                raise _LinkLost("RabbitMQ did not answer")
        if command.error is not None:
            raise command.error
        return command.result  # type: ignore[no-any-return]

    # -- the I/O thread ----------------------------------------------------------------------

    def _should_stop(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        _PIKA_QUIET.active = True
        backoff = _FIRST_BACKOFF_S
        try:
            while not self._should_stop():
                try:
                    self._connect()
                except Exception as exc:  # noqa: BLE001 - any failure: back off, try again
                    self.broker._note_outage(f"cannot connect: {exc!r}")
                    self._fail_commands(bound_only=True)
                    self._kick.wait(backoff * random.uniform(0.7, 1.0))
                    self._kick.clear()
                    self._stop.wait(0.1)  # a stream of kicks must not become a busy loop
                    backoff = min(backoff * 2, _MAX_BACKOFF_S)
                    continue
                backoff = _FIRST_BACKOFF_S
                try:
                    self._serve()
                except _CONNECTION_ERRORS as exc:
                    if not self._should_stop():
                        self.broker._note_outage(f"connection lost: {exc!r}")
                except pika.exceptions.AMQPChannelError as exc:
                    # E.g. a queue or exchange deleted behind our back: a new connection
                    # declares them again.
                    if not self._should_stop():
                        LOG.warning("RabbitMQ %s channel closed (%r); reconnecting", self.role, exc)
                except Exception:
                    if not self._should_stop():
                        LOG.exception("RabbitMQ %s link failed; reconnecting", self.role)
                        self._stop.wait(_FIRST_BACKOFF_S)
                finally:
                    self._disconnect()
        finally:
            self._disconnect()
            self._fail_commands(bound_only=False)

    def _connect(self) -> None:
        connection = BlockingConnection(self.broker._parameters(self.role))
        try:
            self.broker._learn_server(connection)
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=1)
        except BaseException:
            _close_quietly(connection)
            raise
        self.connection, self.channel = connection, channel
        self._declared = set()
        self._connected()
        self.epoch += 1
        self.connected.set()
        self.broker._note_recovered()

    def _connected(self) -> None:
        """Hook: state to reset for a new connection."""

    def _serve(self) -> None:
        assert self.connection is not None
        while not self._should_stop():
            self.connection.process_data_events(time_limit=_TICK_S)
            self._between_events()
            self._run_commands()
            if self.channel is None or not self.channel.is_open:
                raise pika.exceptions.ChannelWrongStateError("the link's channel closed")

    def _between_events(self) -> None:
        """Hook: work of the I/O thread after each round of events."""

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue_module.Empty:
                return
            if not command.claim():
                continue
            try:
                result = command.fn(self)
            except _CONNECTION_ERRORS as exc:
                command.finish(error=_LinkLost(f"connection lost: {exc!r}"))
                raise
            except pika.exceptions.AMQPError as exc:
                command.finish(error=BrokerError(f"RabbitMQ refused: {exc!r}"))
            except Exception as exc:  # noqa: BLE001 - handed to the waiting caller
                command.finish(error=exc)
            else:
                command.finish(result)

    def _disconnect(self) -> None:
        self.connected.clear()
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None:
            _close_quietly(connection)
        self._fail_commands(bound_only=True)

    def _fail_commands(self, *, bound_only: bool) -> None:
        """Fail waiting commands that cannot succeed any more (all of them once stopped)."""
        keep = []
        while True:
            try:
                command = self._commands.get_nowait()
            except queue_module.Empty:
                break
            if bound_only and command.epoch is None:
                keep.append(command)
            elif command.claim():
                if bound_only:
                    command.finish(error=_LinkLost("the connection was lost"))
                else:
                    command.finish(error=BrokerError("the broker was closed"))
        for command in keep:
            self._commands.put(command)

    # -- helpers for commands (I/O thread only) ----------------------------------------------

    def declare(self, queue: str) -> None:
        """Declare `queue` and its companions, once per connection."""
        if queue in self._declared:
            return
        assert self.connection is not None
        self.broker._declare_topology(self.connection, queue)
        self._declared.add(queue)

    def forget(self, queue: str) -> None:
        self._declared.discard(queue)

    def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: BasicProperties
    ) -> None:
        """Publish and wait for the confirm; BrokerError when RabbitMQ cannot route or keep it."""
        assert self.channel is not None
        try:
            self.channel.basic_publish(
                exchange, routing_key, body, properties=properties, mandatory=True
            )
        except pika.exceptions.UnroutableError as exc:
            raise _Unroutable(f"no queue {routing_key!r} behind exchange {exchange!r}") from exc
        except pika.exceptions.NackError as exc:
            raise BrokerError(f"RabbitMQ refused a message for {routing_key!r}") from exc


class _Unroutable(BrokerError):
    """A mandatory publish found no queue (deleted behind our back): declare again, retry."""


class _ConsumerLink(_Link):
    """The link of one receiving thread: consumes only while that thread waits in `receive`."""

    def __init__(self, broker: RabbitMQBroker, owner: threading.Thread) -> None:
        super().__init__(broker, f"consumer-{owner.name}")
        self.owner = owner
        self.deliveries: queue_module.SimpleQueue[_RabbitMessage | BrokerError] = (
            queue_module.SimpleQueue()
        )
        self.held: _RabbitMessage | None = None  # last message handed to the owner
        self._lock = threading.Lock()
        self._wanted: tuple[str, ...] | None = None  # set by the owner, read by the I/O thread
        self._consuming: tuple[str, ...] | None = None
        self._tags: dict[str, str] = {}  # consumer tag -> logical queue
        self._outstanding: _RabbitMessage | None = None  # delivered, not yet settled

    def want(self, queues: tuple[str, ...] | None) -> None:
        with self._lock:
            self._wanted = queues
        # A worker loop calls receive every second: that must not defeat the backoff.
        self.wake(reconnect_now=False)

    def holds(self, message: _RabbitMessage) -> bool:
        """The delivery can still be settled: its connection is the current one."""
        return message.epoch == self.epoch and self.connected.is_set() and not self.stopped

    def _should_stop(self) -> bool:
        # A thread that ended without closing the broker gives its message back.
        return self._stop.is_set() or not self.owner.is_alive()

    def _connected(self) -> None:
        self._tags.clear()
        self._consuming = None
        self._outstanding = None

    def sync(self) -> None:
        """On the I/O thread: consume exactly what the owner wants now."""
        self._between_events()

    def _between_events(self) -> None:
        with self._lock:
            wanted = self._wanted
        if wanted == self._consuming:
            return
        assert self.channel is not None
        for tag in list(self._tags):
            self.channel.basic_cancel(tag)
        self._tags.clear()
        self._consuming = None
        if not wanted or self._outstanding is not None:
            return
        try:
            for queue in wanted:
                self.declare(queue)
        except BrokerError as exc:
            with self._lock:
                self._wanted = None
            self.deliveries.put(exc)
            return
        # A message already waiting is taken with basic.get: consumers on several queues would
        # each be pushed one, and giving back the extra ones counts them as redelivered.
        for queue in wanted:
            method, properties, body = self.channel.basic_get(self.broker._names.main(queue))
            if method is not None:
                self._deliver(queue, method, properties, body)
                return
        for queue in wanted:
            tag = self.channel.basic_consume(
                self.broker._names.main(queue), on_message_callback=self._on_message
            )
            self._tags[tag] = queue
        self._consuming = wanted

    def _on_message(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        queue = self._tags.get(method.consumer_tag)
        if queue is None or self._outstanding is not None:
            # Several queues, one consumer each: a second message came before the cancels
            # (rare: waiting messages are taken by basic.get). It counts as redelivered.
            channel.basic_nack(method.delivery_tag, requeue=True)
            return
        self._deliver(queue, method, properties, body)

    def _deliver(
        self,
        queue: str,
        method: Basic.Deliver | Basic.GetOk,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        message = _RabbitMessage(self, queue, body, properties, method)
        self._outstanding = message
        with self._lock:
            self._wanted = None  # stop consuming: nothing waits in a buffer meanwhile
        self.deliveries.put(message)

    def settle(self, message: _RabbitMessage, doing: str, before_ack: Callable[[], None]) -> None:
        """On the I/O thread: `before_ack` (publish a copy), then ack; warn when too late."""

        def run(link: _ConsumerLink) -> bool:
            if not link.holds(message):
                return False
            assert link.channel is not None
            try:
                before_ack()
            except BrokerError:
                # The copy was refused: give the original back rather than keep it unacked.
                link.channel.basic_nack(message.delivery_tag, requeue=True)
                link._outstanding = None
                raise
            link.channel.basic_ack(message.delivery_tag)
            link._outstanding = None
            return True

        try:
            done = self.holds(message) and self.call(
                run, self.broker._op_timeout_s, epoch=message.epoch
            )
        except _LinkLost:
            done = False
        if not done:
            LOG.warning(
                "%s of a message from %s not done: its connection to RabbitMQ was lost, "
                "RabbitMQ delivers it again",
                doing,
                message.queue,
            )


class _RabbitMessage(ReceivedMessage):
    def __init__(
        self,
        link: _ConsumerLink,
        queue: str,
        body: bytes,
        properties: BasicProperties,
        method: Basic.Deliver | Basic.GetOk,
    ) -> None:
        headers = dict(properties.headers or {})
        returned = _header_int(headers, "x-delivery-count")  # quorum queues count returns
        if method.redelivered:
            returned = max(returned, 1)
        count = _header_int(headers, _DELIVERIES_HEADER) + 1 + returned
        super().__init__(queue, body, count, int(properties.priority or 0))
        self._link = link
        self.epoch = link.epoch
        self.delivery_tag: int = method.delivery_tag
        self.properties = properties

    def _copy(self, deliveries: int, **headers: Any) -> BasicProperties:
        kept = {
            key: value
            for key, value in (self.properties.headers or {}).items()
            if key not in _BROKER_HEADERS
        }
        kept[_DELIVERIES_HEADER] = deliveries
        kept.update(headers)
        return BasicProperties(
            delivery_mode=_PERSISTENT,
            priority=self.properties.priority,
            message_id=self.properties.message_id,
            content_type=self.properties.content_type,
            timestamp=self.properties.timestamp,
            headers=kept,
        )

    def _republish(self, exchange: str, routing_key: str, properties: BasicProperties) -> None:
        """On the I/O thread: publish a copy (confirmed), declaring again if it was deleted."""
        link = self._link
        try:
            link.publish(exchange, routing_key, self.body, properties)
        except _Unroutable:
            link.forget(self.queue)
            link.declare(self.queue)
            link.publish(exchange, routing_key, self.body, properties)

    def ack(self) -> None:
        self._settle()
        self._link.settle(self, "ack", lambda: None)

    def retry(self, delay_s: float, reason: str) -> None:
        self._settle()
        broker = self._link.broker
        delay_ms = _delay_ms(delay_s)
        properties = self._copy(self.delivery_count)

        def copy() -> None:
            if delay_ms == 0:
                self._republish("", broker._names.main(self.queue), properties)
                return
            assert self._link.connection is not None
            # Declared every time: that renews the queue's x-expires lease.
            target = broker._declare_delay(self._link.connection, self.queue, delay_ms)
            self._republish("", target, properties)

        LOG.debug("retry of a message from %s in %d ms: %s", self.queue, delay_ms, reason)
        self._link.settle(self, "retry", copy)

    def release(self) -> None:
        # A copy at the back of the queue that does not count this delivery (like the
        # embedded queue); a nack would count as a redelivery.
        self._settle()
        properties = self._copy(self.delivery_count - 1)
        main = self._link.broker._names.main(self.queue)
        self._link.settle(self, "release", lambda: self._republish("", main, properties))

    def dead_letter(self, reason: str) -> None:
        self._settle()
        names = self._link.broker._names
        properties = self._copy(
            self.delivery_count,
            **{_REASON_HEADER: (reason or "dead-lettered")[:4000], _QUEUE_HEADER: self.queue},
        )
        self._link.settle(
            self,
            "dead-letter",
            lambda: self._republish(names.dlx, names.main(self.queue), properties),
        )

    def heartbeat(self) -> bool:
        # RabbitMQ needs no lease renewal: the delivery holds while its connection lives.
        return not self.settled and self._link.holds(self)


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
        self._names = _Names(queue_prefix)
        self._quorum = quorum_queues
        self._heartbeat_s = heartbeat_s
        self._consumer_timeout_s = consumer_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_priority = max_priority
        self._op_timeout_s = max(5.0, 3 * connect_timeout_s)  # waits for a connection
        self._where = f"{parsed.host}:{parsed.port}/{quote(parsed.virtual_host, safe='')}"
        self._lock = threading.Lock()
        self._closed = False
        self._admin: _Link | None = None
        self._consumers: dict[int, _ConsumerLink] = {}
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
        version = _server_version(connection)
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

    def _admin_link(self) -> _Link:
        with self._lock:
            if self._closed:
                raise BrokerError(f"{self.description}: the broker was closed")
            if self._admin is None:
                self._admin = _Link(self, "publisher")
                self._admin.start()
            return self._admin

    def _consumer_link(self) -> _ConsumerLink:
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
            link = _ConsumerLink(self, me)
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
                if exc.reply_code != _NOT_FOUND:
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
            properties=BasicProperties(delivery_mode=_PERSISTENT),
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

        def run(link: _Link) -> None:
            for queue in queues:
                link.declare(queue)

        link.call(run, self._op_timeout_s)

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, queue: str, body: bytes, *, priority: int = 0, message_id: str = "") -> None:
        self._check_name(queue)
        link = self._admin_link()
        properties = BasicProperties(
            delivery_mode=_PERSISTENT,
            priority=max(0, min(int(priority), 255)),
            message_id=message_id or uuid.uuid4().hex,
            headers={},
        )
        main = self._names.main(queue)

        def run(link: _Link) -> None:
            link.declare(queue)
            try:
                link.publish("", main, body, properties)
            except _Unroutable:  # deleted since we declared it
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
            except _LinkLost as exc:  # the link reconnects; try again on the new connection
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
                link.call(_ConsumerLink.sync, min(5.0, self._op_timeout_s))
        return self._take(link, wanted, block_s=0)

    def _take(
        self, link: _ConsumerLink, wanted: tuple[str, ...], block_s: float
    ) -> _RabbitMessage | None:
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

        def run(link: _Link) -> QueueDepth:
            assert link.connection is not None
            counts = _message_counts(
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

        def run(link: _Link) -> list[DeadLetter]:
            assert link.connection is not None
            channel = link.connection.channel()
            letters: list[DeadLetter] = []
            try:
                # Read without acking; closing the channel puts them all back in order.
                while len(letters) < limit:
                    method, properties, body = channel.basic_get(dead, auto_ack=False)
                    if method is None:
                        break
                    letters.append(DeadLetter(queue, body, _dead_reason(properties)))
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != _NOT_FOUND:
                    raise
            finally:
                if channel.is_open:
                    channel.close()
            return letters

        return self._admin_link().call(run, self._op_timeout_s)

    def ping(self) -> None:
        def run(link: _Link) -> None:
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
            links: list[_Link] = list(self._consumers.values())
            if self._admin is not None:
                links.append(self._admin)
            self._consumers.clear()
            self._admin = None
        for link in links:
            link.stop()
        for link in links:
            link.join(5.0)


def _message_counts(connection: BlockingConnection, queues: Sequence[str]) -> list[int]:
    """Ready messages per queue by passive declares; 0 for a queue that does not exist."""
    counts = []
    channel = connection.channel()
    try:
        for name in queues:
            try:
                counts.append(channel.queue_declare(name, passive=True).method.message_count)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != _NOT_FOUND:
                    raise
                counts.append(0)
                channel = connection.channel()  # a failed passive declare closes the channel
    finally:
        if channel.is_open:
            channel.close()
    return counts


def _dead_reason(properties: BasicProperties) -> str:
    headers = properties.headers or {}
    reason = _header_text(headers.get(_REASON_HEADER))
    if reason:
        return reason
    # Dead-lettered by RabbitMQ itself (a reject without requeue, a delivery limit).
    deaths = headers.get("x-death") or []
    if deaths and isinstance(deaths[0], dict):
        return f"RabbitMQ: {_header_text(deaths[0].get('reason')) or 'dead-lettered'}"
    return "dead-lettered"


def _close_quietly(connection: BlockingConnection) -> None:
    try:
        if connection.is_open:
            connection.close()
    except Exception:  # noqa: BLE001 - it is going away either way
        pass


def delete_prefixed(url: str, prefix: str) -> None:
    """Delete every queue and exchange a `RabbitMQBroker` declared under `prefix`."""
    names = _Names(prefix)
    parameters = pika.URLParameters(url)
    parameters.connection_attempts = 1
    quiet, _PIKA_QUIET.active = getattr(_PIKA_QUIET, "active", False), True  # catalog probe
    try:
        connection = BlockingConnection(parameters)
    except BaseException:
        _PIKA_QUIET.active = quiet
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
            if exc.reply_code != _NOT_FOUND:
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
        _PIKA_QUIET.active = quiet
        _close_quietly(connection)
