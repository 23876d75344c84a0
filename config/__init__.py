"""Configuration: pydantic schema (defaults live only there) and the YAML/environment loader."""

from .loader import ENV_PREFIX, ConfigError, ConfigProblem, load_config
from .schema import LesionWatchConfig, SeriesClass

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "ConfigProblem",
    "LesionWatchConfig",
    "SeriesClass",
    "load_config",
]
