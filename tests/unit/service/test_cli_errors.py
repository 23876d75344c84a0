"""Operators get a sentence, not a traceback, when the database is unreachable."""

from __future__ import annotations

import pytest
from conftest import free_port

from lesionwatch.service.cli import main


def test_an_unreachable_database_is_named_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"postgresql+psycopg://lesionwatch@127.0.0.1:{free_port()}/lesionwatch"
    assert main(["jobs", "--database", url]) == 3
    error = capsys.readouterr().err
    assert error.startswith("lesionwatch: cannot use the database: connection failed")
    assert "Traceback" not in error and "check database.url / --database" in error
