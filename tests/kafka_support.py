"""Helpers for the Kafka transport's tests: run the relay and consumers
in-process, read a topic back, wait for the collection to match PostgreSQL."""
from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from qdrant_client import AsyncQdrantClient

from consumers.relay import Relay
from consumers.stream_consumer import StreamConsumer
from tests.support import all_points


def kafka_names() -> dict[str, str]:
    """A topic and group of the test's own ([kafka] topic and group), so tests never see each other's events."""
    tag = uuid.uuid4().hex[:8]
    return {"topic": f"outboxd.test.{tag}", "group": f"outboxd-test-{tag}"}


@asynccontextmanager
async def running_relay(settings, dsn: str):
    relay = Relay(settings, dsn)
    await relay.start()
    task = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        relay.stop.set()
        assert await asyncio.wait_for(task, 60) == 0
        await relay.close()


async def relay_drain(settings, dsn: str) -> Relay:
    """Publish everything pending, then stop."""
    relay = Relay(settings, dsn)
    await relay.start()
    try:
        assert await asyncio.wait_for(relay.run(drain=True), 120) == 0
    finally:
        await relay.close()
    return relay


@asynccontextmanager
async def running(consumer: StreamConsumer):
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        yield consumer
    finally:
        consumer.stop.set()
        try:
            assert await asyncio.wait_for(task, 60) == 0
        finally:
            await consumer.close()


def expected_points(dsn: str) -> dict[str, dict[str, Any]]:
    """Chunk id -> the payload fields that say which state a point reflects."""
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        rows = conn.execute(
            "SELECT chunk_id, content_hash, title, metadata, text FROM outboxd.chunk_state"
        ).fetchall()
    return {
        str(r["chunk_id"]): {"content_hash": r["content_hash"], "title": r["title"], "metadata": r["metadata"]}
        for r in rows
        if r["text"].strip()
    }


async def matches(dsn: str, qdrant: AsyncQdrantClient, collection: str) -> bool:
    """A cheap check that every point reflects its chunk's current state (the full
    check, vectors included, is tests.support.assert_converged)."""
    want = expected_points(dsn)
    if not await qdrant.collection_exists(collection) and not want:
        return True
    try:
        points = await all_points(qdrant, collection)
    except ValueError:  # the collection does not exist yet
        return False
    if set(points) != set(want):
        return False
    def held(payload: dict[str, Any]) -> dict[str, Any]:
        return {"content_hash": (payload.get("outboxd") or {}).get("content_hash"), "title": payload.get("title"),
                "metadata": payload.get("metadata")}

    return all(held(points[pid].payload) == w for pid, w in want.items())


async def wait_until_matches(dsn: str, qdrant: AsyncQdrantClient, collection: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not await matches(dsn, qdrant, collection):
        if time.monotonic() > deadline:
            want = expected_points(dsn)
            try:
                have = await all_points(qdrant, collection)
            except ValueError:
                have = {}
            raise AssertionError(
                f"Qdrant did not converge in {timeout}s: {len(want)} chunks, {len(have)} points, "
                f"missing {len(set(want) - set(have))}, orphaned {len(set(have) - set(want))}"
            )
        await asyncio.sleep(0.3)


async def read_topic(bootstrap: str, topic: str, *, timeout: float = 10) -> list[Any]:
    """Every record of a topic, in partition then offset order."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assignment = consumer.assignment()
            if assignment:
                ends = await consumer.end_offsets(list(assignment))
                positions = {tp: await consumer.position(tp) for tp in ends}
                if all(positions[tp] >= end for tp, end in ends.items()):
                    break
            batch = await consumer.getmany(timeout_ms=300)
            for recs in batch.values():
                records.extend(recs)
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        await consumer.stop()
