from __future__ import annotations

from pathlib import Path

import pytest

from lesionwatch.config import ConfigError, load_config
from lesionwatch.config.schema import LateSeriesPolicy, SeriesClass
from lesionwatch.service.cli import main

EXAMPLE = Path(__file__).resolve().parents[3] / "config" / "lesionwatch.example.yaml"


def test_defaults_are_embedded_and_local_only() -> None:
    config = load_config(environ={})
    assert config.listener.host == "127.0.0.1"
    assert {c.host for c in config.listener.allowed_callers} == {"127.0.0.1", "::1"}
    assert config.assembly.quiet_period_s == 60
    assert config.broker.kind == "embedded"
    assert config.database_url().startswith("sqlite:///")
    assert config.pipelines.enhancing.required_series == (SeriesClass.T1_PRE, SeriesClass.T1_POST)


def test_example_file_is_valid() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.listener.allowed_callers[0].ae_title == "PACS_MAIN"
    assert config.classification.rules[0].series_class is SeriesClass.FLAIR
    assert config.assembly.late_series_policy is LateSeriesPolicy.REPROCESS_IF_REQUIRED


def test_every_error_is_reported_with_its_line(tmp_path: Path) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text(
        "listener:\n"
        "  port: 99999\n"
        "  ae_titel: X\n"
        "assembly:\n"
        "  quiet_period_s: -1\n"
        "classification:\n"
        "  rules:\n"
        "    - {name: r, series_class: FLAIRX, match: {SeriesDescription: '('}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(file, environ={})
    problems = {p.path: p for p in caught.value.problems}
    assert problems["listener.port"].source == f"{file}:2:3"
    assert "99999" in problems["listener.port"].message
    assert problems["listener.ae_titel"].source == f"{file}:3:3"
    assert "unknown setting" in problems["listener.ae_titel"].message
    assert problems["assembly.quiet_period_s"].source == f"{file}:5:3"
    assert problems["classification.rules.0.series_class"].source.startswith(f"{file}:8:")
    assert "regular expression" in problems["classification.rules.0.match"].message


def test_environment_overrides_file_and_is_named_in_errors(tmp_path: Path) -> None:
    file = tmp_path / "ok.yaml"
    file.write_text("listener:\n  port: 11112\n")
    config = load_config(
        file,
        environ={
            "LESIONWATCH_LISTENER__PORT": "2104",
            "LESIONWATCH_DATABASE__URL": "postgresql+psycopg://u:secret@db/lw",
            "LESIONWATCH_LISTENER__ALLOWED_CALLERS": "[{ae_title: PACS, host: 10.0.0.1}]",
        },
    )
    assert config.listener.port == 2104
    assert config.database_url() == "postgresql+psycopg://u:secret@db/lw"
    assert "secret" not in repr(config.database)  # secrets never printed
    assert config.listener.allowed_callers[0].ae_title == "PACS"
    with pytest.raises(ConfigError) as caught:
        load_config(file, environ={"LESIONWATCH_LISTENER__PORT": "zero"})
    assert caught.value.problems[0].source == "environment LESIONWATCH_LISTENER__PORT"


def test_command_line_overrides_win(tmp_path: Path) -> None:
    config = load_config(
        None, environ={"LESIONWATCH_LISTENER__PORT": "2104"}, overrides={"listener.port": 4242}
    )
    assert config.listener.port == 4242


def test_invalid_yaml_and_wrong_top_level(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("listener:\n  port: [1,\n")
    with pytest.raises(ConfigError) as caught:
        load_config(broken, environ={})
    assert "not valid YAML" in str(caught.value)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar, environ={})


def test_rabbitmq_needs_a_url() -> None:
    with pytest.raises(ConfigError, match="broker.url is required"):
        load_config(None, environ={"LESIONWATCH_BROKER__KIND": "rabbitmq"})


def test_config_check_command_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", str(EXAMPLE)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  min_free_disk_mb: lots\n")
    assert main(["config", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2:3: storage.min_free_disk_mb" in err


def test_worker_and_broker_settings_are_checked(tmp_path: Path) -> None:
    file = tmp_path / "site.yaml"
    file.write_text(
        "broker: {kind: rabbitmq, url: 'redis://localhost', consumer_timeout_s: 600}\n"
        "worker: {job_timeout_s: 1200, retry_initial_delay_s: 60, retry_max_delay_s: 10}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(file, environ={})
    messages = {p.path: p.message for p in caught.value.problems}
    assert "amqp:// or amqps:// URL, not redis://" in messages["broker"]
    assert "retry_max_delay_s must be at least retry_initial_delay_s" in messages["worker"]
    file.write_text(
        "broker: {kind: rabbitmq, url: 'amqp://lw@mq/%2F', consumer_timeout_s: 600}\n"
        "worker: {job_timeout_s: 1200}\n"
    )
    with pytest.raises(ConfigError, match="consumer_timeout_s must exceed worker.job_timeout_s"):
        load_config(file, environ={})


def test_broker_option_selects_rabbitmq_by_its_url(tmp_path: Path) -> None:
    import argparse

    from lesionwatch.service.cli_support import CommandError, load_from_args

    def config_for(broker: str) -> object:
        args = argparse.Namespace(config=None, database=None, broker=broker, data_dir=tmp_path)
        return load_from_args(args)

    rabbit = config_for("amqp://guest:guest@mq:5672/%2F")
    assert rabbit.broker.kind == "rabbitmq"  # type: ignore[attr-defined]
    assert config_for("embedded").broker.kind == "embedded"  # type: ignore[attr-defined]
    with pytest.raises(CommandError, match="amqp:// URL or 'embedded'"):
        config_for("redis://mq")
