"""What every `lesionwatch` command shares: loading the config once, the common options, and
the error a user sees without a traceback."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lesionwatch.config import LesionWatchConfig, load_config

__all__ = [
    "CommandError",
    "add_config_option",
    "add_connection_options",
    "connection_overrides",
    "load_from_args",
]


class CommandError(Exception):
    """A user-facing failure: printed without a traceback, exit status 2."""


def add_config_option(parser: argparse.ArgumentParser, **extra: Any) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML config file (default: $LESIONWATCH_CONFIG, else built-in embedded defaults)",
        **extra,
    )


def add_connection_options(
    parser: argparse.ArgumentParser, *, data_dir: bool = True, nested: bool = False
) -> None:
    """--config, --database, --broker (and --data-dir): where a process finds the site.

    `nested`: the parser is a sub-action of a command that has these options too; unset
    options then leave the command's values alone (argparse would reset them to None).
    """
    extra: dict[str, Any] = {"default": argparse.SUPPRESS} if nested else {}
    add_config_option(parser, **extra)
    parser.add_argument(
        "--database",
        help="SQLAlchemy database URL (database.url; default SQLite in the data dir)",
        **extra,
    )
    parser.add_argument(
        "--broker",
        help="broker: an amqp:// URL selects RabbitMQ, 'embedded' the queue in the database "
        "(broker.kind / broker.url)",
        **extra,
    )
    if data_dir:
        parser.add_argument(
            "--data-dir",
            type=Path,
            help="archive, results and embedded database (storage.data_dir)",
            **extra,
        )


def connection_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {"database.url": getattr(args, "database", None)}
    data_dir = getattr(args, "data_dir", None)
    overrides["storage.data_dir"] = str(data_dir) if data_dir else None
    broker = getattr(args, "broker", None)
    if broker:
        if broker == "embedded":
            overrides["broker.kind"] = "embedded"
        elif broker.split(":", 1)[0].lower() in ("amqp", "amqps"):
            overrides["broker.kind"] = "rabbitmq"
            overrides["broker.url"] = broker
        else:
            raise CommandError(
                f"--broker must be an amqp:// URL or 'embedded', not {broker.split(':', 1)[0]!r}"
            )
    return overrides


def load_from_args(
    args: argparse.Namespace, overrides: dict[str, Any] | None = None
) -> LesionWatchConfig:
    """The effective config: defaults < file < environment < these command-line options."""
    file = getattr(args, "config", None) or (
        Path(os.environ["LESIONWATCH_CONFIG"]) if os.environ.get("LESIONWATCH_CONFIG") else None
    )
    merged = {**connection_overrides(args), **(overrides or {})}
    return load_config(file, overrides=merged)
