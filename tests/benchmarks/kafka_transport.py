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
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager

from qdrant_client import AsyncQdrantClient

from consumers.qdrant_consumer import QdrantConsumer
from consumers.relay import Relay
from daemon.embedding.embedder import Embedder


@contextmanager
def kafka_bootstrap():
    url = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if url:
        yield url
        return
    from tests.kafka_broker import KafkaBroker

    with KafkaBroker() as broker:
        yield broker.bootstrap


@contextmanager
def relay_process(settings, dsn: str):
    """`outboxd relay` as its own process (the deployed shape: relay and consumer
    do not share an event loop), started and waiting for events; SIGTERM at exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOXD_")}
    env.update(
        DATABASE_URL=dsn, KAFKA_BOOTSTRAP_SERVERS=settings.kafka.bootstrap_servers,
        OUTBOXD_KAFKA__TOPIC=settings.kafka.topic, OUTBOXD_BATCH_SIZE=str(settings.batch_size),
        OUTBOXD_LOG_FORMAT="json", OUTBOXD_LOG_LEVEL="INFO",
    )
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "relay"], env=env, stdout=subprocess.DEVNULL, stderr=err)
        def said() -> bytes:
            err.seek(0)
            return err.read()

        try:
            deadline = time.monotonic() + 120
            while b"outboxd relay running" not in said():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the relay did not start: {said().decode(errors='replace')[-2000:]}")
                time.sleep(0.1)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


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
    while consumer.stats.records < records:
        await asyncio.sleep(0.01)
    return time.perf_counter() - started


async def measure(dsn: str, embedder: Embedder, n: int, bootstrap: str, settings_for, add_chunks, sql,
                  qdrant: AsyncQdrantClient | None = None, **settings_overrides) -> dict:
    """qdrant: the consumer's Qdrant (closed here; default local mode in memory);
    settings_overrides: more keywords for settings_for (the collection, the Qdrant target)."""
    tag = uuid.uuid4().hex[:8]
    settings = settings_for(
        dsn, kafka={"bootstrap_servers": bootstrap, "topic": f"outboxd.bench.{tag}", "group": f"bench-{tag}",
                    "partitions": 6},
        batch_size=500, **settings_overrides,
    )
    qdrant = qdrant if qdrant is not None else AsyncQdrantClient(location=":memory:")
    consumer = QdrantConsumer(settings, embedder=embedder, qdrant=qdrant)
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        doc_id = add_chunks(dsn, "kafka transport", [f"short chunk {i}" for i in range(n)])
        await _relay(settings, dsn)
        await _consume_until(consumer, n)  # converged; the texts were encoded (or cached) here
        embedded_at_setup = consumer.stats.embedded

        def update(rev: int) -> None:
            sql(dsn, "UPDATE chunks SET metadata = jsonb_build_object('rev', %s) WHERE document_id = %s", (rev, doc_id))

        # the relay alone: the consumer is paused by giving it nothing new until the relay is done
        consumer.consumer.pause(*consumer.consumer.assignment())
        update(2)
        relay_seconds = await _relay(settings, dsn)
        consumer.consumer.resume(*consumer.consumer.assignment())
        consume_seconds = await _consume_until(consumer, 2 * n)

        # both at once, as deployed: the relay in a process of its own, already running
        with relay_process(settings, dsn):
            update(3)
            started = time.perf_counter()
            await _consume_until(consumer, 3 * n)
            path_seconds = time.perf_counter() - started
        embedded = consumer.stats.embedded - embedded_at_setup
        payload_only = consumer.stats.payload_only
    finally:
        consumer.stop.set()
        await task
        await consumer.close()
        await qdrant.close()
    assert payload_only >= 2 * n, consumer.stats
    return {
        "events": n,
        "relay_events_per_s": round(n / relay_seconds),
        "consume_events_per_s": round(n / consume_seconds),
        "events_per_s": round(n / path_seconds),
        "encodes_in_update_rounds": embedded,  # payload-only: 0
        "partitions": settings.kafka.partitions,
        "consumers": 1,
        "what": "payload-only updates of converged chunks: relay alone, consumer alone (in this process), then "
        "both at once as deployed, the relay a separate `outboxd relay` process (events/s of the path = n ÷ "
        "time from the update's commit to the last apply); one relay, one consumer, a single-node Apache "
        "Kafka on loopback, all on the same cores",
    }
