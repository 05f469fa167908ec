"""The event contract of the chunk topic: what the relay writes is what a
consumer reads, and what is not a chunk event is refused with a reason."""
from __future__ import annotations

import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import orjson
import pytest

from consumers import contract
from consumers.kafka_clients import client_options, topic_specs
from consumers.qdrant_consumer import UNVERSIONED, parse
from consumers.settings import StreamSettings
from daemon.core.chunk_state import ChunkState
from daemon.errors import ConfigError, is_transient

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def state(**over) -> ChunkState:
    values = dict(
        chunk_id=uuid.uuid4(), document_id=uuid.uuid4(), source_id=uuid.uuid4(), chunk_index=3,
        text="Some text.", token_count=2, content_hash="ab" * 32, metadata={"lang": "en"}, title="T",
        url=None, document_type="html", state_hash="cd" * 16,
    )
    values.update(over)
    return ChunkState(**values)


def upsert(s: ChunkState, version: int = 7) -> contract.ChunkUpserted:
    return contract.ChunkUpserted(
        event_id=41, version=version, chunk_id=s.chunk_id, changed_at=NOW, relayed_at=NOW,
        chunk=contract.chunk_from_state(s),
    )


def record(value, key, headers=()):
    return SimpleNamespace(value=value, key=key, headers=list(headers), partition=0, offset=0, topic="t")


def test_an_upsert_round_trips_to_the_same_chunk_state():
    s = state()
    event = upsert(s)
    decoded = contract.decode(contract.encode(event))
    assert decoded == event
    assert contract.state_from_event(decoded) == s
    assert orjson.loads(contract.encode(event))["schema"] == contract.SCHEMA_VERSION


def test_a_delete_carries_no_chunk_and_its_headers_carry_the_version():
    cid = uuid.uuid4()
    event = contract.ChunkDeleted(event_id=1, version=9, chunk_id=cid, changed_at=NOW, relayed_at=NOW)
    assert contract.decode(contract.encode(event)) == event
    assert "chunk" not in orjson.loads(contract.encode(event))
    assert contract.tombstone_version(str(cid).encode(), contract.headers(event)) == (cid, 9)


@pytest.mark.parametrize(
    "value, reason",
    [
        (b"{oops", "not JSON"),
        (orjson.dumps({"schema": 2, "op": "upsert"}), "schema 2 is not 1"),
        (orjson.dumps({"op": "rename"}), "not a chunk event"),
        (orjson.dumps({"op": "upsert", "event_id": 1, "version": 1, "chunk_id": str(uuid.uuid4()),
                       "changed_at": NOW.isoformat(), "relayed_at": NOW.isoformat()}), "chunk: Field required"),
        (orjson.dumps([1, 2]), "not a chunk event"),
    ],
)
def test_what_is_not_a_chunk_event_is_refused_with_the_reason(value, reason):
    with pytest.raises(contract.BadMessage, match=reason):
        contract.decode(value)


def test_the_consumer_reads_tombstones_and_refuses_mismatched_keys():
    cid = uuid.uuid4()
    assert parse(record(None, str(cid).encode(), [(contract.H_VERSION, b"12")])) == (cid, 12, None)
    assert parse(record(None, str(cid).encode())) == (cid, UNVERSIONED, None)  # a foreign tombstone deletes
    with pytest.raises(contract.BadMessage, match="not a chunk id"):
        parse(record(None, b"not-a-uuid"))
    s = state()
    with pytest.raises(contract.BadMessage, match="is not the event's chunk id"):
        parse(record(contract.encode(upsert(s)), str(uuid.uuid4()).encode()))
    assert parse(record(contract.encode(upsert(s, 5)), str(s.chunk_id).encode())) == (s.chunk_id, 5, s)


def test_kafka_options_come_from_the_settings():
    s = StreamSettings(kafka={"bootstrap_servers": "a:9092,b:9092"}, worker_name="w1")
    opts = client_options(s, suffix="-relay")
    assert opts["bootstrap_servers"] == ["a:9092", "b:9092"] and opts["client_id"] == "outboxd-w1-relay"
    sasl = StreamSettings(kafka={
        "bootstrap_servers": "a:9092", "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u", "sasl_password": "p",
    })
    assert client_options(sasl)["sasl_plain_password"] == "p"
    with pytest.raises(ConfigError, match="KAFKA_SASL_PASSWORD"):
        client_options(StreamSettings(kafka={"bootstrap_servers": "a:9092", "security_protocol": "SASL_SSL"}))
    with pytest.raises(ConfigError, match="KAFKA_BOOTSTRAP_SERVERS is not set"):
        client_options(StreamSettings(kafka={"bootstrap_servers": None}))


def test_the_chunk_topic_is_compacted_and_the_dead_letters_are_not():
    s = StreamSettings(kafka={"topic": "chunks.v1"})
    specs = topic_specs(s)
    assert specs["chunks.v1"]["cleanup.policy"] == "compact"
    assert specs["chunks.v1.dlq"]["cleanup.policy"] == "delete"


def test_kafka_outages_are_transient_and_oversized_messages_are_not():
    from aiokafka import errors

    assert is_transient(errors.KafkaConnectionError())
    assert is_transient(errors.KafkaTimeoutError())
    assert is_transient(errors.NotLeaderForPartitionError())
    assert not is_transient(errors.MessageSizeTooLargeError())


def test_recent_delete_versions_keep_the_newest_and_a_bounded_number():
    from consumers.qdrant_consumer import RecentVersions

    recent = RecentVersions(2)
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    recent.remember(a, 5)
    recent.remember(a, 3)  # an older delete never lowers it
    recent.remember(b, 7)
    recent.remember(c, 9)  # a is the least recent: forgotten
    assert dict(recent) == {b: 7, c: 9}
