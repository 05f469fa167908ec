"""The Kafka transport's settings: the [kafka] table, and StreamSettings, the
core settings (daemon.config.Settings) with it, which relay, consume and tail
build (and `outboxd status`, where this wing is installed; daemon.wings finds
this class by name).

    KAFKA_BOOTSTRAP_SERVERS=broker:9092      (conventional; also OUTBOXD_KAFKA__BOOTSTRAP_SERVERS)
    OUTBOXD_KAFKA__TOPIC=outboxd.chunks      (or [kafka] topic = "outboxd.chunks" in --config)

Before they had a table of their own these settings were flat (OUTBOXD_KAFKA_TOPIC,
`kafka_topic` in the config file); those names still work, with a warning that
names the new one (StreamSettings.renamed).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator

from daemon.config import Settings
from daemon.settings.names import Table


class KafkaSettings(Table):
    bootstrap_servers: str | None = Field(
        None,
        validation_alias=AliasChoices("bootstrap_servers", "KAFKA_BOOTSTRAP_SERVERS"),
        description="Kafka brokers, host:port[,host:port]; needed by relay, consume and tail.",
    )
    topic: str = Field("outboxd.chunks", min_length=1, description="Topic the relay publishes chunk events to (compacted).")
    dead_letter_topic: str | None = Field(
        None, min_length=1, description="Topic for messages a consumer cannot apply (default: <topic>.dlq)."
    )
    group: str = Field("outboxd-qdrant", min_length=1, description="Consumer group of `outboxd consume`.")
    client_id: str | None = Field(
        None, min_length=1, description="Kafka client id (default: outboxd-<worker name>)."
    )
    create_topics: bool = Field(True, description="Create missing topics at start; false: a missing topic is an error.")
    partitions: int = Field(6, ge=1, description="Partitions of a topic outboxd creates.")
    replication_factor: int = Field(1, ge=1, description="Replication factor of a topic outboxd creates.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How to reach the brokers."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism (with SASL_PLAINTEXT or SASL_SSL)."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("sasl_password", "KAFKA_SASL_PASSWORD"),
        description="SASL password.",
    )
    ssl_cafile: Path | None = Field(None, description="CA bundle that signs the brokers' certificates.")
    ssl_certfile: Path | None = Field(None, description="Client certificate (mutual TLS).")
    ssl_keyfile: Path | None = Field(None, description="Client certificate's private key (mutual TLS).")

    @model_validator(mode="after")
    def _dead_letter_topic(self) -> "KafkaSettings":
        if self.dead_letter_topic is None:
            self.dead_letter_topic = f"{self.topic}.dlq"
        return self


class StreamSettings(Settings):
    """The core settings and the Kafka transport's."""

    kafka: KafkaSettings = Field(
        default_factory=KafkaSettings,
        description="The Kafka transport (KAFKA_BOOTSTRAP_SERVERS, OUTBOXD_KAFKA__<NAME>; the [kafka] table "
        "of the config file).",
    )

    renamed: ClassVar[dict[str, str]] = {
        **Settings.renamed,
        **{f"kafka_{name}": f"kafka.{name}" for name in KafkaSettings.model_fields},
    }

    def services_configured(self) -> list[str]:
        return super().services_configured() + (["KAFKA_BOOTSTRAP_SERVERS"] if self.kafka.bootstrap_servers else [])

    @model_validator(mode="after")
    def _client_id(self) -> "StreamSettings":
        if self.kafka.client_id is None:  # a copy: a KafkaSettings passed in may be shared
            self.kafka = self.kafka.model_copy(update={"client_id": f"outboxd-{self.worker_name}"[:200]})
        return self
