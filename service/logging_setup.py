"""Process-wide logging format (called once by the CLI, never at import time)."""

from __future__ import annotations

import logging

__all__ = ["configure_logging"]


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # pynetdicom logs every PDU at INFO; its association summary is enough for an admin.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
