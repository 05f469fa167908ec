"""Kafka clients from the [kafka] settings (consumers.settings): connection and
security options, and the topics outboxd needs, created when missing (or a clear error)."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from consumers.settings import StreamSettings
from daemon.errors import ConfigError, ServiceUnavailableError, describe
from daemon.runtime.backoff import KAFKA_STATUS
from daemon.runtime.retry import GaveUp, Retry

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code


def require_bootstrap(settings: StreamSettings) -> str:
    if not settings.kafka.bootstrap_servers:
        raise ConfigError(
            "KAFKA_BOOTSTRAP_SERVERS is not set: the Kafka transport needs the brokers' host:port "
            "(for a local broker: `bash ops/kafka/kafka.sh start`)"
        )
    return settings.kafka.bootstrap_servers


def client_options(settings: StreamSettings, *, suffix: str = "") -> dict[str, Any]:
    """Options every aiokafka client (producer, consumer, admin) takes."""
    kafka = settings.kafka
    options: dict[str, Any] = {
        "bootstrap_servers": require_bootstrap(settings).split(","),
        "client_id": kafka.client_id + suffix,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        options["ssl_context"] = create_ssl_context(
            cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None,
            certfile=str(kafka.ssl_certfile) if kafka.ssl_certfile else None,
            keyfile=str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None,
        )
    if kafka.security_protocol.startswith("SASL"):
        if not (kafka.sasl_mechanism and kafka.sasl_username and kafka.sasl_password):
            raise ConfigError(
                f"OUTBOXD_KAFKA__SECURITY_PROTOCOL={kafka.security_protocol} needs "
                "OUTBOXD_KAFKA__SASL_MECHANISM, OUTBOXD_KAFKA__SASL_USERNAME and KAFKA_SASL_PASSWORD "
                "(or KAFKA_SASL_PASSWORD_FILE)"
            )
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    return options


def topic_specs(settings: StreamSettings) -> dict[str, dict[str, str]]:
    """The topics outboxd uses and the configs it creates them with. The chunk
    topic is compacted: the newest event per chunk (or its tombstone) is kept,
    so the topic is a replayable snapshot of the index."""
    return {
        settings.kafka.topic: {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
        settings.kafka.dead_letter_topic: {"cleanup.policy": "delete", "retention.ms": str(14 * 24 * 3600 * 1000)},
    }


async def kafka_ready(client) -> None:
    """/readyz: the producer or consumer was started and a broker answers a
    metadata request now (aiokafka has no public ping; _client is its connection
    manager: .client on a producer, ._client on a consumer)."""
    if client is None:
        raise ServiceUnavailableError("not connected to Kafka yet")
    connection = getattr(client, "client", None) or client._client
    metadata = await connection.fetch_all_metadata()
    if not metadata.brokers():
        raise ServiceUnavailableError("no Kafka broker is reachable")


def describe_brokers(settings: StreamSettings) -> str:
    return f"Kafka ({settings.kafka.bootstrap_servers})"


async def ensure_topics(settings: StreamSettings, names: list[str] | None = None) -> None:
    """Create the missing topics (OUTBOXD_KAFKA__CREATE_TOPICS), or say which are missing."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    specs = topic_specs(settings)
    wanted = names or list(specs)
    admin = AIOKafkaAdminClient(**client_options(settings, suffix="-admin"))
    try:  # an unreachable broker raises a transient error: callers wait with until_reachable
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if not missing:
            return
        kafka = settings.kafka
        if not kafka.create_topics:
            raise ConfigError(
                f"Kafka topic(s) {', '.join(missing)} do not exist and OUTBOXD_KAFKA__CREATE_TOPICS is false; "
                f"create them (the chunk topic with cleanup.policy=compact) or allow outboxd to"
            )
        response = await admin.create_topics(
            [
                NewTopic(t, kafka.partitions, kafka.replication_factor, topic_configs=specs.get(t, {}))
                for t in missing
            ]
        )
        for name, code, *message in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):  # a racing replica may have created it
                raise ConfigError(f"cannot create Kafka topic {name!r}: error {code} {message[0] if message else ''}")
        log.info(
            "kafka topics created",
            extra={
                "topics": missing,
                "partitions": kafka.partitions,
                "replication_factor": kafka.replication_factor,
            },
        )
    finally:
        await admin.close()


async def group_lag(settings: StreamSettings) -> dict[str, Any]:
    """How far the consumer group is behind the topic: per partition, the
    messages after its committed offset (all of them where it committed none)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.structs import TopicPartition

    topic, group = settings.kafka.topic, settings.kafka.group
    admin = AIOKafkaAdminClient(**client_options(settings, suffix="-status"))
    reader = AIOKafkaConsumer(**client_options(settings, suffix="-status"), group_id=None)
    await admin.start()
    try:
        await reader.start()
        described = (await admin.describe_topics([topic]))[0]
        if described["error_code"]:
            return {"topic": topic, "group": group, "error": f"topic {topic!r} not found (error {described['error_code']})"}
        partitions = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
        ends = await reader.end_offsets(partitions)
        committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
        lag: dict[str, int] = {}  # JSON object keys: partition numbers as text
        for tp in partitions:
            meta = committed.get(tp)
            done = meta.offset if meta is not None and meta.offset >= 0 else 0
            lag[str(tp.partition)] = max(0, ends[tp] - done)
        return {"topic": topic, "group": group, "consumer_lag": sum(lag.values()), "partitions": lag}
    finally:
        await reader.stop()
        await admin.close()


STATUS_BUDGET = KAFKA_STATUS.deadline  # seconds `outboxd status` keeps asking a broker that answers "not yet"


async def consumer_group_status(settings: StreamSettings) -> dict[str, Any]:
    """`outboxd status`'s Kafka section: the consumer group's lag (the relay's own
    lag is the outbox's: it claims from it), or the error that kept status from it."""
    from aiokafka.errors import KafkaConnectionError  # the kafka extra: status imports this module without it

    # retried while a broker that answers says "not yet" (a fresh cluster's group
    # coordinator, a leader election); brokers that do not answer are reported at once
    retry = Retry(KAFKA_STATUS, retry_if=lambda exc: not isinstance(exc, KafkaConnectionError))
    try:
        return await asyncio.wait_for(retry.call(group_lag, settings), STATUS_BUDGET)
    except Exception as exc:  # status reports what it can reach
        cause = exc.last if isinstance(exc, GaveUp) else exc
        return {"topic": settings.kafka.topic, "group": settings.kafka.group, "error": describe(cause)}
