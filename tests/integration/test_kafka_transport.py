"""The Kafka transport end to end on real PostgreSQL, a real Apache Kafka broker,
Qdrant local mode and MiniLM: relay → topic → consumer group → Qdrant, through
the same apply core as the notify daemon (invariants 2, 3, 5 and 7)."""
from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from psycopg.types.json import Jsonb

from consumers import contract
from consumers.qdrant_consumer import QdrantConsumer
from consumers.stream_consumer import H_ERROR, H_SOURCE
from tests.kafka_support import kafka_names, read_topic, relay_drain, running, running_relay, wait_until_matches
from tests.support import add_document, all_points, assert_converged, open_qdrant, outbox_rows, qdrant_flags

pytestmark = [pytest.mark.integration]


async def wait_for(condition, timeout: float = 60, what: str = "condition") -> None:
    for _ in range(int(timeout / 0.1)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout}s")

TEXTS = [
    "PostgreSQL is the system of record for every chunk.",
    "Qdrant stores one point per chunk, keyed by the chunk id.",
    "The outbox table is written in the same transaction as the chunk.",
    "Embeddings are computed only when the text changes.",
]


@pytest.fixture
def kafka_settings(make_settings, kafka_bootstrap):
    names = kafka_names()

    def make(kafka=None, **overrides):
        kafka = {"bootstrap_servers": kafka_bootstrap, "partitions": 6, **names, **(kafka or {})}
        return make_settings(**{"kafka": kafka, "batch_size": 16, **overrides})

    return make


async def test_relay_publishes_self_contained_events_keyed_by_chunk(conn, dsn, kafka_settings, kafka_bootstrap):
    settings = kafka_settings()
    doc_id, ids = add_document(conn, TEXTS[:3], title="Guide", url="https://example.org/g", document_type="html")
    relay = await relay_drain(settings, dsn)
    assert relay.stats.published == 3 and outbox_rows(conn) == []

    conn.execute("DELETE FROM chunks WHERE id = %s", (ids[0],))
    conn.execute("UPDATE chunks SET text = 'A new text.' WHERE id = %s", (ids[1],))
    await relay_drain(settings, dsn)

    records = await read_topic(kafka_bootstrap, settings.kafka.topic)
    by_chunk: dict[uuid.UUID, list] = {}
    for r in records:
        by_chunk.setdefault(uuid.UUID(r.key.decode()), []).append(r)
    assert set(by_chunk) == set(ids)
    for chunk_id, recs in by_chunk.items():
        assert len({r.partition for r in recs}) == 1, "one chunk's events share a partition"
        versions = [int(contract.header(r.headers, contract.H_VERSION)) for r in recs]
        assert versions == sorted(versions)

    first, *rest = by_chunk[ids[0]]
    created = contract.decode(first.value)
    assert isinstance(created, contract.ChunkUpserted)
    assert created.chunk.text == TEXTS[0] and created.chunk.title == "Guide" and created.chunk.document_id == doc_id
    assert created.chunk.url == "https://example.org/g" and created.chunk.document_type == "html"
    deleted, tombstone = rest
    assert isinstance(contract.decode(deleted.value), contract.ChunkDeleted)
    assert tombstone.value is None and tombstone.key == str(ids[0]).encode()
    assert contract.tombstone_version(tombstone.key, tombstone.headers) == (ids[0], contract.decode(deleted.value).version)

    updated = contract.decode(by_chunk[ids[1]][-1].value)
    assert updated.chunk.text == "A new text." and updated.version > created.version


