"""Figure 5 for the Kafka transport: events/s through relay → topic → consumer
when no encoding is needed (payload-only updates of converged chunks), beside
the notify path's figure from the same run.

Three rounds over the same n chunks, each one metadata update of all of them:
the relay alone (publish rate), the consumer alone (apply rate), then both at
once (the path, as deployed). The broker: KAFKA_BOOTSTRAP_SERVERS if set, else
the tests' real single-node Apache Kafka (ops/kafka/kafka.sh).
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from contextlib import contextmanager

from qdrant_client import AsyncQdrantClient

from consumers.qdrant import QdrantConsumer
from daemon.embedder import Embedder
from daemon.relay import Relay


@contextmanager
def kafka_bootstrap():
    url = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if url:
        yield url
        return
    from tests.kafka_broker import KafkaBroker

    with KafkaBroker() as broker:
        yield broker.bootstrap


async def _relay(settings, dsn: str) -> float:
    relay = Relay(settings, dsn)
    await relay.start()
    try:
        started = time.perf_counter()
        assert await relay.run(drain=True) == 0
        return time.perf_counter() - started
    finally:
        await relay.close()


async def _consume_until(consumer: QdrantConsumer, records: int) -> float:
    started = time.perf_counter()
    while consumer.counts["records"] < records:
        await asyncio.sleep(0.01)
    return time.perf_counter() - started


async def measure(dsn: str, embedder: Embedder, n: int, bootstrap: str, settings_for, add_chunks, sql) -> dict:
    tag = uuid.uuid4().hex[:8]
    settings = settings_for(
        dsn, kafka_bootstrap_servers=bootstrap, kafka_topic=f"outboxd.bench.{tag}", kafka_group=f"bench-{tag}",
        kafka_partitions=6, batch_size=500,
    )
    qdrant = AsyncQdrantClient(location=":memory:")
    consumer = QdrantConsumer(settings, embedder=embedder, qdrant=qdrant)
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        doc_id = add_chunks(dsn, "kafka transport", [f"short chunk {i}" for i in range(n)])
        await _relay(settings, dsn)
        await _consume_until(consumer, n)  # converged; the texts were encoded (or cached) here
        embedded_at_setup = consumer.totals.embedded

        def update(rev: int) -> None:
            sql(dsn, "UPDATE chunks SET metadata = jsonb_build_object('rev', %s) WHERE document_id = %s", (rev, doc_id))

        # the relay alone: the consumer is paused by giving it nothing new until the relay is done
        consumer.consumer.pause(*consumer.consumer.assignment())
        update(2)
        relay_seconds = await _relay(settings, dsn)
        consumer.consumer.resume(*consumer.consumer.assignment())
        consume_seconds = await _consume_until(consumer, 2 * n)

        update(3)  # both at once, as deployed
        started = time.perf_counter()
        relay_task = asyncio.create_task(_relay(settings, dsn))
        await _consume_until(consumer, 3 * n)
        path_seconds = time.perf_counter() - started
        await relay_task
        embedded = consumer.totals.embedded - embedded_at_setup
        payload_only = consumer.totals.payload_only
    finally:
        consumer.stop.set()
        await task
        await consumer.close()
        await qdrant.close()
    assert payload_only >= 2 * n, consumer.totals
    return {
        "events": n,
        "relay_events_per_s": round(n / relay_seconds),
        "consume_events_per_s": round(n / consume_seconds),
        "events_per_s": round(n / path_seconds),
        "encodes_in_update_rounds": embedded,  # payload-only: 0
        "partitions": settings.kafka_partitions,
        "consumers": 1,
        "what": "payload-only updates of converged chunks: relay alone, consumer alone, then both at once "
        "(events/s of the path = n ÷ time from the first publish to the last apply); one relay, one consumer, "
        "Qdrant local mode in memory, a single-node Apache Kafka on loopback",
    }
