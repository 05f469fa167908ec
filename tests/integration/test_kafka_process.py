"""`outboxd relay` and `outboxd consume` as real processes, killed with SIGKILL
mid-batch (invariant 5 for the Kafka transport): a replacement takes over and
nothing is lost; what the dead one had half done is harmlessly done again."""
from __future__ import annotations

import asyncio
import signal
import time

import httpx
import psycopg
import pytest

from consumers.qdrant_consumer import QdrantConsumer
from tests.kafka_support import kafka_names, read_topic, relay_drain, running, wait_until_matches
from tests.processes import MODEL_LOAD_S, base_env, health_port, insert_backlog, long_texts, qdrant_env, sample
from tests.support import add_document, assert_converged, open_qdrant, outbox_rows

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def kafka_env(dsn: str, bootstrap: str, names: dict[str, str], **settings) -> dict[str, str]:
    return base_env(
        DATABASE_URL=dsn,
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        OUTBOXD_KAFKA__TOPIC=names["topic"],
        OUTBOXD_KAFKA__GROUP=names["group"],
        OUTBOXD_LEASE_SECONDS=3,
        OUTBOXD_POLL_INTERVAL=0.5,
        OUTBOXD_STARTUP_TIMEOUT=30,
        **settings,
    )


async def committed_and_end(bootstrap: str, topic: str, group: str) -> tuple[int, int]:
    """(offsets the group committed, offsets in the topic), summed over partitions."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.structs import TopicPartition

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await admin.start()
    await reader.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        [described] = await admin.describe_topics([topic])
        partitions = [p["partition"] for p in described["partitions"]]
        ends = await reader.end_offsets([TopicPartition(topic, p) for p in partitions])
        return sum(m.offset for tp, m in committed.items() if tp.topic == topic and m.offset > 0), sum(ends.values())
    finally:
        await reader.stop()
        await admin.close()


async def test_consumer_killed_mid_batch_is_replaced_and_converges(
    spawn, notify, conn, dsn, collection, embedder, kafka_bootstrap, tmp_path, make_settings
):
    """Also: the replacement runs as systemd and Kubernetes see it (READY=1,
    STOPPING=1, /readyz with Kafka, Qdrant and the model, /metrics)."""
    names = kafka_names()
    insert_backlog(conn, long_texts(160, words=40, seed=7))
    settings = make_settings(kafka={"bootstrap_servers": kafka_bootstrap, **names})
    await relay_drain(settings, dsn)
    qpath = tmp_path / "qdrant"
    env = kafka_env(dsn, kafka_bootstrap, names, **qdrant_env(qpath), OUTBOXD_COLLECTION=collection,
                    OUTBOXD_BATCH_SIZE=8)

    first = spawn("consume", env=env, name="killed")
    first.wait_for(lambda: first.log("outboxd consume running"), "running", MODEL_LOAD_S)
    deadline = time.monotonic() + MODEL_LOAD_S
    while True:
        committed, end = await committed_and_end(kafka_bootstrap, names["topic"], names["group"])
        if committed > 0:
            break
        assert time.monotonic() < deadline, first.describe()
        await asyncio.sleep(0.1)
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(10)
    assert 0 < committed < end, f"killed after {committed} of {end} offsets: not mid-stream"

    supervised = {**env, "NOTIFY_SOCKET": notify.path, "OUTBOXD_HEALTH__PORT": "0", "OUTBOXD_HEALTH__HOST": "127.0.0.1"}
    second = spawn("consume", env=supervised, name="replacement")
    port = health_port(second)
    second.wait_for(lambda: second.log("outboxd consume running"), "running", MODEL_LOAD_S)
    deadline = time.monotonic() + MODEL_LOAD_S + 120
    while (await committed_and_end(kafka_bootstrap, names["topic"], names["group"]))[0] < end:
        assert time.monotonic() < deadline and second.popen.poll() is None, second.describe()
        await asyncio.sleep(0.3)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert {"kafka", "qdrant", "model", "running"} <= set(ready.json()["checks"])
        assert (await http.get("/healthz")).status_code == 200
        metrics = (await http.get("/metrics")).text
    assert (sample(metrics, "outboxd_consumer_applied_total") or 0) > 0
    assert notify.seen(lambda m: m == "READY=1")
    second.popen.send_signal(signal.SIGTERM)
    assert second.wait(60) == 0, second.describe()
    assert second.log("outboxd consume stopped") is not None
    assert notify.seen(lambda m: m == "STOPPING=1")

    client = open_qdrant(qpath)
    try:
        assert await assert_converged(dsn, client, collection, embedder) == 160
    finally:
        await client.close()


async def test_relay_killed_mid_batch_loses_nothing(
    spawn, conn, dsn, qdrant, collection, embedder, kafka_bootstrap, make_settings
):
    names = kafka_names()
    sentences = [f"Sentence number {i} about relays and partitions." for i in range(40)]
    for d in range(10):  # 4,000 chunks over 40 distinct texts: publishing is the work, not embedding
        add_document(conn, [sentences[(d + i) % 40] for i in range(400)], title=f"Doc {d}")
    total = len(outbox_rows(conn))
    env = kafka_env(dsn, kafka_bootstrap, names, OUTBOXD_BATCH_SIZE=5, OUTBOXD_CONCURRENCY=1)

    relay = spawn("relay", env=env, name="killed-relay")
    relay.wait_for(lambda: relay.log("outboxd relay running"), "running", 60)
    with psycopg.connect(dsn, autocommit=True) as c:
        relay.wait_for(
            lambda: c.execute("SELECT count(*) FROM outboxd.outbox").fetchone()[0] < total - 200,
            "some events relayed", 60, 0.02,
        )
        relay.popen.send_signal(signal.SIGKILL)
        relay.popen.wait(10)
        left, leased = c.execute("SELECT count(*), count(locked_by) FROM outboxd.outbox").fetchone()
    assert 0 < left < total, "killed before or after the stream, not in it"
    assert leased <= 5, "one worker claiming batches of 5 can hold at most one batch"

    replacement = spawn("relay", "--drain", env=env, name="replacement-relay")
    assert replacement.wait(120) == 0, replacement.describe()
    assert outbox_rows(conn) == []

    records = await read_topic(kafka_bootstrap, names["topic"], timeout=30)
    assert len({r.key for r in records}) == total
    # only the dead relay's claimed batch can have been published and not acknowledged, so
    # only it can appear twice; anything more would be a relay publishing what it had acked
    duplicates = len(records) - total
    assert 0 <= duplicates <= leased, (duplicates, leased)

    settings = make_settings(kafka={"bootstrap_servers": kafka_bootstrap, **names}, batch_size=500)
    async with running(QdrantConsumer(settings, embedder=embedder, qdrant=qdrant)) as consumer:
        await wait_until_matches(dsn, qdrant, collection, timeout=180)
    assert consumer.stats.embedded <= 40  # duplicates and repeated texts cost no encode
