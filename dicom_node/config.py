"""The node's one typed configuration object.

Settings come, in increasing precedence, from the embedded defaults below, a YAML file (``--config``), environment
variables (``DICOM_NODE_<SECTION>__<KEY>``, e.g. ``DICOM_NODE_NODE__PORT=11113``) and ``dicom-node serve`` flags.
Each layer of the node receives the section it needs; nothing reads configuration from globals.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dicom_node.models import registry as detector_registry

# PS3.5 6.2: AE is at most 16 characters of the Default Character Repertoire, no backslash or control characters.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class ConfigError(ValueError):
    """Invalid configuration; ``str(err)`` is one line naming the key and the problem."""


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSettings(_Section):
    """Identity and listening address of the C-STORE SCP."""

    ae_title: str = "DICOMNODE"
    bind_address: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    data_dir: Path = Path("./data")

    _ae = field_validator("ae_title")(_check_ae_title)


class AllowedPeer(_Section):
    """One entry of the calling-AE allow-list; ``host`` (an IP address) is optional."""

    ae_title: str
    host: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)


class TlsSettings(_Section):
    """Optional DICOM TLS (PS3.15 Annex B.1, the BCP 195 profile) on the SCP and the SCU."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TlsSettings:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("certificate and private_key are required when TLS is enabled")
        return self


class NetworkSettings(_Section):
    """Association policy of the SCP (PS3.7, PS3.8)."""

    check_called_ae_title: bool = True
    allowed_calling_aes: list[AllowedPeer] = Field(
        default_factory=list, description="empty = any calling AE may associate"
    )
    max_associations: int = Field(16, ge=1, description="associations at once, for the node as a whole")
    receive_processes: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1),
        ge=1,
        le=64,
        description="processes accepting associations (default: one per CPU core, at most 4); more take more "
        "simultaneous senders, each costs about 60 MiB",
    )
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(120.0, gt=0)
    network_timeout: float = Field(300.0, gt=0)
    maximum_pdu_size: int = Field(0, ge=0, description="0 = unlimited")
    tls: TlsSettings = Field(default_factory=TlsSettings)
    tls_handshake_timeout: float = Field(
        15.0, gt=0, description="seconds a TLS client has to complete the handshake before its connection is closed"
    )


class StorageSettings(_Section):
    """Spool of received instances."""

    min_free_bytes: int = Field(1_000_000_000, ge=0, description="below this, C-STORE answers 0xA700")
    max_inflated_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="a Deflated Explicit VR data set inflating past this is refused (0xC210)"
    )
    record_deadline_seconds: float = Field(
        20.0,
        gt=0,
        description="answer 0xC211 when the job database cannot record an instance within this time (keep it under "
        "the senders' DIMSE timeout)",
    )


class DatabaseSettings(_Section):
    """Job database; ``url`` None means SQLite under ``node.data_dir``."""

    url: str | None = None


class CompletionRule(_Section):
    """A study-completion rule: when a study matches, it completes once the expected series are in,
    or at ``force_complete_seconds`` after its first instance, whichever comes first."""

    name: str
    modality: str | None = None
    calling_ae_title: str | None = None
    study_description_regex: str | None = None
    expected_series_regex: list[str] = Field(default_factory=list)
    min_instances: int = Field(0, ge=0)
    force_complete_seconds: float | None = Field(None, gt=0)
    settle_seconds: float = Field(5.0, gt=0, description="quiet time once the expected series are in")


class CompletionSettings(_Section):
    quiet_seconds: float = Field(30.0, gt=0)
    check_interval_seconds: float = Field(1.0, gt=0)
    interrupted_grace_seconds: float = Field(
        300.0,
        gt=0,
        description="a study whose association ended abnormally completes by quiet time only after this long "
        "without a resend",
    )
    rules: list[CompletionRule] = Field(default_factory=list)


def _known_detector(name: str) -> str:
    """A detector name some installed detector has (models/registry.py: shipped ones and plugins)."""
    known = detector_registry.names()
    if name not in known:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(known) or 'none'}")
    return name


# A detector's name, checked against the installed detectors when the configuration is read.
DetectorName = Annotated[str, AfterValidator(_known_detector)]


