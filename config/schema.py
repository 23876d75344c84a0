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
    "DestinationConfig",
    "DeliveryConfig",
    "ClientTlsConfig",
    "AllowedCaller",
    "AssemblyConfig",
    "BrokerConfig",
    "ClassificationConfig",
    "ClassificationRule",
    "DatabaseConfig",
    "EnhancingPipelineConfig",
    "InferenceConfig",
    "LateSeriesPolicy",
    "ListenerConfig",
    "LesionWatchConfig",
    "MetricsConfig",
    "PriorityConfig",
    "WorkerConfig",
    "NewLesionsPipelineConfig",
    "PipelineConfig",
    "PipelinesConfig",
    "PriorSearchConfig",
    "QueryPacsConfig",
    "ResultsConfig",
    "RetrieveMethod",
    "SegEncoding",
    "SeriesClass",
    "StorageConfig",
    "TlsConfig",
]

AeTitle = Annotated[
    str,
    Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]*[^ ][\x20-\x5b\x5d-\x7e]*$"),
]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SeriesClass(enum.StrEnum):
    """What an MS protocol series is, as far as the pipelines care."""

    FLAIR = "FLAIR"
    T1_PRE = "T1_PRE"
    T1_POST = "T1_POST"
    T2 = "T2"
    OTHER = "OTHER"


class SegEncoding(enum.StrEnum):
    """How the DICOM Segmentation stores its masks (README, "Viewers checked").

    Both are the same Segmentation Storage object with the same geometry and segments;
    they differ only in the pixel encoding, which decides which viewers draw it.
    """

    FRACTIONAL = "fractional"  # 8 bits a pixel, 0 or 255 (MaximumFractionalValue 255)
    BINARY = "binary"  # 1 bit a pixel, frames packed back to back: 8x smaller


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

    @field_validator("ae_title")
    @classmethod
    def _ae_title_can_match(cls, value: str) -> str:
        # An entry that no association can ever match would silently admit nobody.
        if value == "*":
            return value
        if not value.strip():
            raise ValueError("an AE title cannot be empty or blank (use '*' for any AE title)")
        if len(value.strip()) > 16:
            raise ValueError(f"AE titles have at most 16 characters; {value!r} has {len(value)}")
        if "\\" in value or any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
            raise ValueError(f"{value!r} has characters an AE title cannot hold")
        return value

    @field_validator("host")
    @classmethod
    def _host_is_an_address(cls, value: str | None) -> str | None:
        import ipaddress

        if value is None:
            return value
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP address: callers are matched by the address they "
                "connect from, and host names are not resolved (use e.g. 127.0.0.1 or ::1)"
            ) from None


class ListenerConfig(_Section):
    ae_title: AeTitle = "LESIONWATCH"
    host: str = Field(
        "127.0.0.1", description="Address to bind; 0.0.0.0 to listen on every interface"
    )
    port: int = Field(11112, ge=1, le=65535)
    require_called_ae_title: bool = True
    allowed_callers: tuple[AllowedCaller, ...] = Field(
        (AllowedCaller(ae_title="*", host="127.0.0.1"), AllowedCaller(ae_title="*", host="::1")),
        description="Anyone else is rejected; the default admits only this machine",
    )
    max_associations: int = Field(10, ge=1, le=200)
    max_instance_mb: int = Field(
        1024,
        ge=1,
        description="Largest data set accepted, after inflation of a deflated transfer "
        "syntax; larger ones are refused with 0xA700 (received data sets stream to disk)",
    )
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    maximum_pdu_size: int = Field(
        1_048_576,
        ge=4096,
        le=64 * 1_048_576,
        description="Largest P-DATA PDU the listener accepts (advertised to senders); a "
        "larger one aborts the association. pynetdicom holds one whole PDU in memory",
    )
    tls: TlsConfig | None = None


class StorageConfig(_Section):
    data_dir: Path = Field(
        Path("var"), description="Archive, embedded database and work files live here"
    )
    min_free_disk_mb: int = Field(
        2048, ge=0, description="Refuse new instances below this much free space"
    )
    fsync: bool = Field(
        True, description="fsync files and directories before acknowledging a C-STORE"
    )


class DatabaseConfig(_Section):
    url: SecretStr | None = Field(
        None, description="SQLAlchemy URL; default is SQLite (WAL) inside storage.data_dir"
    )
    pool_size: int = Field(5, ge=1)
    echo: bool = False


