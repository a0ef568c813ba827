"""One typed settings object for the whole node (pydantic-settings).

Precedence, lowest first: embedded defaults < TOML file < environment (``CXR_LENS_<SECTION>__<KEY>``) < CLI.
The embedded defaults are the values documented in ``config/cxr-lens.toml`` (a test keeps the two equal), so
the node runs with no file at all. Invalid configuration raises :class:`ConfigError` naming the key, before any
port opens.
"""

from __future__ import annotations

import contextvars
import ipaddress
import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    IPvAnyNetwork,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dicom_node.errors import ConfigError
from dicom_node.tls import TLSFileError, client_context, server_context

DEMO_MODEL = "builtin:demo"
TEST_MODEL = "builtin:shortcut"  # the shortcut TEST model, made to look at a burned-in marker (never a default)
ENV_PREFIX = "CXR_LENS_"

_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("cxr_lens_toml", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Section):
    path: str = DEMO_MODEL
    id: str = "cxr-lens-demo-cnn"
    version: str = "1.0.0"
    labels: tuple[str, ...] = ("no_finding", "focal_opacity")
    input_size: tuple[int, int] = (256, 256)
    channels: Literal[1, 3] = 1
    preprocess: Literal["unit", "symmetric"] = "unit"
    target_layer: str = "auto"
    # The Keras backend that runs the model (fixed per process); auto: KERAS_BACKEND where set, else tensorflow.
    backend: Literal["auto", "tensorflow", "jax"] = "auto"

    @property
    def is_demo(self) -> bool:
        return self.path == DEMO_MODEL

    @property
    def is_test_model(self) -> bool:
        return self.path == TEST_MODEL

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) < 2:
            raise ValueError("at least two labels are needed")
        if len(set(v)) != len(v):
            raise ValueError("labels must be unique")
        return v

    @field_validator("input_size")
    @classmethod
    def _input_size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 16 or max(v) > 2048:
            raise ValueError("each side must lie in 16..2048")
        return v


class ExplainSettings(_Section):
    method: Literal["gradcam", "gradcam-guided", "gradcam++", "hirescam", "layercam"] = "gradcam"
    colormap: Literal["inferno", "turbo", "magma", "viridis", "jet"] = "inferno"
    alpha: float = Field(0.45, ge=0.0, le=1.0)
    # A raw map whose maximum is below this is reported as "no evidence" instead of being stretched.
    no_evidence_threshold: float = Field(1e-6, ge=0.0)


class TrustSettings(_Section):
    """Explanation trust: where each heatmap's evidence lies (anatomy regions) and when to raise the alarm.

    The thresholds are ``explain.trust.TrustThresholds``' fields and defaults (a test keeps them equal).
    """

    enabled: bool = True
    border_fraction: float = Field(0.05, ge=0.0, lt=0.5)  # width of the border band, fraction of the short side
    max_marker_share: float = Field(0.05, ge=0.0, le=1.0)
    max_border_share: float = Field(0.4, ge=0.0, le=1.0)
    min_lung_share: float = Field(0.1, ge=0.0, le=1.0)


class LabelCode(_Section):
    """The coded concept for a model label in the Structured Report (PS3.3 Table 8.8-1: value, scheme, meaning)."""

    value: str = Field(min_length=1, max_length=64)  # SH, or Long Code Value beyond 16 characters
    scheme: str = Field(min_length=1, max_length=16)  # e.g. SCT (SNOMED CT) or a private "99..." scheme
    meaning: str = Field(min_length=1, max_length=64)  # LO

    @model_validator(mode="after")
    def _sctid(self) -> LabelCode:
        if self.scheme == "SCT" and not self.value.isdigit():
            raise ValueError("a SNOMED CT (SCT) code value is a number (an SCTID)")
        return self


# The demo model's classes are synthetic phantoms, not clinical findings: private codes, equal to the SR
# builder's DEMO_LABEL_CODES (a test keeps them equal).
_DEMO_LABEL_CODES = {
    "no_finding": LabelCode(value="no_finding", scheme="99CXRL", meaning="No finding (model class)"),
    "focal_opacity": LabelCode(value="focal_opacity", scheme="99CXRL", meaning="Focal opacity (model class)"),
}