async def test_changes_converge_through_relay_and_consumer(conn, dsn, qdrant, collection, embedder, kafka_settings):
    settings = kafka_settings()
    doc_id, ids = add_document(conn, TEXTS, title="Guide")
    other_doc, other_ids = add_document(conn, ["Another document, soon deleted.", "Its second chunk."])
    consumer = QdrantConsumer(settings, embedder=embedder, qdrant=qdrant)
    async with running_relay(settings, dsn) as relay, running(consumer):
        for name, check in [*relay.readiness_checks().items(), *consumer.readiness_checks().items()]:
            await check()  # /readyz: every check passes while both run
        assert {"kafka", "postgresql"} <= set(relay.readiness_checks()) and "qdrant" in consumer.readiness_checks()
        await wait_until_matches(dsn, qdrant, collection)
        embedded_before = consumer.stats.embedded
        assert embedded_before == 6
        before = (await all_points(qdrant, collection))[str(ids[1])]

        conn.execute("UPDATE chunks SET text = %s WHERE id = %s", ("Rewritten text about vector search.", ids[0]))
        conn.execute("UPDATE documents SET title = 'Renamed', metadata = %s WHERE id = %s", (Jsonb({"l": 1}), doc_id))
        conn.execute("UPDATE chunks SET metadata = %s WHERE id = %s", (Jsonb({"k": 2}), ids[2]))
        conn.execute("DELETE FROM chunks WHERE id = %s", (ids[3],))
        conn.execute("DELETE FROM documents WHERE id = %s", (other_doc,))  # cascades to its chunks
        await wait_until_matches(dsn, qdrant, collection)
        # only the rewritten text was embedded; title and metadata changes were payload-only
        assert consumer.stats.embedded - embedded_before == 1
        assert consumer.stats.payload_only >= 2
    # a retitled chunk is written again whole, with the vector it held and the newer version
    after = (await all_points(qdrant, collection))[str(ids[1])]
    assert after.payload["title"] == "Renamed" and after.vector == before.vector
    assert after.payload["outboxd"]["version"] > before.payload["outboxd"]["version"]
    assert after.payload["outboxd"]["truncated"] is before.payload["outboxd"]["truncated"] is False
    assert outbox_rows(conn) == []
    assert await assert_converged(dsn, qdrant, collection, embedder) == 3


async def test_two_consumers_in_one_group_share_partitions(conn, dsn, qdrant, collection, embedder, kafka_settings):
    settings = kafka_settings()
    for d in range(6):
        add_document(conn, [f"Document {d}, chunk {i}: shared partitions." for i in range(5)])
    a = QdrantConsumer(settings.model_copy(update={"worker_name": "a"}), embedder=embedder, qdrant=qdrant)
    b = QdrantConsumer(settings.model_copy(update={"worker_name": "b"}), embedder=embedder, qdrant=qdrant)
    async with running(a), running(b):
        await relay_drain(settings, dsn)
        await wait_until_matches(dsn, qdrant, collection)
        assigned_a = {tp.partition for tp in a.consumer.assignment()}
        assigned_b = {tp.partition for tp in b.consumer.assignment()}
    assert assigned_a and assigned_b and not assigned_a & assigned_b
    assert assigned_a | assigned_b == set(range(6))
    assert a.stats.records > 0 and b.stats.records > 0
    await assert_converged(dsn, qdrant, collection, embedder)


async def test_broker_restart_mid_stream_loses_nothing(
    conn, dsn, qdrant, collection, embedder, kafka_settings, kafka_broker
):
    if kafka_broker is None:
        pytest.skip("the broker is external (KAFKA_BOOTSTRAP_SERVERS) or a container: the test cannot restart it")
    settings = kafka_settings()
    add_document(conn, [f"Before the restart, chunk {i}." for i in range(10)])
    consumer = QdrantConsumer(settings, embedder=embedder, qdrant=qdrant)
    async with running_relay(settings, dsn), running(consumer):
        await wait_until_matches(dsn, qdrant, collection)
        await asyncio.to_thread(kafka_broker.stop)
        add_document(conn, [f"While the broker is down, chunk {i}." for i in range(10)])  # the relay retries
        conn.execute("DELETE FROM chunks WHERE text LIKE 'Before the restart, chunk 1%%'")
        await asyncio.sleep(2)
        await asyncio.to_thread(kafka_broker.start)
        add_document(conn, [f"After the restart, chunk {i}." for i in range(10)])
        await wait_until_matches(dsn, qdrant, collection, timeout=180)
    assert outbox_rows(conn) == []
    assert await assert_converged(dsn, qdrant, collection, embedder) == 29