class AssemblyConfig(_Section):
    quiet_period_s: float = Field(
        60.0, gt=0, description="A study is stable after this long without new instances"
    )
    deadline_s: float = Field(
        900.0, gt=0, description="Force a decision this long after the first instance"
    )
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

        from pydicom.datadict import tag_for_keyword

        for keyword, pattern in value.items():
            # A misspelt keyword would silently never match; say so when the config is loaded.
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"{keyword!r} is not a DICOM keyword (e.g. SeriesDescription)")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"pattern for {keyword!r} is not a valid regular expression: {exc}"
                ) from exc
        return value


class ClassificationConfig(_Section):
    rules: tuple[ClassificationRule, ...] = ()
    use_builtin_rules: bool = True


QueueName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class PipelineConfig(_Section):
    enabled: bool = True
    required_series: tuple[SeriesClass, ...] = Field(
        (SeriesClass.FLAIR,), min_length=1, description="Series classes the study must contain"
    )
    queue: QueueName = Field(
        "jobs", description="Queue that carries this pipeline's jobs (`lesionwatch work --queue`)"
    )
    weights: Path | None = Field(None, description="Weight file; default is the shipped model")
    min_lesion_volume_mm3: float = Field(3.0, ge=0)
    threshold: float = Field(0.5, gt=0, lt=1)


class NewLesionsPipelineConfig(PipelineConfig):
    prior_required_series: tuple[SeriesClass, ...] = Field(
        (SeriesClass.FLAIR,), description="Series classes the prior study must contain"
    )
    registration: Literal["rigid", "affine", "syn"] = Field(
        "affine",
        description="Prior FLAIR -> current FLAIR registration; syn (deformable) adds about "
        "a minute per brain on CPU",
    )
    method: Literal["subtraction", "tracking", "confirmed", "tracking_confirmed"] = Field(
        "confirmed",
        description="How new lesions are found: 'subtraction' (the new-lesion U-Net on prior, "
        "current and their difference), 'tracking' (FLAIR lesions of the current study that "
        "touch no FLAIR lesion of the registered prior), 'confirmed' (subtraction candidates "
        "that lie in a current FLAIR lesion), 'tracking_confirmed' (tracked new FLAIR lesions "
        "that a subtraction candidate touches). 'confirmed' scored the best lesion-wise F1 on "
        "the real longitudinal pairs (models/weights/new_lesions.RESULTS.md)",
    )
    min_registration_similarity: float = Field(
        0.6,
        ge=-1,
        le=1,
        description="Correlation of the registered prior FLAIR with the current FLAIR inside "
        "the brain below which the comparison is reported as unreliable (no counts)",
    )
    enlarging_relative: float = Field(
        0.5,
        gt=0,
        description="A tracked lesion is enlarging when it grew by this fraction of its prior "
        "volume (0.5 = +50 %) and by enlarging_absolute_ml; shrinking by the same rules",
    )
    enlarging_absolute_ml: float = Field(
        0.01, ge=0, description="Smallest volume change (mL) that counts as enlarging/shrinking"
    )
    match_margin_mm: float = Field(
        1.0,
        ge=0,
        le=10,
        description="A current lesion continues a prior lesion it touches within this margin",
    )
    new_max_prior_probability: float = Field(
        1.0,
        gt=0,
        le=1,
        description="A lesion is new only if the FLAIR model's probability on the registered "
        "prior stays below this within the margin (1.0: off)",
    )
    new_min_difference_sd: float | None = Field(
        None,
        description="A lesion is new only if its mean current-minus-prior FLAIR (z-scored in "
        "the brain) is at least this many SD (null: off)",
    )


class EnhancingPipelineConfig(PipelineConfig):
    """The enhancing pipeline and its plausibility guard (pipelines/enhancing_guard.py)."""

    require_flair_lesion: bool = Field(
        True,
        description="Keep only candidates that touch a lesion the FLAIR model finds in the "
        "same study (when the study has a FLAIR series); enhancing MS lesions are FLAIR lesions",
    )
    flair_margin_mm: float = Field(
        2.0, ge=0, le=10, description="FLAIR lesions are grown this much (motion between series)"
    )
    flair_overlap_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Share of a candidate that must lie in the (grown) FLAIR lesions",
    )
    guard_min_volume_mm3: float = Field(
        10.0, ge=0, description="Smaller candidates are removed (counted in the report)"
    )
    surface_margin_mm: float = Field(
        3.0,
        ge=0,
        le=20,
        description="Candidates lying mostly this close to the brain's edge (dura, surface "
        "vessels, sinuses) are removed",
    )


