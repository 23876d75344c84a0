"""RabbitMQ names and message headers of the LesionWatch broker, and reading them back.

For logical queue ``q`` under prefix ``p``: ``p.q`` (the queue), ``p.q.dead`` (its dead
letters, bound to the direct exchange ``p.dlx``), ``p.q.delay.<ms>`` (retries waiting out a
delay on the fixed ladder) and ``p:catalog`` (every logical queue declared, so that test
clean-up finds all names without the management plugin).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pika.exceptions
from pika.adapters.blocking_connection import BlockingConnection
from pika.spec import BasicProperties

__all__ = [
    "BROKER_HEADERS",
    "DELAY_LADDER_S",
    "DELIVERIES_HEADER",
    "NOT_FOUND",
    "PERSISTENT",
    "QUEUE_HEADER",
    "REASON_HEADER",
    "QueueNames",
    "dead_reason",
    "delay_ms",
    "header_int",
    "header_text",
    "message_counts",
]

# Retry delays round up to one of these (seconds); longer ones are capped at the last.
DELAY_LADDER_S = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

DELIVERIES_HEADER = "x-lw-deliveries"
REASON_HEADER = "x-lw-reason"
QUEUE_HEADER = "x-lw-queue"
# Headers RabbitMQ adds on dead-lettering and redelivery; a copy we publish starts without them.
BROKER_HEADERS = frozenset(
    {
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        REASON_HEADER,
    }
)
PERSISTENT = 2  # delivery mode
NOT_FOUND = 404  # AMQP reply code


class QueueNames:
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


def delay_ms(delay_s: float) -> int:
    """`delay_s` rounded up to the ladder, in ms; 0 means straight back to the queue."""
    if delay_s <= 0:
        return 0
    for step in DELAY_LADDER_S:
        if step >= delay_s:
            return step * 1000
    return DELAY_LADDER_S[-1] * 1000


def header_int(headers: dict[str, Any], name: str) -> int:
    try:
        return max(0, int(headers.get(name) or 0))
    except (TypeError, ValueError):
        return 0


def header_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def message_counts(connection: BlockingConnection, queues: Sequence[str]) -> list[int]:
    """Ready messages per queue by passive declares; 0 for a queue that does not exist."""
    counts = []
    channel = connection.channel()
    try:
        for name in queues:
            try:
                counts.append(channel.queue_declare(name, passive=True).method.message_count)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != NOT_FOUND:
                    raise
                counts.append(0)
                channel = connection.channel()  # a failed passive declare closes the channel
    finally:
        if channel.is_open:
            channel.close()
    return counts


def dead_reason(properties: BasicProperties) -> str:
    headers = properties.headers or {}
    reason = header_text(headers.get(REASON_HEADER))
    if reason:
        return reason
    # Dead-lettered by RabbitMQ itself (a reject without requeue, a delivery limit).
    deaths = headers.get("x-death") or []
    if deaths and isinstance(deaths[0], dict):
        return f"RabbitMQ: {header_text(deaths[0].get('reason')) or 'dead-lettered'}"
    return "dead-lettered"
