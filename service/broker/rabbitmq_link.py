"""The connections of the RabbitMQ broker: each owned by one I/O thread (pika is not
thread-safe), which also keeps AMQP heartbeats flowing while a worker runs a long job.

A `Link` is a connection and channel (confirm mode, prefetch 1) whose thread loops over
``process_data_events``; other threads hand it work as `Command`s and wait for the result. A
`ConsumerLink` belongs to one receiving thread and consumes only while that thread waits in
`receive`. A link reconnects with backoff by itself; a `RabbitMessage` delivered on a lost
connection can no longer be settled (RabbitMQ delivers it again).
"""

from __future__ import annotations

import contextlib
import logging
import queue as queue_module
import random
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from .base import BrokerError, BrokerUnavailableError, ReceivedMessage
from .rabbitmq_names import (
    BROKER_HEADERS,
    DELIVERIES_HEADER,
    PERSISTENT,
    QUEUE_HEADER,
    REASON_HEADER,
    delay_ms,
    header_int,
    header_text,
)

if TYPE_CHECKING:
    from .rabbitmq import RabbitMQBroker

__all__ = [
    "CONNECTION_ERRORS",
    "PIKA_QUIET",
    "ConsumerLink",
    "Link",
    "LinkLost",
    "RabbitMessage",
    "Unroutable",
    "close_quietly",
    "server_version",
]

LOG = logging.getLogger("lesionwatch.service.broker.rabbitmq")

_TICK_S = 0.25  # longest pause of an I/O thread between looks at its commands
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 10.0

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.StreamLostError,
    OSError,
)

T = TypeVar("T")

# Set on the broker's own threads: pika's records there go to DEBUG (see _PikaToDebug).
PIKA_QUIET = threading.local()


