"""A small base for consumers of the chunk event stream: poll a batch per
partition, process it, commit its offsets only after it succeeded, park what
cannot be processed in the dead-letter topic, and stop gracefully.

Subclass it and implement `handle`; `outboxd consume` (Qdrant) and
`outboxd tail` (print the stream) are the two built here, and another team's
consumer (a search index, an audit log) is a third file like them:

    class AuditLog(StreamConsumer):
        async def handle(self, records):
            for r in records:
                event = contract.decode(r.value)  # BadMessage -> dead letter
                ...
            return []  # records to dead-letter, with the reason

Delivery is at least once: a batch that fails with an outage (a transient
error) is retried with backoff and never skipped; a crash re-delivers from
the last commit. So handlers must be idempotent (outboxd's are: versions).

Rebalances are safe: a partition is revoked only after the batch in flight
for it finished and committed, so two members never interleave writes for one
key.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError

from consumers.kafka_clients import client_options, describe_brokers, ensure_topics, kafka_ready
from consumers.settings import StreamSettings
from daemon.errors import describe
from daemon.runtime.retry import Stopped
from daemon.runtime.service import Service, Worker
from daemon.telemetry import extract_context, tracer

log = logging.getLogger(__name__)

# headers a dead letter carries besides the original ones
H_ERROR = "outboxd-error"
H_SOURCE = "outboxd-source"  # topic/partition/offset the message came from
H_GROUP = "outboxd-group"


class StreamConsumer(Service):
    """One consumer process. group=None reads without a group: every partition,
    nothing committed (an operator's tail)."""

    role = "outboxd consumer"
    service_name = "outboxd-consumer"

    def __init__(
        self,
        settings: StreamSettings,
        *,
        group: str | None,
        topics: list[str] | None = None,
        from_beginning: bool = True,
        dead_letters: bool = True,
    ) -> None:
        super().__init__(settings)
        self.group = group
        self.topics = topics or [settings.kafka.topic]
        self.from_beginning = from_beginning
        self.dead_letters = dead_letters
        self.consumer = None
        self.producer = None  # for dead letters
        self._busy = asyncio.Lock()  # held while a batch is processed; revocation waits for it
        self._in_flight = "batch"  # the heartbeat's name for the batch being processed
        # the streak of failed fetches, reset by the next good one
        self._polling = self.policy.outage_retry("poll", "cannot fetch from Kafka; retrying")

    # --- the part a subclass writes --------------------------------------------
    async def handle(self, records: list[Any]) -> list[tuple[Any, str]]:
        """Process the records of one partition, in offset order. Return the
        records that cannot be processed, each with the reason (they go to the
        dead-letter topic); raise a transient error to have the batch retried."""
        raise NotImplementedError

    async def open(self) -> None:
        """Start what handle needs (called once, before the first poll)."""

    async def shutdown(self) -> None:
        """Close what open started."""

    def readiness_checks(self) -> dict:
        """/readyz: a subclass adds what handle needs (super().readiness_checks() | {...})."""
        return {"kafka": self._ready_kafka} | super().readiness_checks()

    async def _ready_kafka(self) -> None:
        await kafka_ready(self.consumer)

    # --- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        topics = list(self.topics) + ([s.kafka.dead_letter_topic] if self.dead_letters else [])
        await self.until_reachable(describe_brokers(s), lambda: ensure_topics(s, topics))
        await self.open()
        await self.until_reachable(describe_brokers(s), self._start_clients)
        self.started = True

    async def _start_clients(self) -> None:
        s = self.settings
        consumer = AIOKafkaConsumer(
            **client_options(s, suffix="-consumer"),
            group_id=self.group,
            enable_auto_commit=False,  # offsets move only after a batch succeeded
            auto_offset_reset="earliest" if self.from_beginning else "latest",
            max_poll_records=s.batch_size,
        )
        producer = None
        try:
            if self.dead_letters:
                producer = AIOKafkaProducer(**client_options(s, suffix="-dlq"), acks="all", enable_idempotence=True)
                await producer.start()
            consumer.subscribe(self.topics, listener=_WaitForBatch(self))
            await consumer.start()
        except BaseException:
            with suppress(Exception):
                await consumer.stop()
            if producer is not None:
                with suppress(Exception):
                    await producer.stop()
            raise
        self.consumer, self.producer = consumer, producer

    async def close(self) -> None:
        # leaving the group now hands the partitions over at once, not after a session timeout
        if self.consumer is not None:
            with suppress(Exception):
                await self.consumer.stop()
        if self.producer is not None:
            with suppress(Exception):
                await self.producer.stop()
        with suppress(Exception):
            await self.shutdown()

    # --- the one worker: poll, process each partition's batch, commit ------------------
    def workers(self) -> dict[str, Worker]:
        return {"poll": self._consume}

    def running(self) -> dict[str, Any]:
        return {"group": self.group, "topics": self.topics, "kafka": self.settings.kafka.bootstrap_servers}

    async def _consume(self) -> None:
        while not self.stop.is_set():
            self.heartbeat.beat()
            batches = await self._poll()
            for tp, records in batches.items():
                if self.stop.is_set():
                    break  # fetched but not started: uncommitted, delivered again
                async with self._busy:
                    if self.group is not None and tp not in self.consumer.assignment():
                        continue  # revoked while we waited: its new owner reads it from the last commit
                    self._in_flight = f"partition-{tp.partition}"
                    self.heartbeat.busy(self._in_flight)
                    try:
                        await self._process(tp, records)
                    finally:
                        self.heartbeat.idle(self._in_flight)
            if batches:
                await self._observe_lag()

    async def _poll(self) -> dict:
        try:
            return await self._polling.call(self.consumer.getmany, timeout_ms=500, max_records=self.settings.batch_size)
        except Stopped:
            return {}  # stopped during an outage: nothing fetched

    async def _observe_lag(self) -> None:
        """Per assigned partition: messages after our position (the broker's high
        watermark as of the last fetch)."""
        lag = {}
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                with suppress(Exception):  # a partition revoked meanwhile
                    lag[tp.partition] = max(0, high - await self.consumer.position(tp))
        self.metrics.set_consumer_lag(lag)

    async def _process(self, tp, records: list[Any]) -> None:
        # one span per batch, continuing the trace the relay started for its first message
        with tracer.start_as_current_span(
            "outboxd.consume",
            context=extract_context(records[0].headers),
            attributes={"partition": tp.partition, "records": len(records), "offset": records[0].offset},
        ):
            parked: set[int] = set()  # offsets parked by an earlier try of this batch: never twice

            async def once() -> None:
                rejected = await self.handle(records)
                for record, reason in rejected:
                    if record.offset not in parked:
                        await self.dead_letter(record, reason)
                        parked.add(record.offset)
                await self._commit(tp, records[-1].offset + 1)

            try:  # an outage of the handler, the dead-letter topic or the commit: the batch again
                await self.policy.retrying(self._in_flight).call(once)
            except Stopped:
                # stopping during an outage: nothing committed, the next owner applies it
                log.warning("stopped during an outage; batch left uncommitted", extra={"partition": tp.partition})
                return
        self.stats.records += len(records)
        self.metrics.consumer_applied.add(len(records))

    async def _commit(self, tp, offset: int) -> None:
        if self.group is None:
            return
        try:
            await self.consumer.commit({tp: offset})
        except CommitFailedError as exc:
            # the group moved on (we were too slow, or fenced): the partition's new
            # owner re-applies from the last commit, harmlessly
            log.warning("offset commit refused after a rebalance", extra={"error": describe(exc)})

    async def dead_letter(self, record: Any, reason: str) -> None:
        """Park one message, with why, in the dead-letter topic; the partition moves on."""
        self.policy.record_failure("delete" if record.value is None else "upsert", failed=0, dead=1)
        log.error(
            "message parked in the dead-letter topic",
            extra={"partition": record.partition, "offset": record.offset, "error": reason},
        )
        if self.producer is None:
            return
        headers = list(record.headers or []) + [
            (H_ERROR, reason.encode("utf-8", "replace")[:4000]),
            (H_SOURCE, f"{record.topic}/{record.partition}/{record.offset}".encode()),
            (H_GROUP, (self.group or "").encode()),
        ]
        await self.producer.send_and_wait(self.settings.kafka.dead_letter_topic, record.value, record.key, headers=headers)


class _WaitForBatch(ConsumerRebalanceListener):
    """Rebalance listener: revocation waits until the batch in flight committed."""

    def __init__(self, owner: StreamConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked) -> None:
        async with self.owner._busy:
            pass
        if revoked:
            log.info("partitions revoked", extra={"partitions": sorted(tp.partition for tp in revoked)})

    async def on_partitions_assigned(self, assigned) -> None:
        log.info("partitions assigned", extra={"partitions": sorted(tp.partition for tp in assigned)})