class PipelinesConfig(_Section):
    """The three MS pipelines. Names here are the pipeline names used in jobs and messages."""

    flair: PipelineConfig = PipelineConfig()
    new_lesions: NewLesionsPipelineConfig = NewLesionsPipelineConfig()
    enhancing: EnhancingPipelineConfig = EnhancingPipelineConfig(
        required_series=(SeriesClass.T1_PRE, SeriesClass.T1_POST)
    )

    def enabled(self) -> dict[str, PipelineConfig]:
        """Enabled pipelines by name, in a stable order."""
        return {
            name: getattr(self, name)
            for name in ("flair", "new_lesions", "enhancing")
            if getattr(self, name).enabled
        }


class InferenceConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int = Field(0, ge=0, description="0 lets torch decide")
    # The shipped models were measured with this window (they train on 64 mm patches; a fully
    # convolutional net takes a larger window at inference) at half overlap: ~8x fewer
    # network evaluations than 96/32, which matters on CPU.
    patch_size_mm: int = Field(128, ge=16, description="sliding window edge in mm")
    step_mm: int = Field(64, ge=4, description="stride between windows in mm")
    gaussian_weighting: bool = False
    batch_size: int = Field(2, ge=1)
    mixed_precision: bool = Field(True, description="Used only on CUDA")


class BrokerConfig(_Section):
    """Where job and delivery messages travel: the embedded queue in the project's database
    (one machine) or RabbitMQ (many machines)."""

    kind: Literal["embedded", "rabbitmq"] = "embedded"
    url: SecretStr | None = Field(None, description="amqp:// URL when kind is rabbitmq")
    queue_prefix: str = Field(
        "lesionwatch",
        min_length=1,
        max_length=32,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Prefix of every queue and exchange name (RabbitMQ) or queue label",
    )
    quorum_queues: bool = Field(
        False,
        description="RabbitMQ quorum queues (replicated). RabbitMQ before 4.0 has no priorities "
        "on quorum queues, so urgent studies are not served first with this on",
    )
    heartbeat_s: int = Field(60, ge=0, le=600, description="AMQP heartbeat; 0 disables")
    consumer_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Per-queue delivery acknowledgement timeout (RabbitMQ 3.12 and newer); "
        "must exceed worker.job_timeout_s",
    )
    connect_timeout_s: float = Field(10.0, gt=0)
    poll_interval_s: float = Field(
        1.0, gt=0, description="Embedded queue: longest wait between looks for new messages"
    )

    @model_validator(mode="after")
    def _url_for_rabbitmq(self) -> BrokerConfig:
        if self.kind == "rabbitmq" and self.url is None:
            raise ValueError("broker.url is required when broker.kind is rabbitmq")
        if self.url is not None:
            scheme = self.url.get_secret_value().split(":", 1)[0].lower()
            if scheme not in ("amqp", "amqps"):
                raise ValueError(f"broker.url must be an amqp:// or amqps:// URL, not {scheme}://")
        return self


class WorkerConfig(_Section):
    """The processes that run jobs: how many, what they take, and when they give up."""

    concurrency: int = Field(
        1, ge=1, le=64, description="Worker processes `lesionwatch serve` / `work` start"
    )
    queues: tuple[QueueName, ...] = Field(
        ("jobs",), min_length=1, description="Queues a worker takes jobs from by default"
    )
    report_queue: QueueName = Field(
        "jobs",
        description="Queue of the study report jobs (light, no GPU): the SR that gathers every "
        "pipeline's result of a study",
    )
    job_timeout_s: float = Field(
        1200.0, gt=0, description="A job running longer is stopped and counts as a failed attempt"
    )
    max_attempts: int = Field(
        3, ge=1, le=100, description="Attempts (first run included) before a job is dead-lettered"
    )
    retry_initial_delay_s: float = Field(30.0, ge=0)
    retry_backoff_factor: float = Field(4.0, ge=1)
    retry_max_delay_s: float = Field(1800.0, ge=0)
    lease_s: float = Field(
        60.0,
        ge=3,
        description="A running job's claim; renewed every lease_s/3, taken over by another "
        "worker when its holder stops renewing it (crash, power loss)",
    )
    shutdown_grace_s: float = Field(
        60.0,
        ge=0,
        description="On SIGTERM, how long the current job may run on before it is requeued",
    )

    @model_validator(mode="after")
    def _delays_ordered(self) -> WorkerConfig:
        if self.retry_max_delay_s < self.retry_initial_delay_s:
            raise ValueError("retry_max_delay_s must be at least retry_initial_delay_s")
        return self


