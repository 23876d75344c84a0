"""Operators get a sentence, not a traceback, when the database is unreachable."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import free_port

from lesionwatch.service.cli import main


def test_an_unreachable_database_is_named_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"postgresql+psycopg://lesionwatch@127.0.0.1:{free_port()}/lesionwatch"
    assert main(["jobs", "--database", url]) == 3
    error = capsys.readouterr().err
    assert error.startswith("lesionwatch: cannot use the database: connection failed")
    assert "Traceback" not in error and "check database.url / --database" in error


def test_reading_commands_never_create_an_empty_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LESIONWATCH_CONFIG", raising=False)
    for command in (["studies"], ["jobs"], ["status"]):
        assert main(command) == 3
        assert "no LesionWatch database at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing created under ./var


def test_allow_list_entries_that_can_never_match_are_refused(tmp_path: Path) -> None:
    from lesionwatch.config import ConfigError, load_config

    file = tmp_path / "site.yaml"
    file.write_text(
        "listener:\n  allowed_callers:\n"
        "    - {ae_title: ''}\n    - {ae_title: ABCDEFGHIJKLMNOPQ}\n"
        "    - {ae_title: PACS, host: localhost}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(file, environ={})
    messages = {p.path: p.message for p in caught.value.problems}
    assert "cannot be empty or blank" in messages["listener.allowed_callers.0.ae_title"]
    assert "at most 16 characters" in messages["listener.allowed_callers.1.ae_title"]
    assert "host names are not resolved" in messages["listener.allowed_callers.2.host"]
