"""Hostile chunks: what cannot become a point fails by name (the chunk, the
field, the limit), as a dead letter, in both the upsert and the payload-only
path, while the rest converge."""
from __future__ import annotations

import pytest
from psycopg.types.json import Jsonb

from daemon.core.chunk_state import MAX_METADATA_DEPTH
from tests.support import add_document, assert_converged, drain, outbox_rows

pytestmark = [pytest.mark.integration, pytest.mark.model]


def nested(depth: int) -> dict:
    value: dict = {"leaf": True}
    for i in range(depth - 1):
        value = {f"k{i % 3}": value}
    return value


def assert_named_dead_letter(conn, chunk_id) -> None:
    rows = outbox_rows(conn)
    assert {r["chunk_id"] for r in rows} == {chunk_id}
    assert {r["status"] for r in rows} == {"dead"}
    error = rows[0]["last_error"]
    assert str(chunk_id) in error and "metadata" in error and f"limit is {MAX_METADATA_DEPTH}" in error, error
    assert "RecursionError" not in error


async def test_deeply_nested_metadata_is_a_named_dead_letter_on_insert(conn, dsn, qdrant, collection, embedder, make_settings):
    _, ids = add_document(conn, ["a fine chunk", "a chunk with absurd metadata", "another fine chunk"])
    conn.execute("UPDATE chunks SET metadata = %s WHERE id = %s", (Jsonb(nested(500)), ids[1]))
    await drain(make_settings(max_attempts=1), dsn, embedder, qdrant)
    assert_named_dead_letter(conn, ids[1])
    points = {str(p.id) for p in (await qdrant.scroll(collection, limit=10))[0]}
    assert points == {str(ids[0]), str(ids[2])}


async def test_deeply_nested_metadata_is_a_named_dead_letter_on_a_payload_only_change(conn, dsn, qdrant, collection, embedder, make_settings):
    _, ids = add_document(conn, ["first", "second"])
    settings = make_settings(max_attempts=1)
    await drain(settings, dsn, embedder, qdrant)
    conn.execute("UPDATE chunks SET metadata = %s WHERE id = %s", (Jsonb(nested(MAX_METADATA_DEPTH + 1)), ids[0]))
    daemon = await drain(settings, dsn, embedder, qdrant)
    assert daemon.stats.embedded == 0
    assert_named_dead_letter(conn, ids[0])
    [point] = await qdrant.retrieve(collection, [str(ids[0])], with_payload=True)
    assert point.payload["metadata"] == {"i": 0}, "the point keeps its last good payload"


async def test_metadata_at_the_limit_is_accepted(conn, dsn, qdrant, collection, embedder, make_settings):
    _, ids = add_document(conn, ["deep but allowed"])
    conn.execute("UPDATE chunks SET metadata = %s WHERE id = %s", (Jsonb(nested(MAX_METADATA_DEPTH)), ids[0]))
    await drain(make_settings(), dsn, embedder, qdrant)
    assert outbox_rows(conn) == []
    await assert_converged(dsn, qdrant, collection, embedder)
