"""The LesionWatch configuration schema: the only place where defaults live.

Every model is frozen and forbids unknown keys, so a typo in the YAML file is an error with
its location rather than a silently ignored setting.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = [
    "AllowedCaller",
    "AssemblyConfig",
    "BrokerConfig",
    "ClassificationConfig",
    "ClassificationRule",
    "DatabaseConfig",
    "InferenceConfig",
    "LateSeriesPolicy",
    "ListenerConfig",
    "LesionWatchConfig",
    "PipelineConfig",
    "PipelinesConfig",
    "SeriesClass",
    "StorageConfig",
    "TlsConfig",
]

AeTitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]*[^ ][\x20-\x5b\x5d-\x7e]*$")]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SeriesClass(enum.StrEnum):
    """What an MS protocol series is, as far as the pipelines care."""

    FLAIR = "FLAIR"
    T1_PRE = "T1_PRE"
    T1_POST = "T1_POST"
    T2 = "T2"
    OTHER = "OTHER"


class LateSeriesPolicy(enum.StrEnum):
    """What to do with series that arrive after a study was already processed."""

    IGNORE = "ignore"  # store them, record them, run nothing
    REPROCESS = "reprocess"  # once quiet again, create new jobs for every enabled pipeline
    REPROCESS_IF_REQUIRED = "reprocess_if_required"  # only if a late series is one a pipeline needs


class TlsConfig(_Section):
    """TLS for the DICOM listener (DICOM PS3.15 B.1 / port 2762 is customary)."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = Field(None, description="CA bundle used to verify client certificates")
    require_client_cert: bool = False


class AllowedCaller(_Section):
    """One allow-list entry: a calling AE title, optionally pinned to a source IP address."""

    ae_title: str = Field(description="Calling AE title, or '*' for any")
    host: str | None = Field(None, description="Source IP address the AE must connect from")


class ListenerConfig(_Section):
    ae_title: AeTitle = "LESIONWATCH"
    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 to listen on every interface")
    port: int = Field(11112, ge=1, le=65535)
    require_called_ae_title: bool = True
    allowed_callers: tuple[AllowedCaller, ...] = Field(
        (AllowedCaller(ae_title="*", host="127.0.0.1"), AllowedCaller(ae_title="*", host="::1")),
        description="Associations from anyone else are rejected; the default admits only this machine",
    )
    max_associations: int = Field(10, ge=1, le=200)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    maximum_pdu_size: int = Field(0, ge=0, description="0 means unlimited")
    tls: TlsConfig | None = None


class StorageConfig(_Section):
    data_dir: Path = Field(Path("var"), description="Archive, embedded database and work files live here")
    min_free_disk_mb: int = Field(2048, ge=0, description="Refuse new instances below this much free space")
    fsync: bool = Field(True, description="fsync files and directories before acknowledging a C-STORE")


class DatabaseConfig(_Section):
    url: SecretStr | None = Field(
        None, description="SQLAlchemy URL; default is SQLite (WAL) inside storage.data_dir"
    )
    pool_size: int = Field(5, ge=1)
    echo: bool = False


class AssemblyConfig(_Section):
    quiet_period_s: float = Field(60.0, gt=0, description="A study is stable after this long without new instances")
    deadline_s: float = Field(900.0, gt=0, description="Force a decision this long after the first instance")
    poll_interval_s: float = Field(5.0, gt=0)
    late_series_policy: LateSeriesPolicy = LateSeriesPolicy.REPROCESS_IF_REQUIRED

    @model_validator(mode="after")
    def _deadline_after_quiet(self) -> AssemblyConfig:
        if self.deadline_s < self.quiet_period_s:
            raise ValueError("deadline_s must be at least quiet_period_s")
        return self


class ClassificationRule(_Section):
    """An admin rule: when every pattern matches, the series gets `series_class`.

    Patterns are case-insensitive regular expressions searched in the named DICOM attribute
    (keyword, e.g. SeriesDescription, ProtocolName, SequenceName, ScanningSequence, ImageType).
    Admin rules are tried in order before the built-in rules.
    """

    name: str
    series_class: SeriesClass
    match: dict[str, str] = Field(min_length=1)

    @field_validator("match")
    @classmethod
    def _patterns_compile(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        for keyword, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern for {keyword!r} is not a valid regular expression: {exc}") from exc
        return value


class ClassificationConfig(_Section):
    rules: tuple[ClassificationRule, ...] = ()
    use_builtin_rules: bool = True


class PipelineConfig(_Section):
    enabled: bool = True
    weights: Path | None = Field(None, description="Weight file; default is the shipped model")
    min_lesion_volume_mm3: float = Field(3.0, ge=0)
    threshold: float = Field(0.5, gt=0, lt=1)


class PipelinesConfig(_Section):
    flair: PipelineConfig = PipelineConfig()
    new_lesions: PipelineConfig = PipelineConfig()
    enhancing: PipelineConfig = PipelineConfig()


class InferenceConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int = Field(0, ge=0, description="0 lets torch decide")
    patch_size_mm: int = Field(96, ge=16)
    step_mm: int = Field(32, ge=4)
    gaussian_weighting: bool = False
    batch_size: int = Field(2, ge=1)
    mixed_precision: bool = Field(True, description="Used only on CUDA")


class BrokerConfig(_Section):
    kind: Literal["embedded", "rabbitmq"] = "embedded"
    url: SecretStr | None = Field(None, description="amqp:// URL when kind is rabbitmq")

    @model_validator(mode="after")
    def _url_for_rabbitmq(self) -> BrokerConfig:
        if self.kind == "rabbitmq" and self.url is None:
            raise ValueError("broker.url is required when broker.kind is rabbitmq")
        return self


class LesionWatchConfig(_Section):
    listener: ListenerConfig = ListenerConfig()
    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()
    assembly: AssemblyConfig = AssemblyConfig()
    classification: ClassificationConfig = ClassificationConfig()
    pipelines: PipelinesConfig = PipelinesConfig()
    inference: InferenceConfig = InferenceConfig()
    broker: BrokerConfig = BrokerConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def database_url(self) -> str:
        """The effective SQLAlchemy URL (SQLite inside the data dir unless one is configured)."""
        if self.database.url is not None:
            return self.database.url.get_secret_value()
        return f"sqlite:///{(self.storage.data_dir / 'lesionwatch.db').resolve()}"