class OutputsSettings(_Section):
    """Which DICOM objects each processed image yields (besides the ORU), and the SR's codes for the labels."""

    secondary_capture: bool = True
    structured_report: bool = True
    parametric_map: bool = True
    # The Parametric Map's grid: the source's own grid coarsened by the smallest whole factor that brings its longer
    # side to at most this many pixels (each map pixel a block of f x f source pixels); 0: the source's grid. A class
    # activation map holds no more detail than the model's last convolution; on the source's grid a 2,000 px
    # radiograph's map is a 7 MB object (outputs/parametric_map.py).
    parametric_map_max_long_side: int = Field(512, ge=0, le=65_535)
    # Label -> code for the SR's finding and probabilities; a label without one gets a private 99CXRL code.
    label_codes: dict[str, LabelCode] = Field(default_factory=lambda: dict(_DEMO_LABEL_CODES))


class PixelSettings(_Section):
    max_pixels: int = Field(64_000_000, ge=1)
    overlay_max_long_side: int = Field(512, ge=64, le=8192)
    reduced_decode: bool = True


class WorkerSettings(_Section):
    batch_size: int = Field(16, ge=1, le=256)
    batch_wait_ms: int = Field(50, ge=0, le=60_000)
    # false: the same worker with one thread per stage and no batch claimed ahead of the model (decode_threads
    # and output_threads are then ignored); for debugging and for measuring the stages one at a time.
    pipelined: bool = True
    decode_threads: int = Field(2, ge=1, le=64)
    output_threads: int = Field(2, ge=1, le=64)
    # 0: one process (decode and output threads as above). N: receiving and sending stay in the node's process,
    # the model runs in a child process, and N more decode, render and build outputs (process/processes.py).
    # "auto" (the default): the cores this process may use (CPU affinity, a container's CPU quota) less two, at
    # least one. 0 (one process) suits tests and small sites.
    processes: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = "auto"
    # Trace the model pass for every batch-size bucket up to batch_size at start, before the first job (seconds
    # for InceptionV3), instead of stalling the first partial batch of each size under load.
    warm_up: bool = True


class ServerTLSSettings(_Section):
    """TLS for a listening port; ``enabled`` needs ``cert_file`` and ``key_file`` (PEM)."""

    enabled: bool = False
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    ca_file: FilePath | None = None  # client certificates are verified against it when presented
    require_client_cert: bool = False  # mutual TLS: refuse clients without a certificate from ca_file
    handshake_timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _files(self) -> ServerTLSSettings:
        if self.enabled:
            if self.cert_file is None or self.key_file is None:
                raise ValueError("cert_file and key_file are required when enabled")
            try:
                self.context()
            except TLSFileError as exc:
                raise ValueError(str(exc)) from None
        return self

    def context(self) -> ssl.SSLContext:
        if self.cert_file is None or self.key_file is None:
            raise TLSFileError("cert_file", "", "not set")
        return server_context(
            self.cert_file, self.key_file, ca_file=self.ca_file, require_client_cert=self.require_client_cert
        )


class ClientTLSSettings(_Section):
    """TLS for a connection we open: the server is verified against ``ca_file`` (unset: the system's CAs)."""

    enabled: bool = False
    ca_file: FilePath | None = None
    cert_file: FilePath | None = None  # client certificate, for servers that require mutual TLS
    key_file: FilePath | None = None
    check_hostname: bool = True  # the server's certificate must name the configured host (DNS name or IP)

    @model_validator(mode="after")
    def _files(self) -> ClientTLSSettings:
        if self.enabled:
            try:
                self.context()
            except TLSFileError as exc:
                raise ValueError(str(exc)) from None
        return self

    def context(self) -> ssl.SSLContext:
        return client_context(
            ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file,
            check_hostname=self.check_hostname,
        )


