"""The core's settings: what every command of daemon/ reads.

Every setting is an environment variable (OUTBOXD_<NAME>, OUTBOXD_<TABLE>__<NAME>
inside a table such as [qdrant], [embedding] or [health], or the conventional
name where one exists, e.g. DATABASE_URL, QDRANT_URL) and a key of the optional
TOML config file (`--config FILE`); a few common ones are also command-line
flags. Precedence, highest first: a flag, a secret's *_FILE, the environment,
.env, the config file, the default. How settings are named, where the sources
come from, the deprecated names, and how a mistyped name is caught:
daemon.settings.

A wing extends this class with its own table (the Kafka transport's
consumers.settings.StreamSettings); a command names the class it builds.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from daemon.core.settings import PayloadSettings, QdrantSettings
from daemon.embedding.settings import (
    DEFAULT_BACKEND,
    DEFAULT_MODEL,
    EmbeddingSettings,
    SentenceTransformersSettings,
)
from daemon.outbox.settings import VerifySettings
from daemon.runtime.settings import HealthSettings
from daemon.settings.names import aliases, secret_file_problem, setting
from daemon.settings.report import suggest_choice
from daemon.settings.sources import ConfigFileSource, OtherNamesSource, SecretFileSource, dotenv_entries

__all__ = ["DEFAULT_MODEL", "Settings", "env_name"]
LOG_LEVELS = ("debug", "info", "warning", "error")  # as --log-level takes them; either case is read


def env_name(name: str) -> str:
    """The environment variable an operator sets for the setting `name` ("batch_size", "health.port")."""
    return setting(Settings, name).variable


def _default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OUTBOXD_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
        validate_default=True,
    )

    # settings that moved into a table: their old flat name (OUTBOXD_HEALTH_PORT, health_port
    # in the config file) -> the new one; the old name is still read, with a warning
    renamed: ClassVar[dict[str, str]] = {
        "health_port": "health.port",
        "health_host": "health.host",
        "heartbeat_timeout": "health.heartbeat_timeout",
        **{f"qdrant_{name}": f"qdrant.{name}" for name in QdrantSettings.CONNECTION},
        "model": "embedding.name",
        "device": "embedding.device",
        "max_seq_length": "embedding.max_seq_length",
        "normalize": "embedding.normalize",
        "embed_batch_size": "embedding.batch_size",
        "embedding_api_key": "embedding.api_key",
        "embed_cache_size": "embedding.cache_size",
    }

    # --- PostgreSQL -------------------------------------------------------
    database_url: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("DATABASE_URL", "OUTBOXD_DATABASE_URL", "database_url"),
        description="PostgreSQL URL or conninfo (sslmode/sslrootcert go here). "
        "Unset: start the embedded PostgreSQL under the data directory.",
    )
    pool_min_size: int = Field(1, ge=1, description="Connections the pool keeps open.")
    pool_max_size: int = Field(4, ge=1, description="Most connections the pool opens.")

    # --- Qdrant -------------------------------------------------------------
    qdrant: QdrantSettings = Field(
        default_factory=QdrantSettings,
        description="Where the vectors live: a Qdrant server (QDRANT_URL, QDRANT_API_KEY, "
        "OUTBOXD_QDRANT__<NAME>) or a local-mode folder (OUTBOXD_QDRANT__PATH); the [qdrant] table of the "
        "config file.",
    )
    collection: str = Field("chunks", min_length=1, description="Qdrant collection the points live in.")
    payload: PayloadSettings = Field(
        default_factory=PayloadSettings,
        description="What each point's payload holds (OUTBOXD_PAYLOAD__TEXT_CHARS, __PROFILE; the [payload] "
        "table of the config file).",
    )

    # --- embedding ------------------------------------------------------------
    embedding: EmbeddingSettings = Field(
        default_factory=SentenceTransformersSettings,
        description="The model and the embedding backend (OUTBOXD_EMBEDDING__NAME, OUTBOXD_EMBEDDING__BACKEND: "
        "sentence-transformers, onnx or http, each with settings of its own); the [embedding] table of the "
        "config file.",
    )

    reuse_vectors: bool | None = Field(
        None,
        description="Before encoding, look up vectors of identical text already in Qdrant (by content_hash), "
        "so identical text is encoded once per model across restarts too (default: on with a Qdrant server; "
        "off in local mode, where each lookup scans every point).",
    )

    # --- the outbox loop -------------------------------------------------------
    batch_size: int = Field(
        256, ge=1, le=10_000,
        description="Events claimed per batch (a backlog fills it; a larger claim gives the encode stage more "
        "texts to sort by length and spreads each batch's fixed cost over more events).",
    )
    concurrency: int = Field(
        2, ge=1, le=64, description="Batches in flight per process: one embeds while another reads or writes."
    )
    poll_interval: float = Field(
        2.0, gt=0, description="Seconds between polls when no NOTIFY arrives (the fallback)."
    )
    lease_seconds: float = Field(
        30.0, gt=0, description="A claim not renewed for this long is taken over by another worker."
    )
    max_attempts: int = Field(5, ge=1, description="Failed attempts before an event becomes a dead letter.")
    retry_backoff_base: float = Field(1.0, gt=0, description="First retry delay (seconds) of a failing event.")
    retry_backoff_max: float = Field(300.0, gt=0, description="Longest retry delay (seconds) of a failing event.")
    drain_timeout: float = Field(
        30.0, gt=0, description="On SIGTERM, seconds to finish the batch in flight before releasing it."
    )
    startup_timeout: float = Field(
        60.0, gt=0, description="Seconds to wait for PostgreSQL and Qdrant at start before giving up."
    )
    worker_name: str = Field(
        default_factory=_default_worker_name,
        pattern=r"^[\x21-\x7e]{1,200}$",
        description="Name of this worker in leases and pg_stat_activity (default: host-pid); printable ASCII.",
    )

    # --- continuous verification ------------------------------------------------------
    verify: VerifySettings = Field(
        default_factory=VerifySettings,
        description="The continuous verifier (OUTBOXD_VERIFY__CHUNKS_PER_SECOND, __RANGE_SIZE, __LEASE_SECONDS; "
        "the [verify] table of the config file).",
    )

    # --- health and telemetry --------------------------------------------------------
    health: HealthSettings = Field(
        default_factory=HealthSettings,
        description="The health endpoint: /healthz, /readyz and /metrics (OUTBOXD_HEALTH__PORT, __HOST, "
        "__HEARTBEAT_TIMEOUT; the [health] table of the config file).",
    )

    # --- process ----------------------------------------------------------------
    data_dir: Path = Field(
        Path(".outboxd"), description="Where the embedded PostgreSQL and Qdrant keep their data."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="auto: text on a terminal, JSON lines otherwise."
    )

    def __init__(self, **values: Any) -> None:
        # a keyword that names no setting (an old flat name such as qdrant_url) would be
        # ignored like an unknown variable: in code it is a mistake, so it is refused
        fields = type(self).model_fields
        known = set(fields) | {a for f in fields.values() for a in aliases(f)}
        unknown = sorted(set(values) - known)
        if unknown:
            moved = [f"{name} is now {type(self).renamed[name]}" for name in unknown if name in type(self).renamed]
            raise TypeError(f"{type(self).__name__}() has no setting {', '.join(unknown)}"
                            + (f" ({'; '.join(moved)})" if moved else ""))
        # An explicit choice of Qdrant (a flag, or a keyword here) beats the
        # other one set in the environment; set in the same place, both are refused.
        qdrant = values.get("qdrant")
        if isinstance(qdrant, dict):
            for given, other in (("path", "url"), ("url", "path")):
                if qdrant.get(given) is not None and other not in qdrant:
                    values["qdrant"] = qdrant = {**qdrant, other: None}
        super().__init__(**values)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # Flags first (they win), then *_FILE before the environment, so that a
        # conflict between a variable and its *_FILE is reported, not resolved;
        # a table's conventional and deprecated names at the rank of the place
        # that set them; the config file below everything the environment says.
        env_file = settings_cls.model_config.get("env_file")
        return (
            init_settings,
            SecretFileSource(settings_cls),
            env_settings,
            OtherNamesSource(settings_cls, lambda: dict(os.environ), "in the environment"),
            dotenv_settings,
            OtherNamesSource(settings_cls, lambda: dotenv_entries(Path(env_file)) if env_file else {}, "in .env"),
            ConfigFileSource(settings_cls),
            file_secret_settings,
        )

    _secret_file_problem = field_validator("*", mode="before")(secret_file_problem)

    @field_validator("embedding", mode="before")
    @classmethod
    def _embedding_table(cls, v: object) -> object:
        if not isinstance(v, dict):
            return v
        # OUTBOXD_EMBEDDING__API_KEY_FILE is SecretFileSource's to read; pydantic's environment
        # source hands it over too, as a key that a backend's table (extra="forbid") refuses
        v = {key: value for key, value in v.items() if key != "api_key_file"}
        # a shared setting alone (OUTBOXD_EMBEDDING__NAME) is the default backend's
        return v if "backend" in v else {**v, "backend": DEFAULT_BACKEND}

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: SecretStr | None) -> SecretStr | None:
        # parsed as libpq would, so a malformed URL is a bad setting now, not a
        # connection that fails later; libpq's words quote the URL (and a password
        # in it), so only what precedes the quote is shown
        if v is not None:
            from psycopg import ProgrammingError
            from psycopg.conninfo import conninfo_to_dict

            try:
                conninfo_to_dict(v.get_secret_value())
            except ProgrammingError as exc:
                why = str(exc).strip().split(' in URI: "')[0].split("\n")[0]
                raise ValueError(f"not a PostgreSQL URL or conninfo string ({why}); the form is "
                                 "postgresql://USER:PASSWORD@HOST:PORT/DATABASE?sslmode=...") from None
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, v: object) -> object:
        if isinstance(v, str) and v.lower() not in LOG_LEVELS:
            raise ValueError(f"{v!r} is not one of {', '.join(LOG_LEVELS)}{suggest_choice(v, list(LOG_LEVELS))}")
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_qdrant(self) -> "Settings":
        if self.qdrant.url and self.qdrant.path:
            raise ValueError(
                f"both QDRANT_URL ({self.qdrant.url}) and OUTBOXD_QDRANT__PATH ({self.qdrant.path}) are set, so "
                "it is not clear which Qdrant to use; set only one (a --qdrant-url or --qdrant-path flag "
                "overrides the other from the environment)"
            )
        return self

    @model_validator(mode="after")
    def _pool_bounds(self) -> "Settings":
        if self.pool_min_size > self.pool_max_size:
            raise ValueError(
                f"OUTBOXD_POOL_MIN_SIZE ({self.pool_min_size}) is larger than OUTBOXD_POOL_MAX_SIZE "
                f"({self.pool_max_size}); raise the maximum or lower the minimum"
            )
        return self

    # --- derived ----------------------------------------------------------------
    def services_configured(self) -> list[str]:
        """The production services this process was pointed at: with any of them,
        Qdrant must be named too (daemon.core.qdrant_connect.make_client). A wing
        adds its own (the Kafka bootstrap servers)."""
        return ["DATABASE_URL"] if self.database_url is not None else []

    @property
    def application_name(self) -> str:
        return f"outboxd:{self.worker_name}"[:63]  # PostgreSQL keeps 63 bytes; the name is ASCII

    @property
    def reuse_stored_vectors(self) -> bool:
        return self.reuse_vectors if self.reuse_vectors is not None else self.qdrant.url is not None

    @property
    def local_qdrant_path(self) -> str:
        return str(self.qdrant.path) if self.qdrant.path else str(self.data_dir / "qdrant")

    def secret_values(self) -> list[str]:
        """The value of every secret setting that is set, those inside tables included."""
        found: list[str] = []
        models: list[BaseModel] = [self]
        while models:
            model = models.pop()
            for name in type(model).model_fields:
                value = getattr(model, name)
                if isinstance(value, SecretStr):
                    found.append(value.get_secret_value())
                elif isinstance(value, BaseModel):
                    models.append(value)
        return [v for v in found if v]