class PriorityConfig(_Section):
    """Which studies jump the queue (RabbitMQ message priority / embedded queue order)."""

    urgent_calling_ae_titles: tuple[str, ...] = Field(
        (), description="Studies sent by these AE titles (e.g. the emergency scanner) are urgent"
    )
    urgent_procedure_priorities: tuple[str, ...] = Field(
        ("STAT", "HIGH"),
        description="Requested Procedure Priority (0040,1003) values that make a study urgent",
    )


class MetricsConfig(_Section):
    """Prometheus metrics at /metrics and a health check at /healthz."""

    enabled: bool = True
    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 for a remote scraper")
    port: int = Field(9464, ge=0, le=65535, description="0 picks a free port (logged at start)")


class ClientTlsConfig(_Section):
    """TLS for outgoing associations (LesionWatch as the client of a PACS)."""

    ca_file: Path | None = Field(
        None, description="CA bundle that signed the PACS certificate; default: system CAs"
    )
    cert_file: Path | None = Field(
        None, description="Client certificate, when the PACS requires one"
    )
    key_file: Path | None = Field(None, description="Private key of cert_file")
    check_hostname: bool = Field(True, description="Verify that the PACS certificate names `host`")

    @model_validator(mode="after")
    def _key_with_cert(self) -> ClientTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class DestinationConfig(_Section):
    """One DICOM node that receives results (SEG, SR, fallback images) by C-STORE."""

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Short name used in the database, logs and `send-test`",
    )
    ae_title: AeTitle = Field(description="Called AE title of the destination")
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AeTitle = Field(
        "LESIONWATCH", description="Our AE title, as the destination knows it"
    )
    tls: ClientTlsConfig | None = None
    timeout_s: float = Field(
        30.0, gt=0, description="Connect, association, DIMSE and network timeout"
    )
    enabled: bool = True


class DeliveryConfig(_Section):
    """Retry policy for sending results: exponential backoff for transient failures only."""

    max_attempts: int = Field(
        12, ge=1, description="Transient failures after which a delivery gives up"
    )
    initial_backoff_s: float = Field(30.0, gt=0)
    max_backoff_s: float = Field(3600.0, gt=0)
    backoff_factor: float = Field(2.0, ge=1)
    poll_interval_s: float = Field(
        5.0, gt=0, description="How often the dispatcher looks for due deliveries"
    )
    batch_size: int = Field(200, ge=1, description="Most instances sent over one association")

    @model_validator(mode="after")
    def _cap_above_start(self) -> DeliveryConfig:
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must be at least initial_backoff_s")
        return self


class ResultsConfig(_Section):
    """Which result objects a job produces, and how they name their creator."""

    seg: bool = Field(True, description="DICOM Segmentation with the lesion masks")
    seg_encoding: SegEncoding = Field(
        SegEncoding.FRACTIONAL,
        description=(
            "SEG pixel encoding: 'fractional' (8-bit, drawn by OHIF and 3D Slicer) or "
            "'binary' (1-bit, 8x smaller, but OHIF 3.13 cannot draw it; see README)"
        ),
    )
    sr: bool = Field(True, description="DICOM SR TID 1500 measurement report (references the SEG)")
    secondary_capture: bool = Field(
        True, description="Outlines burned onto source slices, for PACS that cannot show SEG"
    )
    secondary_capture_all_slices: bool = Field(
        False, description="Render every slice instead of only slices that show a lesion"
    )
    json_export: bool = Field(True, description="JSON file with the same numbers as the SR")
    manufacturer: str = Field("LesionWatch", min_length=1, max_length=64)
    model_name: str = Field("LesionWatch", min_length=1, max_length=64)
    uid_prefix: str | None = Field(
        None,
        max_length=40,
        pattern=r"^[1-9][0-9]*(\.(0|[1-9][0-9]*))*\.$",
        description="Organisation UID root (ending in '.') for result UIDs; pydicom's when unset",
    )
    series_number_base: int = Field(9000, ge=1, le=2**31 - 1000)

    @model_validator(mode="after")
    def _sr_needs_seg(self) -> ResultsConfig:
        if self.sr and not self.seg:
            raise ValueError("results.sr needs results.seg: the report references SEG segments")
        return self


class RetrieveMethod(enum.StrEnum):
    """How a prior series is fetched from the query PACS."""

    MOVE = "move"  # C-MOVE to LesionWatch's own listener (the PACS must know its AE title)
    GET = "get"  # C-GET over the query association (no inbound connection needed)


