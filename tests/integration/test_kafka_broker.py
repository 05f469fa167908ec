"""The Kafka broker the tests get (kafka_bootstrap / kafka_broker in conftest):
idempotent produce and keyed consume through aiokafka, and committed data and
group offsets surviving a broker restart."""
from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

PARTITIONS = 3


async def create_topic(bootstrap: str, partitions: int = PARTITIONS) -> str:
    name = f"outboxd-test-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        meta = await admin.describe_topics([name])
        assert len(meta[0]["partitions"]) == partitions
    finally:
        await admin.close()
    return name


def idempotent_producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", request_timeout_ms=20000)


async def produce(producer: AIOKafkaProducer, topic: str, messages: list[tuple[bytes, bytes]]) -> dict[bytes, set[int]]:
    """Send in order, wait for each ack; return the partitions each key went to."""
    partitions: dict[bytes, set[int]] = {}
    for key, value in messages:
        md = await producer.send_and_wait(topic, value, key=key)
        partitions.setdefault(key, set()).add(md.partition)
    return partitions


async def read_all(bootstrap: str, topic: str, count: int, timeout: float = 20.0) -> list:
    """Every record of the topic from the beginning (no group), until `count` arrived."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        await consumer.seek_to_beginning()
        return await drain(consumer, count, timeout)
    finally:
        await consumer.stop()


async def drain(consumer: AIOKafkaConsumer, count: int, timeout: float) -> list:
    records = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(records) < count:
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"read {len(records)} of {count} records in {timeout}s")
        batches = await consumer.getmany(timeout_ms=int(min(left, 1.0) * 1000))
        for batch in batches.values():
            records.extend(batch)
    # nothing beyond what was produced
    extra = await consumer.getmany(timeout_ms=300)
    records.extend(r for batch in extra.values() for r in batch)
    return records


def keyed(batch: str, n: int, keys: int = 3) -> list[tuple[bytes, bytes]]:
    return [(f"key-{i % keys}".encode(), f"{batch}-{i}".encode()) for i in range(n)]


async def test_idempotent_produce_and_keyed_consume(kafka_bootstrap):
    topic = await create_topic(kafka_bootstrap)
    messages = keyed("a", 12, keys=4)

    producer = idempotent_producer(kafka_bootstrap)
    await producer.start()
    try:
        placed = await produce(producer, topic, messages)
    finally:
        await producer.stop()
    assert all(len(p) == 1 for p in placed.values()), f"a key went to more than one partition: {placed}"

    records = await read_all(kafka_bootstrap, topic, len(messages))
    assert sorted((r.key, r.value) for r in records) == sorted(messages)
    for r in records:
        assert {r.partition} == placed[r.key]
    # per key, the order of sending (one partition per key, in offset order)
    for key in placed:
        got = [r.value for r in sorted((r for r in records if r.key == key), key=lambda r: r.offset)]
        assert got == [v for k, v in messages if k == key]


async def test_committed_data_and_offsets_survive_a_broker_restart(kafka_bootstrap, kafka_broker):
    if kafka_broker is None:
        pytest.skip("the broker is external (KAFKA_BOOTSTRAP_SERVERS) or a container: this test cannot restart it")
    topic = await create_topic(kafka_bootstrap)
    group = f"outboxd-test-{uuid.uuid4().hex[:8]}"
    first, second = keyed("before", 6), keyed("after", 6)

    producer = idempotent_producer(kafka_bootstrap)
    await producer.start()
    try:
        await produce(producer, topic, first)

        # a group reads the first batch and commits
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=kafka_bootstrap, group_id=group,
            enable_auto_commit=False, auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            got = await drain(consumer, len(first), 20.0)
            await consumer.commit()
        finally:
            await consumer.stop()
        assert sorted(r.value for r in got) == sorted(v for _, v in first)

        await asyncio.to_thread(kafka_broker.restart)

        # the same producer (idempotent, same producer id) goes on after the restart
        await produce(producer, topic, second)
    finally:
        await producer.stop()

    # the group resumes from its committed offsets: only the second batch
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, group_id=group,
        enable_auto_commit=False, auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        got = await drain(consumer, len(second), 20.0)
    finally:
        await consumer.stop()
    assert sorted(r.value for r in got) == sorted(v for _, v in second)

    # and everything is still there, exactly once
    records = await read_all(kafka_bootstrap, topic, len(first) + len(second))
    assert sorted((r.key, r.value) for r in records) == sorted(first + second)
