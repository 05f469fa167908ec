"""`outboxd relay`: the outbox, published to Kafka (the producer side of the
Kafka transport).

The relay is an outbox service (daemon.outbox.service: LISTEN wake-up with
polling, SKIP LOCKED claims, leases, verified acks, drain) whose batches go to
a Publisher: for each claimed chunk it publishes the chunk's current state,
keyed by chunk id, with an idempotent acks=all producer, and the events are
acknowledged only after the broker confirmed every message.

Why several relays cannot leave a consumer on an old state: each message
carries a version drawn after its state was read, and the acknowledgement is
verified (ack_verified): if the chunk changed after it was read, the events
are released or re-queued, so a newer read (with a higher version) follows.
Consumers keep the highest version per point.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

import orjson
from aiokafka import AIOKafkaProducer

from consumers import contract
from consumers.kafka_clients import client_options, describe_brokers, ensure_topics, kafka_ready
from daemon.core.batch import Outcome, Target, Targets
from daemon.core.chunk_state import MAX_METADATA_DEPTH
from daemon.errors import Failure, classify, describe
from daemon.outbox.queue import Event
from daemon.outbox.service import OutboxService
from daemon.telemetry import inject_headers
from db.outbox import OutboxRepository

log = logging.getLogger(__name__)


@dataclass
class PublishResult(Outcome):
    published: int = 0  # chunk events the brokers confirmed (a delete's tombstone not counted apart)

    def ops(self) -> dict[str, int]:
        return {"published": self.published}

    @classmethod
    def op_for(cls, target: Target) -> str:
        return "published"


class Publisher:
    """Writes chunk events to the topic."""

    def __init__(self, producer, pool, topic: str, metrics) -> None:
        self.producer = producer
        self.pool = pool
        self.outbox = OutboxRepository(pool)
        self.topic = topic
        self.metrics = metrics

    async def publish(self, targets: Targets, events: dict[UUID, list[Event]]) -> PublishResult:
        result = PublishResult()
        if not targets:
            return result
        # each chunk's version, read with its state; one drawn now only for a chunk that never had one
        unversioned = [cid for cid, t in targets.items() if t.version is None]
        versions = await self.outbox.relay_versions(unversioned) if unversioned else {}
        versions.update({cid: t.version for cid, t in targets.items() if t.version is not None})
        relayed_at = datetime.now(UTC)
        trace_headers = inject_headers()
        pending: list[tuple[UUID, asyncio.Future]] = []
        for chunk_id, target in targets.items():
            state = target.state
            behind = events.get(chunk_id) or []
            common = {
                "event_id": max((e.id for e in behind), default=0),
                "version": versions[chunk_id],
                "chunk_id": chunk_id,
                "changed_at": max((e.created_at for e in behind), default=relayed_at),
                "relayed_at": relayed_at,
            }
            if state is None:
                event = contract.ChunkDeleted(**common)
            else:
                event = contract.ChunkUpserted(**common, chunk=contract.chunk_from_state(state))
            try:
                value = contract.encode(event)
            except orjson.JSONEncodeError as exc:  # e.g. metadata nested deeper than JSON encoders go
                result.failed[chunk_id] = (
                    f"chunk {chunk_id}: cannot be encoded as an event ({exc}); check its metadata "
                    f"(nested deeper than {MAX_METADATA_DEPTH} levels is refused for points too)"
                )
                continue
            key = str(chunk_id).encode()
            headers = contract.headers(event) + trace_headers  # the consumer's span continues this batch's trace
            pending.append((chunk_id, await self.producer.send(self.topic, value, key, headers=headers)))
            if state is None:  # the tombstone lets compaction forget the chunk
                pending.append((chunk_id, await self.producer.send(self.topic, None, key, headers=headers)))
            result.written[chunk_id] = target.state_hash
        outcomes = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        for (chunk_id, _), outcome in zip(pending, outcomes):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception) or classify(outcome) is not Failure.OTHER:
                    raise outcome  # an outage: the batch is retried whole (duplicates are harmless); or no chunk's fault
                result.written.pop(chunk_id, None)
                result.failed[chunk_id] = describe(outcome)  # e.g. larger than the broker accepts
        result.published = len(result.written)
        self.metrics.relay_published.add(result.published)
        return result


class Relay(OutboxService):
    role = "outboxd relay"
    service_name = "outboxd-relay"
    result_type = PublishResult

    def __init__(self, settings, dsn) -> None:
        super().__init__(settings, dsn)
        self.producer = None
        self.publisher: Publisher | None = None

    async def start_sink(self) -> str | None:
        s = self.settings
        await self.until_reachable(describe_brokers(s), lambda: ensure_topics(s))
        await self.until_reachable(describe_brokers(s), self._start_producer)
        self.publisher = Publisher(self.producer, self.pool, s.kafka.topic, self.metrics)
        return None

    async def deliver(self, targets: Targets, events: dict[UUID, list[Event]]) -> PublishResult:
        return await self.publisher.publish(targets, events)

    async def _start_producer(self) -> None:
        producer = AIOKafkaProducer(
            **client_options(self.settings, suffix="-relay"),
            enable_idempotence=True,  # broker-side dedupe of retries, in order per partition
            acks="all",
            linger_ms=5,
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self.producer = producer

    async def close_sink(self) -> None:
        if self.producer is not None:
            await self.producer.stop()

    def describe(self) -> dict:
        s = self.settings
        return {"kafka": s.kafka.bootstrap_servers, "topic": s.kafka.topic}

    def readiness_checks(self):
        return super().readiness_checks() | {"kafka": self._ready_kafka}

    async def _ready_kafka(self) -> None:
        await kafka_ready(self.producer)
