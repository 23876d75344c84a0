"""Load the YAML config, apply environment overrides, validate, and explain every error.

Environment rule: ``LESIONWATCH_<SECTION>__<KEY>`` (double underscore between levels, any case)
overrides ``section.key``; the value is parsed as a YAML scalar or flow collection, so
``LESIONWATCH_LISTENER__PORT=104`` and ``LESIONWATCH_DATABASE__URL=postgresql+psycopg://...``
both work. Secrets (database and broker URLs) belong in the environment, not in the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .schema import LesionWatchConfig

__all__ = ["ConfigError", "ConfigProblem", "ENV_PREFIX", "load_config"]

ENV_PREFIX = "LESIONWATCH_"
_ENV_SEPARATOR = "__"
# Variables with this prefix that configure the process rather than the schema.
_NON_SCHEMA_ENV = {"LESIONWATCH_CONFIG", "LESIONWATCH_REQUIRE_SERVICES"}


@dataclass(frozen=True)
class ConfigProblem:
    path: str  # dotted location, e.g. "listener.port"
    message: str
    source: str  # "FILE:LINE:COL", "environment LESIONWATCH_X", or "command line"

    def __str__(self) -> str:
        return f"{self.source}: {self.path}: {self.message}"


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every error with its location."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


def _positions(
    node: yaml.Node, prefix: tuple[str, ...], out: dict[tuple[str, ...], str], file: str
) -> None:
    """Record 'file:line:col' for every mapping key and sequence item in the YAML tree."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            mark = key_node.start_mark
            out[path] = f"{file}:{mark.line + 1}:{mark.column + 1}"
            _positions(value_node, path, out, file)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = (*prefix, str(index))
            mark = item.start_mark
            out[path] = f"{file}:{mark.line + 1}:{mark.column + 1}"
            _positions(item, path, out, file)


def _read_yaml(file: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem("", f"cannot read config file: {exc.strerror}", str(file))]
        ) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        raise ConfigError(
            [ConfigProblem("", f"not valid YAML: {getattr(exc, 'problem', exc)}", where)]
        ) from exc
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigProblem("", "the top level must be a mapping of sections", f"{file}:1:1")]
        )
    positions: dict[tuple[str, ...], str] = {}
    if node is not None:
        _positions(node, (), positions, str(file))
    return data, positions


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    target = data
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = {}
            target[key] = child
        target = child
    target[path[-1]] = value


def _env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], tuple[Any, str]]:
    overrides: dict[tuple[str, ...], tuple[Any, str]] = {}
    for name, raw in environ.items():
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in _NON_SCHEMA_ENV:
            continue
        path = tuple(part.lower() for part in upper[len(ENV_PREFIX) :].split(_ENV_SEPARATOR))
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        overrides[path] = (value, f"environment {name}")
    return overrides


def load_config(
    file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LesionWatchConfig:
    """Build the effective config: schema defaults < YAML file < environment < `overrides`.

    `overrides` maps dotted paths (``"listener.port"``) to values, for command-line options.
    Raises `ConfigError` listing every problem, each with where it came from.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    if file is not None:
        data, sources = _read_yaml(file)
    for path, (value, source) in _env_overrides(environ).items():
        _set_path(data, path, value)
        sources[path] = source
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        path = tuple(dotted.split("."))
        _set_path(data, path, value)
        sources[path] = "command line"
    try:
        return LesionWatchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_problem(err, sources, file) for err in exc.errors()]) from exc


def _problem(err: Any, sources: dict[tuple[str, ...], str], file: Path | None) -> ConfigProblem:
    loc = tuple(str(part) for part in err["loc"])
    # The deepest located ancestor tells where to look (a missing key is reported at its parent).
    source = next((sources[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in sources), None)
    if source is None:
        source = str(file) if file is not None else "defaults"
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown setting (check the spelling against config/lesionwatch.example.yaml)"
    elif (
        "input" in err
        and err["type"] not in ("missing",)
        and not isinstance(err["input"], dict | list)
    ):
        message = f"{message} (got {err['input']!r})"
    return ConfigProblem(".".join(loc) or "(top level)", message, source)
