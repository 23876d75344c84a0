"""Message brokers: one small interface, an embedded database queue and RabbitMQ (pika)."""

from __future__ import annotations

from sqlalchemy import Engine

from lesionwatch.config.schema import LesionWatchConfig

from .base import (
    Broker,
    BrokerError,
    BrokerUnavailableError,
    DeadLetter,
    QueueDepth,
    ReceivedMessage,
)

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailableError",
    "DeadLetter",
    "QueueDepth",
    "ReceivedMessage",
    "open_broker",
]


def open_broker(config: LesionWatchConfig, engine: Engine) -> Broker:
    """The broker `config.broker` names; the embedded one lives in `engine`'s database."""
    if config.broker.kind == "rabbitmq":
        from .rabbitmq import RabbitMQBroker

        assert config.broker.url is not None  # the schema requires it for rabbitmq
        return RabbitMQBroker(
            config.broker.url.get_secret_value(),
            queue_prefix=config.broker.queue_prefix,
            quorum_queues=config.broker.quorum_queues,
            heartbeat_s=config.broker.heartbeat_s,
            consumer_timeout_s=config.broker.consumer_timeout_s,
            connect_timeout_s=config.broker.connect_timeout_s,
        )
    from .embedded import EmbeddedBroker

    return EmbeddedBroker(
        engine, lease_s=config.worker.lease_s, poll_interval_s=config.broker.poll_interval_s
    )
