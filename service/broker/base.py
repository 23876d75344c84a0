"""The broker contract: what every queue implementation offers and promises.

Semantics (both implementations pass the same contract tests,
tests/integration/test_broker_contract.py):

- `publish` returns only once the broker holds the message durably (embedded: committed;
  RabbitMQ: publisher confirm of a persistent message in a durable queue).
- `receive` hands out at most one message per consumer at a time (prefetch 1). Higher
  `priority` first, then oldest first.
- Delivery is at least once: a message is removed only by `ack`. If its consumer dies (process
  killed, connection lost, lease not renewed), the message is delivered again. Consumers
  make redelivery harmless (the job state machine fences and skips finished work).
- `retry(delay_s)` puts the message back, deliverable after `delay_s`, with its delivery
  count kept; `release()` puts it back at once (shutdown), `dead_letter(reason)` moves it to
  the queue's dead letters, kept with the reason.
- `heartbeat()` tells the broker the consumer is alive and still working on the message;
  it returns False once the message can no longer be acked by this consumer.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailableError",
    "DeadLetter",
    "QueueDepth",
    "ReceivedMessage",
]


class BrokerError(Exception):
    """The broker refused or failed an operation."""


class BrokerUnavailableError(BrokerError):
    """The broker cannot be reached now (connection refused, database down); retry later."""


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    ready: int  # deliverable now
    in_flight: int  # handed to a consumer, not yet acked (-1: the broker does not say)
    delayed: int  # waiting for a retry delay to pass
    dead: int  # dead-lettered


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    body: bytes
    reason: str


class ReceivedMessage(abc.ABC):
    """One delivered message; settle it exactly once with ack, retry, release or dead_letter."""

    def __init__(self, queue: str, body: bytes, delivery_count: int, priority: int) -> None:
        self.queue = queue
        self.body = body
        # 1 on first delivery; grows with redeliveries and retries.
        self.delivery_count = delivery_count
        self.priority = priority
        self.settled = False

    def _settle(self) -> None:
        if self.settled:
            raise BrokerError(f"message from {self.queue} was already settled")
        self.settled = True

    @abc.abstractmethod
    def ack(self) -> None:
        """The work is done and committed: remove the message."""

    @abc.abstractmethod
    def retry(self, delay_s: float, reason: str) -> None:
        """Deliver again after `delay_s` seconds (to any consumer)."""

    @abc.abstractmethod
    def release(self) -> None:
        """Give the message back at once, as if never delivered to this consumer (shutdown)."""

    @abc.abstractmethod
    def dead_letter(self, reason: str) -> None:
        """Move the message to the dead letters of its queue, with `reason`."""

    @abc.abstractmethod
    def heartbeat(self) -> bool:
        """Still working on it; False when this consumer has lost the message."""


class Broker(abc.ABC):
    """A durable queue service. Thread-safe: one broker object serves a whole process."""

    @abc.abstractmethod
    def declare(self, queues: Sequence[str]) -> None:
        """Make sure the queues (and their retry and dead-letter companions) exist."""

    @abc.abstractmethod
    def publish(self, queue: str, body: bytes, *, priority: int = 0, message_id: str = "") -> None:
        """Store a message durably; raises BrokerUnavailableError when that is not possible."""

    @abc.abstractmethod
    def receive(self, queues: Sequence[str], timeout_s: float) -> ReceivedMessage | None:
        """The next message of any of `queues`, waiting up to `timeout_s`; None if none came.

        One consumer (thread) holds at most one unsettled message: settle it before the next
        `receive`.
        """

    @abc.abstractmethod
    def depth(self, queue: str) -> QueueDepth:
        """How many messages wait in `queue`, by state."""

    @abc.abstractmethod
    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """Dead-lettered messages of `queue` with their reasons (oldest first)."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise BrokerUnavailableError unless the broker answers."""

    def close(self) -> None:  # noqa: B027 - optional for implementations without resources
        """Release connections; messages still held are delivered again later."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Where the messages live, for logs and `lesionwatch status` (no credentials)."""