class _PikaToDebug(logging.Filter):
    """pika logs each channel at INFO, and each refused connect (7 ERROR lines), lost
    connection and probed missing queue at WARNING or ERROR. On the broker's own threads, which
    report outages themselves (once each), pika's records go to this module's DEBUG log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO or not getattr(PIKA_QUIET, "active", False):
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


class LinkLost(BrokerUnavailableError):
    """The link has no connection (now, or any more for the delivery in question)."""


def server_version(connection: BlockingConnection) -> tuple[int, ...]:
    raw = header_text(connection._impl.server_properties.get("version"))
    return tuple(int(part) for part in re.findall(r"\d+", raw)[:3])


class Command:
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


class Link:
    """A connection and channel (confirm mode, prefetch 1) owned by one I/O thread."""

    def __init__(self, broker: RabbitMQBroker, role: str) -> None:
        self.broker = broker
        self.role = role
        self.epoch = 0  # bumped by every connection; a delivery is valid only in its epoch
        self.connected = threading.Event()
        self.connection: BlockingConnection | None = None
        self.channel: BlockingChannel | None = None
        self._declared: set[str] = set()  # logical queues declared on this connection
        self._commands: queue_module.SimpleQueue[Command] = queue_module.SimpleQueue()
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
        """Run `fn(self)` on the I/O thread; LinkLost when there was no connection in time."""
        if self._stop.is_set():
            raise BrokerError(f"{self.broker.description}: the broker was closed")
        command = Command(fn, epoch)
        self._commands.put(command)
        self.wake()
        if not command.done.wait(timeout_s):
            if command.cancel():
                raise LinkLost(f"no connection to RabbitMQ within {timeout_s:.0f} s")
            # Already running: pika's own timeouts (heartbeat, blocked connection) bound it.
            if not command.done.wait(max(60.0, timeout_s)):
                raise LinkLost("RabbitMQ did not answer")
        if command.error is not None:
            raise command.error
        return command.result  # type: ignore[no-any-return]

    # -- the I/O thread ----------------------------------------------------------------------

    def _should_stop(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        PIKA_QUIET.active = True
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
                except CONNECTION_ERRORS as exc:
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
            close_quietly(connection)
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
            except CONNECTION_ERRORS as exc:
                command.finish(error=LinkLost(f"connection lost: {exc!r}"))
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
            close_quietly(connection)
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
                    command.finish(error=LinkLost("the connection was lost"))
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
            raise Unroutable(f"no queue {routing_key!r} behind exchange {exchange!r}") from exc
        except pika.exceptions.NackError as exc:
            raise BrokerError(f"RabbitMQ refused a message for {routing_key!r}") from exc


class Unroutable(BrokerError):
    """A mandatory publish found no queue (deleted behind our back): declare again, retry."""


class ConsumerLink(Link):
    """The link of one receiving thread: consumes only while that thread waits in `receive`."""

    def __init__(self, broker: RabbitMQBroker, owner: threading.Thread) -> None:
        super().__init__(broker, f"consumer-{owner.name}")
        self.owner = owner
        self.deliveries: queue_module.SimpleQueue[RabbitMessage | BrokerError] = (
            queue_module.SimpleQueue()
        )
        self.held: RabbitMessage | None = None  # last message handed to the owner
        self._lock = threading.Lock()
        self._wanted: tuple[str, ...] | None = None  # set by the owner, read by the I/O thread
        self._consuming: tuple[str, ...] | None = None
        self._tags: dict[str, str] = {}  # consumer tag -> logical queue
        self._outstanding: RabbitMessage | None = None  # delivered, not yet settled

    def want(self, queues: tuple[str, ...] | None) -> None:
        with self._lock:
            self._wanted = queues
        # A worker loop calls receive every second: that must not defeat the backoff.
        self.wake(reconnect_now=False)

    def holds(self, message: RabbitMessage) -> bool:
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
        message = RabbitMessage(self, queue, body, properties, method)
        self._outstanding = message
        with self._lock:
            self._wanted = None  # stop consuming: nothing waits in a buffer meanwhile
        self.deliveries.put(message)

    def settle(self, message: RabbitMessage, doing: str, before_ack: Callable[[], None]) -> None:
        """On the I/O thread: `before_ack` (publish a copy), then ack; warn when too late."""

        def run(link: ConsumerLink) -> bool:
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
        except LinkLost:
            done = False
        if not done:
            LOG.warning(
                "%s of a message from %s not done: its connection to RabbitMQ was lost, "
                "RabbitMQ delivers it again",
                doing,
                message.queue,
            )


class RabbitMessage(ReceivedMessage):
    def __init__(
        self,
        link: ConsumerLink,
        queue: str,
        body: bytes,
        properties: BasicProperties,
        method: Basic.Deliver | Basic.GetOk,
    ) -> None:
        headers = dict(properties.headers or {})
        returned = header_int(headers, "x-delivery-count")  # quorum queues count returns
        if method.redelivered:
            returned = max(returned, 1)
        count = header_int(headers, DELIVERIES_HEADER) + 1 + returned
        super().__init__(queue, body, count, int(properties.priority or 0))
        self._link = link
        self.epoch = link.epoch
        self.delivery_tag: int = method.delivery_tag
        self.properties = properties

    def _copy(self, deliveries: int, **headers: Any) -> BasicProperties:
        kept = {
            key: value
            for key, value in (self.properties.headers or {}).items()
            if key not in BROKER_HEADERS
        }
        kept[DELIVERIES_HEADER] = deliveries
        kept.update(headers)
        return BasicProperties(
            delivery_mode=PERSISTENT,
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
        except Unroutable:
            link.forget(self.queue)
            link.declare(self.queue)
            link.publish(exchange, routing_key, self.body, properties)

    def ack(self) -> None:
        self._settle()
        self._link.settle(self, "ack", lambda: None)

    def retry(self, delay_s: float, reason: str) -> None:
        self._settle()
        broker = self._link.broker
        wait_ms = delay_ms(delay_s)
        properties = self._copy(self.delivery_count)

        def copy() -> None:
            if wait_ms == 0:
                self._republish("", broker._names.main(self.queue), properties)
                return
            assert self._link.connection is not None
            # Declared every time: that renews the queue's x-expires lease.
            target = broker._declare_delay(self._link.connection, self.queue, wait_ms)
            self._republish("", target, properties)

        LOG.debug("retry of a message from %s in %d ms: %s", self.queue, wait_ms, reason)
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
            **{REASON_HEADER: (reason or "dead-lettered")[:4000], QUEUE_HEADER: self.queue},
        )
        self._link.settle(
            self,
            "dead-letter",
            lambda: self._republish(names.dlx, names.main(self.queue), properties),
        )

    def heartbeat(self) -> bool:
        # RabbitMQ needs no lease renewal: the delivery holds while its connection lives.
        return not self.settled and self._link.holds(self)


def close_quietly(connection: BlockingConnection) -> None:
    try:
        if connection.is_open:
            connection.close()
    except Exception:  # noqa: BLE001 - it is going away either way
        pass