class NodeSettings(_Section):
    ae_title: str = "CXRLENS"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    spool_dir: Path = Path("var/cxr-lens")
    max_pdu: int = Field(1_048_576, ge=0)
    max_associations: int = Field(10, ge=1)
    free_disk_floor_mb: int = Field(512, ge=0)
    max_queued_jobs: int = Field(1000, ge=1)  # pending jobs; a C-STORE beyond them answers 0xA700
    http_port: int = Field(8080, ge=0, le=65535)
    retry_initial_s: float = Field(1.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0)
    # Access control at association: empty = anyone (the SCP logs a warning at start).
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_networks: tuple[IPvAnyNetwork, ...] = ()
    # Largest A-ASSOCIATE-RQ (or other non-data PDU) read; a longer one is aborted unread (P-DATA: max_pdu).
    max_associate_rq_bytes: int = Field(262_144, ge=1024)
    tls: ServerTLSSettings = ServerTLSSettings()

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _calling_aets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(ae) for ae in v)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        ipaddress.ip_address(v)
        return v


class DestinationSettings(_Section):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: ClientTLSSettings = ClientTLSSettings()

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)


class HL7Settings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(2575, ge=1, le=65535)
    sending_application: str = "CXR_LENS"
    sending_facility: str = "RADIOLOGY"
    receiving_application: str = "HS_RESULTS"
    receiving_facility: str = "HEALTHSHARE"
    processing_id: Literal["P", "D", "T"] = "P"
    accept_ack_type: Literal["AL", "NE", "ER", "SU"] = "AL"
    application_ack_type: Literal["AL", "NE", "ER", "SU"] = "NE"
    procedure_code: str = "36643-5"
    procedure_coding_system: str = "LN"
    procedure_text: str = "XR Chest 2V"
    include_image: bool = True
    image_long_side: int = Field(256, ge=32, le=1024)
    ack_timeout_s: float = Field(15.0, gt=0)
    retry_initial_s: float = Field(1.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0)
    tls: ClientTLSSettings = ClientTLSSettings()


class StorageSettings(_Section):
    """Where the job queue and the outbox live: SQLite files in ``node.spool_dir``, or a PostgreSQL database."""

    # "" or "sqlite": files under node.spool_dir; "postgresql://user@host:5432/db": one database shared by every
    # process of every machine (a password belongs in ~/.pgpass or PGPASSWORD, not here: `config` prints this).
    url: str = ""
    # PostgreSQL: a worker renews the claims on its jobs while it lives; after this long without it (the worker
    # died), they go back to the queue.
    lease_s: float = Field(60.0, ge=1.0, le=3600.0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip()
        if v not in ("", "sqlite") and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError('expected "", "sqlite" or a postgresql:// URL')
        return v


class Settings(BaseSettings):
    """Everything the node can be told. Sections mirror ``config/cxr-lens.toml``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    model: ModelSettings = ModelSettings()
    explain: ExplainSettings = ExplainSettings()
    outputs: OutputsSettings = OutputsSettings()
    trust: TrustSettings = TrustSettings()
    pixels: PixelSettings = PixelSettings()
    worker: WorkerSettings = WorkerSettings()
    node: NodeSettings = NodeSettings()
    destinations: tuple[DestinationSettings, ...] = ()
    hl7: HL7Settings = HL7Settings()
    storage: StorageSettings = StorageSettings()
    rules_file: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _toml_path.get()
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def _check_ae_title(v: str) -> str:
    # PS3.5 Table 6.2-1 (AE): 16 characters of the default repertoire, no backslash or control characters.
    if not 0 < len(v.strip()) <= 16 or "\\" in v or not v.isascii() or not v.isprintable():
        raise ValueError("an AE title is 1-16 printable ASCII characters without backslash")
    return v.strip()


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse a CLI override ``section.key=value``; the value is read as TOML when it parses, else as a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    dotted, raw = item.split("=", 1)
    keys = [k.strip() for k in dotted.split(".") if k.strip()]
    if not keys:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return keys, value


def load_settings(config_file: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Settings:
    """Load settings: defaults < ``config_file`` < environment < ``overrides`` (``section.key=value``)."""
    path = Path(config_file) if config_file else None
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML ({exc})") from exc
    init: dict[str, Any] = {}
    for item in overrides:
        keys, value = parse_override(item)
        node = init
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    token = _toml_path.set(path)
    try:
        return Settings(**init)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    finally:
        _toml_path.reset(token)


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"{key}: {err['msg']}")
    return "invalid configuration: " + "; ".join(lines)