class SelectionRule(_Section):
    """A series-selection rule; all given conditions must hold. ``detector`` None means ignore with ``reason``.

    Conditions compare case-insensitively. ``image_type_excludes`` drops a series when any instance's ImageType
    holds one of the values (e.g. LOCALIZER)."""

    name: str
    detector: DetectorName | None = None
    reason: str | None = None
    modality: list[str] = Field(default_factory=list)
    body_part_examined: list[str] = Field(default_factory=list)
    series_description_regex: str | None = None
    series_description_excludes_regex: str | None = None
    image_type_includes: list[str] = Field(default_factory=list)
    image_type_excludes: list[str] = Field(default_factory=list)
    view_position: list[str] = Field(default_factory=list)
    sop_class_uid: list[str] = Field(default_factory=list)
    min_instances: int = Field(0, ge=0)
    max_instances: int | None = Field(None, ge=1)
    min_rows: int = Field(0, ge=0)
    min_columns: int = Field(0, ge=0)

    @field_validator("series_description_regex", "series_description_excludes_regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"invalid regular expression: {err}") from err
        return value


def _default_selection_rules() -> list[SelectionRule]:
    """Defaults: localizers out first, then each installed detector's own rules (its ``DetectorSpec.selection``, in
    detector name order: brain MR series of real images, frontal (PA/AP) chest CR/DX), then other radiographs out."""
    rules = [
        SelectionRule(
            name="localizer",
            reason="localizer",
            image_type_includes=["LOCALIZER"],
        ),
        SelectionRule(
            name="localizer-description",
            reason="localizer",
            # Letters around the word would make another word; underscores and digits do not (AAHead_Scout_64ch).
            series_description_regex=r"(?i)(?<![a-z])(localizer|localiser|scout|survey|3-?plane|aahead)(?![a-z])",
        ),
    ]
    for spec in detector_registry.specs().values():
        rules.extend(SelectionRule.model_validate(dict(rule)) for rule in spec.selection)
    rules.append(
        SelectionRule(
            name="other-radiograph",
            reason="not a chest study",
            modality=["CR", "DX"],
        )
    )
    return rules


class SelectionSettings(_Section):
    rules: list[SelectionRule] = Field(default_factory=_default_selection_rules)


ResultKind = Literal["SEG", "SR", "PM", "SC"]


def _default_objects() -> list[ResultKind]:
    return ["SEG", "SR"]


def _default_detectors() -> dict[DetectorName, DetectorSettings]:
    return {name: DetectorSettings() for name in detector_registry.names()}


class DestinationProfile(_Section):
    """Which result objects a destination receives (IHE AIR: SEG, SR, Parametric Map, Secondary Capture)."""

    objects: list[ResultKind] = Field(default_factory=_default_objects)
    keep_empty_frames: bool = True
    storage_commitment: bool = False
    storage_commitment_timeout_seconds: float = Field(30.0, gt=0)
    storage_commitment_port: int | None = Field(
        None, ge=1, le=65535, description="where the PACS may open an association to deliver the N-EVENT-REPORT"
    )
    storage_commitment_bind_address: str = "0.0.0.0"


class Destination(_Section):
    """A PACS that receives results: DIMSE C-STORE (``ae_title``, ``host``, ``port``) or STOW-RS (``url``).

    ``kind`` names a registered destination type (``dicom_node.delivery.destinations``), which says the fields a
    destination of its kind requires."""

    name: str
    kind: str = "dimse"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    url: str | None = None
    bearer_token: str | None = None
    profile: DestinationProfile = Field(default_factory=DestinationProfile)
    max_attempts: int = Field(20, ge=1)
    backoff_initial_seconds: float = Field(2.0, gt=0)
    backoff_max_seconds: float = Field(300.0, gt=0)

    # The registry of destination types is imported when a destination is checked, not with this module: the
    # delivery package imports this one (and a type registered later, by a plug-in or a test, is known then).
    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from dicom_node.delivery.destinations.registry import known_kinds

        if value not in known_kinds():
            raise ValueError(f"unknown destination kind {value!r} (known kinds: {', '.join(known_kinds())})")
        return value

    @model_validator(mode="after")
    def _address(self) -> Destination:
        from dicom_node.delivery.destinations.registry import destination_type

        required = destination_type(self.kind).requires
        if not all(getattr(self, key) for key in required):
            names = ", ".join(required[:-1]) + " and " + required[-1] if len(required) > 1 else "".join(required)
            raise ValueError(f"a {self.kind} destination needs {names}")
        if "ae_title" in required:
            _check_ae_title(str(self.ae_title))
        return self

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AET@host:port`` as given to ``dicom-node serve --destination``."""
        match = re.fullmatch(r"([^@]{1,16})@([^:@]+):(\d{1,5})", text.strip())
        if not match:
            raise ValueError(f"{text!r} is not AET@host:port")
        ae_title, host, port = match.groups()
        try:
            return cls(name=f"{ae_title}@{host}:{port}", ae_title=ae_title, host=host, port=int(port))
        except ValidationError as err:  # one line (``port: Input should be ...``), not pydantic's report
            problem = _format_error(err).removeprefix("invalid configuration: ")
            raise ValueError(problem.removeprefix("(top level): ")) from None


class Webhook(_Section):
    """Triage: abnormal studies are POSTed as JSON to ``url``."""

    url: str
    max_attempts: int = Field(8, ge=1)
    timeout_seconds: float = Field(5.0, gt=0)


class DetectorSettings(_Section):
    """Per-detector worker settings; ``model_dir`` None means the detector's shipped weights (its package's weights/
    folder, e.g. models/brain_mri/weights)."""

    enabled: bool = True
    model_dir: Path | None = None
    soft_time_limit_seconds: float = Field(300.0, gt=0)
    time_limit_seconds: float = Field(360.0, gt=0)
    batch_size: int = Field(16, ge=1)


class BrokerSettings(_Section):
    """Celery broker; ``url`` None means the embedded broker under ``node.data_dir`` (no server needed)."""

    url: str | None = None
    result_backend: str | None = None


class UrgentRule(_Section):
    """A triage rule: jobs matching all given conditions go to the urgent lane (higher broker priority).

    Conditions compare case-insensitively; an empty list matches anything."""

    name: str
    calling_ae_title: list[str] = Field(default_factory=list)
    modality: list[str] = Field(default_factory=list)
    detector: list[str] = Field(default_factory=list)


class WorkerSettings(_Section):
    """Celery workers and the job lifecycle (docs/workers.md).

    ``embedded`` starts workers as child processes of ``dicom-node serve``. Every worker writes a heartbeat each
    ``heartbeat_seconds``; a job whose holder stopped beating (or whose pool process is gone) is back in the queue
    within ``failover_grace_seconds``, whichever worker gets the message. The lease (``lease_seconds``, renewed by
    the worker) is the last resort. A job whose message the broker no longer has (not queued there, not held by a
    live worker) is sent again within ``requeue_after_seconds`` of the broker answering."""

    embedded: bool = True
    concurrency: int = Field(1, ge=1)
    device: str = "auto"
    lease_seconds: float = Field(600.0, gt=0)
    heartbeat_seconds: float = Field(5.0, gt=0)
    failover_grace_seconds: float = Field(30.0, gt=0)
    sweep_interval_seconds: float = Field(5.0, gt=0)
    requeue_after_seconds: float = Field(60.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    retry_backoff_seconds: float = Field(5.0, gt=0)
    retry_backoff_max_seconds: float = Field(300.0, gt=0)
    urgent_rules: list[UrgentRule] = Field(default_factory=list)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not a device (auto, cpu, cuda or cuda:N)")
        return value


class HttpSettings(_Section):
    """Admin REST API, web page and /metrics; port 0 disables."""

    bind_address: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    read_tokens: list[str] = Field(default_factory=list)
    admin_tokens: list[str] = Field(default_factory=list)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False


class Settings(BaseSettings):
    """Everything the node is configured with."""

    model_config = SettingsConfigDict(
        env_prefix="DICOM_NODE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    node: NodeSettings = Field(default_factory=NodeSettings)
    network: NetworkSettings = Field(default_factory=NetworkSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    destinations: list[Destination] = Field(default_factory=list)
    webhooks: list[Webhook] = Field(default_factory=list)
    detectors: dict[DetectorName, DetectorSettings] = Field(default_factory=_default_detectors)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment overrides the YAML file, which arrives as init arguments.
        return (env_settings, init_settings)

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.node.data_dir / 'jobs.sqlite').resolve()}"

    @property
    def spool_dir(self) -> Path:
        return self.node.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.node.data_dir / "results"

    def detector(self, name: str) -> DetectorSettings:
        return self.detectors.get(name, DetectorSettings())  # type: ignore[call-overload]


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    more = len(err.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"invalid configuration: {key}: {message}{suffix}"


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings from an optional YAML file plus overrides (e.g. from CLI flags).

    Raises ConfigError with one line naming the key and the problem.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ConfigError(f"invalid configuration: {path}: file not found") from err
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"invalid configuration: {path}{where}: not valid YAML") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"invalid configuration: {path}: the top level must be a mapping")
        data = loaded
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return Settings(**data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from err