async def test_bad_messages_go_to_the_dead_letter_topic(
    conn, dsn, qdrant, collection, embedder, kafka_settings, kafka_bootstrap
):
    from aiokafka import AIOKafkaProducer

    settings = kafka_settings()
    _, ids = add_document(conn, TEXTS)
    conn.execute("UPDATE chunks SET metadata = '[1, 2]' WHERE id = %s", (ids[0],))  # cannot be a payload
    await relay_drain(settings, dsn)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    bad_key = str(uuid.uuid4()).encode()
    try:
        await producer.send_and_wait(settings.kafka.topic, b"{not json", key=bad_key)
        await producer.send_and_wait(settings.kafka.topic, orjson.dumps({"schema": 99, "op": "upsert"}), key=bad_key)
        await producer.send_and_wait(settings.kafka.topic, orjson.dumps({"op": "upsert", "chunk_id": "x"}), key=bad_key)
    finally:
        await producer.stop()
    add_document(conn, ["Written after the bad messages."])
    consumer = QdrantConsumer(settings, embedder=embedder, qdrant=qdrant)
    async with running_relay(settings, dsn), running(consumer):
        want = {str(i) for i in ids[1:]}
        for _ in range(200):
            points = set(await all_points(qdrant, collection)) if await qdrant.collection_exists(collection) else set()
            if want <= points and len(points) == 4:
                break
            await asyncio.sleep(0.3)
    assert str(ids[0]) not in points and len(points) == 4

    dead = await read_topic(kafka_bootstrap, settings.kafka.dead_letter_topic)
    errors = {contract.header(r.headers, H_ERROR) for r in dead}
    # parking is at least once (a redelivery parks a message again), so count by origin:
    # the three bad messages and the bad chunk's, and nothing else
    sources = {contract.header(r.headers, H_SOURCE): contract.header(r.headers, H_ERROR) for r in dead}
    assert len(sources) == 4 and len(errors) == 4, [(contract.header(r.headers, H_SOURCE), r.value) for r in dead]
    assert consumer.stats.dead_letters >= 4
    assert any("not JSON" in e for e in errors)
    assert any("schema 99" in e and "upgrade the consumer" in e for e in errors)
    assert any("chunk_id" in e for e in errors)
    assert any("metadata is a JSON list" in e for e in errors)
    assert all(contract.header(r.headers, H_SOURCE).startswith(settings.kafka.topic + "/") for r in dead)


async def test_a_new_group_rebuilds_the_collection_from_the_compacted_topic(
    conn, dsn, qdrant, collection, embedder, kafka_settings, kafka_bootstrap
):
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    settings = kafka_settings()
    doc_id, ids = add_document(conn, TEXTS)
    await relay_drain(settings, dsn)
    conn.execute("UPDATE chunks SET text = 'Changed once.' WHERE id = %s", (ids[0],))
    conn.execute("UPDATE chunks SET text = 'Changed twice.' WHERE id = %s", (ids[0],))
    conn.execute("DELETE FROM chunks WHERE id = %s", (ids[1],))
    await relay_drain(settings, dsn)

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, settings.kafka.topic)])
        configs = {c[0]: c[1] for c in described.resources[0][4]}
    finally:
        await admin.close()
    assert configs["cleanup.policy"] == "compact"

    rebuilt = open_qdrant(":memory:")  # a Qdrant without this collection, a group that never ran
    try:
        fresh = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"group": settings.kafka.group + "-rebuild"})})
        async with running(QdrantConsumer(fresh, embedder=embedder, qdrant=rebuilt)):
            await wait_until_matches(dsn, rebuilt, collection)
        assert await assert_converged(dsn, rebuilt, collection, embedder) == 3
    finally:
        await rebuilt.close()


async def test_an_older_event_never_overwrites_a_newer_one(
    conn, dsn, qdrant, collection, embedder, kafka_settings, kafka_bootstrap
):
    """Two relays can publish one chunk out of order (one lost its lease); the
    consumer keeps the newest version, for upserts and deletes alike."""
    from aiokafka import AIOKafkaProducer

    settings = kafka_settings()
    _, [cid] = add_document(conn, ["The current text."])
    await relay_drain(settings, dsn)
    [current] = await read_topic(kafka_bootstrap, settings.kafka.topic)
    newest = contract.decode(current.value)
    older = newest.model_copy(
        update={"version": newest.version - 1, "chunk": newest.chunk.model_copy(update={"text": "A stale text."})}
    )
    stale_delete = contract.ChunkDeleted(**{**newest.model_dump(exclude={"op", "chunk"}), "version": newest.version - 2})
    consumer = QdrantConsumer(settings, embedder=embedder, qdrant=qdrant)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        async with running(consumer):
            # one at a time, so each reaches the apply core (within a batch the newest wins anyway)
            for seen, event in enumerate((older, stale_delete), start=2):
                await wait_for(lambda: consumer.stats.records >= seen - 1)
                await producer.send_and_wait(
                    settings.kafka.topic, contract.encode(event), str(cid).encode(), headers=contract.headers(event)
                )
            await wait_for(lambda: consumer.stats.records >= 3)
    finally:
        await producer.stop()
    assert consumer.stats.records == 3
    [point] = (await all_points(qdrant, collection)).values()
    assert point.payload["text"] == "The current text." and point.payload["outboxd"]["version"] == newest.version
    assert consumer.stats.older == 2