class QueryPacsConfig(_Section):
    """The PACS asked for a patient's prior exam (C-FIND, then C-MOVE or C-GET)."""

    ae_title: AeTitle = Field(description="Called AE title of the PACS")
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AeTitle | None = Field(
        None, description="Our AE title as the PACS knows it; default: listener.ae_title"
    )
    move_destination: AeTitle | None = Field(
        None,
        description="C-MOVE destination AE title (the PACS must map it to our listener's host "
        "and port); default: listener.ae_title",
    )
    retrieve_method: RetrieveMethod = RetrieveMethod.MOVE
    tls: ClientTlsConfig | None = None
    timeout_s: float = Field(
        30.0, gt=0, description="Connect, association, DIMSE and network timeout of a query"
    )
    retrieve_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for one series' C-MOVE/C-GET to finish"
    )


class PriorSearchConfig(_Section):
    """Finding a patient's prior exam when a new study starts to arrive (README, "Priors").

    Off until `pacs` is set: then the local archive is searched first, the PACS next; the
    current study waits for the search at most `deadline_s` after its first image.
    """

    pacs: QueryPacsConfig | None = Field(
        None, description="The PACS to query; unset: only priors LesionWatch received itself"
    )
    lookback_days: int = Field(
        1825, ge=1, le=36500, description="Oldest prior considered, in days before the study"
    )
    deadline_s: float = Field(
        300.0,
        gt=0,
        description="The study is processed without a prior if the search has not ended this "
        "long after its first image (the SR then says no prior could be retrieved)",
    )
    max_attempts: int = Field(
        3, ge=1, le=20, description="Attempts (first included) after a failed query or retrieve"
    )
    retry_initial_delay_s: float = Field(10.0, ge=0)
    retry_backoff_factor: float = Field(2.0, ge=1)
    poll_interval_s: float = Field(2.0, gt=0, description="Longest wait between looks for work")
    match_issuer_of_patient_id: bool = Field(
        False,
        description="Also require the same IssuerOfPatientID (sites with several ID domains)",
    )
    accession_link_attribute: str | None = Field(
        None,
        description="DICOM keyword of a current-study attribute holding the prior's "
        "AccessionNumber (a site's order link); that study is then preferred",
    )
    accession_link_required: bool = Field(
        False, description="Use only the linked study as the prior, never the most recent one"
    )

    @field_validator("accession_link_attribute")
    @classmethod
    def _keyword_exists(cls, value: str | None) -> str | None:
        from pydicom.datadict import dictionary_VR, tag_for_keyword

        if value is None:
            return value
        tag = tag_for_keyword(value)
        if tag is None:
            raise ValueError(f"{value!r} is not a DICOM keyword (e.g. OtherStudyNumbers)")
        if dictionary_VR(tag) == "SQ":
            raise ValueError(f"{value!r} is a sequence; name an attribute that holds text")
        return value

    @model_validator(mode="after")
    def _link_needs_attribute(self) -> PriorSearchConfig:
        if self.accession_link_required and self.accession_link_attribute is None:
            raise ValueError("accession_link_required needs accession_link_attribute")
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
    worker: WorkerConfig = WorkerConfig()
    priority: PriorityConfig = PriorityConfig()
    metrics: MetricsConfig = MetricsConfig()
    destinations: tuple[DestinationConfig, ...] = ()
    delivery: DeliveryConfig = DeliveryConfig()
    results: ResultsConfig = ResultsConfig()
    prior_search: PriorSearchConfig = PriorSearchConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("destinations")
    @classmethod
    def _unique_destination_names(
        cls, value: tuple[DestinationConfig, ...]
    ) -> tuple[DestinationConfig, ...]:
        names = [destination.name for destination in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            repeated = ", ".join(duplicates)
            raise ValueError(f"destination names must be unique; repeated: {repeated}")
        return value

    @model_validator(mode="after")
    def _timeouts_fit(self) -> LesionWatchConfig:
        if self.broker.kind == "rabbitmq" and (
            self.broker.consumer_timeout_s <= self.worker.job_timeout_s
        ):
            raise ValueError(
                "broker.consumer_timeout_s must exceed worker.job_timeout_s, or RabbitMQ "
                "closes the channel of a worker still running a long job"
            )
        return self

    def database_url(self) -> str:
        """The effective SQLAlchemy URL (SQLite inside the data dir unless one is configured)."""
        if self.database.url is not None:
            return self.database.url.get_secret_value()
        return f"sqlite:///{(self.storage.data_dir / 'lesionwatch.db').resolve()}"