def test_status_reports_the_consumer_groups_lag(conn, dsn, kafka_settings, capsys, monkeypatch):
    """`outboxd status` with the Kafka transport: the consumer group's lag under `kafka`, and the
    relay's (the outbox backlog it has yet to publish) under `relay`."""
    from daemon import cli

    settings = kafka_settings()
    add_document(conn, TEXTS[:3])
    asyncio.run(relay_drain(settings, dsn))
    for variable, value in {
        "DATABASE_URL": dsn, "OUTBOXD_COLLECTION": settings.collection,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers, "OUTBOXD_KAFKA__TOPIC": settings.kafka.topic,
        "OUTBOXD_KAFKA__GROUP": settings.kafka.group,
    }.items():
        monkeypatch.setenv(variable, value)
    capsys.readouterr()
    assert cli.main(["status", "--json", *qdrant_flags(settings.local_qdrant_path)]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    kafka = doc["kafka"]
    assert "error" not in kafka, kafka
    assert kafka["consumer_lag"] == 3 and sum(kafka["partitions"].values()) == 3  # nothing consumed yet
    assert kafka["topic"] == settings.kafka.topic and kafka["group"] == settings.kafka.group
    relay = doc["relay"]  # the relay published everything: nothing left for it, no leases held
    assert (relay["transport"], relay["topic"], relay["backlog"], relay["lag_seconds"], relay["workers"]) == (
        "kafka", settings.kafka.topic, 0, 0.0, [])

    add_document(conn, ["A chunk the relay has not published yet."])
    assert cli.main(["status", "--json", *qdrant_flags(settings.local_qdrant_path), "--max-lag", "0"]) == 3
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["relay"]["backlog"] == 1 and doc["relay"]["lag_seconds"] > 0


async def test_two_relays_under_concurrent_writes_converge(conn, dsn, qdrant, collection, embedder, kafka_settings):
    """Several relay replicas (and two workers each) claim one outbox while the
    same chunks keep changing: whatever order their messages land in, the
    versions and the verified acknowledgement leave Qdrant on the final state."""
    settings = kafka_settings(batch_size=4, concurrency=2)
    _, ids = add_document(conn, [f"Chunk {i}, first version." for i in range(12)])
    consumer = QdrantConsumer(settings, embedder=embedder, qdrant=qdrant)
    a = settings.model_copy(update={"worker_name": "relay-a"})
    b = settings.model_copy(update={"worker_name": "relay-b"})
    async with running(consumer), running_relay(a, dsn), running_relay(b, dsn):
        for round_ in range(5):
            for i, cid in enumerate(ids):
                conn.execute("UPDATE chunks SET text = %s WHERE id = %s", (f"Chunk {i}, version {round_}.", cid))
            conn.execute("UPDATE documents SET title = %s", (f"Title {round_}",))
            await asyncio.sleep(0.05)
        conn.execute("DELETE FROM chunks WHERE id = ANY(%s)", (ids[:3],))
        await wait_until_matches(dsn, qdrant, collection)
    assert outbox_rows(conn) == []
    assert await assert_converged(dsn, qdrant, collection, embedder) == 9


async def test_a_missing_topic_is_an_error_when_creation_is_off(dsn, kafka_settings):
    from consumers.relay import Relay
    from daemon.errors import ConfigError

    settings = kafka_settings(kafka={"create_topics": False})
    relay = Relay(settings, dsn)
    try:
        with pytest.raises(ConfigError, match=r"do not exist and OUTBOXD_KAFKA__CREATE_TOPICS is false") as err:
            await relay.start()
        assert settings.kafka.topic in str(err.value)
    finally:
        await relay.close()


async def test_tail_prints_the_stream_filtered_by_document(conn, dsn, kafka_settings):
    import io

    from consumers.tail import TailConsumer

    settings = kafka_settings()
    doc_a, ids_a = add_document(conn, ["Alpha one.", "Alpha two."], title="Alpha")
    doc_b, ids_b = add_document(conn, ["Beta one."], title="Beta")
    await relay_drain(settings, dsn)  # published before the deletes: the tail learns whose chunks they are
    conn.execute("DELETE FROM chunks WHERE id = %s", (ids_a[0],))
    conn.execute("DELETE FROM chunks WHERE id = %s", (ids_b[0],))
    await relay_drain(settings, dsn)

    out = io.StringIO()  # doc A: two upserts, then the delete event and its tombstone
    tail = TailConsumer(settings, from_beginning=True, documents={doc_a}, limit=4, out=out)
    async with running(tail):
        await wait_for(lambda: tail.stop.is_set(), 30, "the 4th line of document A")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert sum(" upsert " in line and f"doc={doc_a}" in line for line in lines) == 2
    assert any(" delete " in line and f"chunk={ids_a[0]}" in line for line in lines)
    assert any("tombstone" in line and f"chunk={ids_a[0]}" in line for line in lines)
    assert not any(str(ids_b[0]) in line for line in lines)

    out = io.StringIO()
    tail = TailConsumer(settings, from_beginning=True, as_json=True, limit=1, out=out)
    async with running(tail):
        await wait_for(lambda: tail.stop.is_set(), 30)
    assert contract.decode(out.getvalue().strip().encode()).chunk_id in {*ids_a, *ids_b}


async def test_a_consumers_span_continues_the_relays_trace(conn, dsn, qdrant, collection, embedder, kafka_settings):
    """W3C trace context travels in the message headers: each outboxd.consume
    span belongs to the trace of the relay batch that published its messages."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from daemon.telemetry import setup_telemetry

    setup_telemetry("outboxd")  # the process's provider (idempotent): record what it makes from now on
    exporter = InMemorySpanExporter()
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))
    try:
        settings = kafka_settings()
        add_document(conn, TEXTS)
        await relay_drain(settings, dsn)
        async with running(QdrantConsumer(settings, embedder=embedder, qdrant=qdrant)):
            await wait_until_matches(dsn, qdrant, collection)
        spans = exporter.get_finished_spans()
    finally:
        exporter.shutdown()  # the processor stays on the process's provider; it keeps nothing more
    relay_traces = {s.context.trace_id for s in spans if s.name == "outboxd.batch"}
    consumed = [s for s in spans if s.name == "outboxd.consume"]
    assert relay_traces and consumed
    for s in consumed:
        assert s.context.trace_id in relay_traces and s.parent is not None, "a consumer span began a trace of its own"


async def test_a_stale_upsert_after_a_delete_does_not_bring_the_point_back(
    conn, dsn, qdrant, collection, embedder, kafka_settings, kafka_bootstrap
):
    """A deleted point keeps no version in Qdrant: the consumer remembers the
    versions of recent deletes, so a late upsert from another relay stays dropped."""
    from aiokafka import AIOKafkaProducer

    settings = kafka_settings()
    _, [cid] = add_document(conn, ["Soon deleted."])
    await relay_drain(settings, dsn)
    [published] = await read_topic(kafka_bootstrap, settings.kafka.topic)
    upsert = contract.decode(published.value)
    delete = contract.ChunkDeleted(**{**upsert.model_dump(exclude={"op", "chunk"}), "version": upsert.version + 10})
    stale = upsert.model_copy(update={"version": upsert.version + 5})
    consumer = QdrantConsumer(settings, embedder=embedder, qdrant=qdrant)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        async with running(consumer):
            for seen, event in enumerate((delete, stale), start=2):
                await wait_for(lambda: consumer.stats.records >= seen - 1, what=f"record {seen - 1} applied")
                await producer.send_and_wait(
                    settings.kafka.topic, contract.encode(event), str(cid).encode(), headers=contract.headers(event)
                )
            await wait_for(lambda: consumer.stats.records >= 3, what="the stale upsert consumed")
    finally:
        await producer.stop()
    assert await all_points(qdrant, collection) == {}
    assert consumer.stats.older == 1 and consumer.stats.deleted == 1
