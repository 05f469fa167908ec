"""End to end on real PostgreSQL, Qdrant and MiniLM: writes converge (invariants
2 and 7), through the same daemon the CLI runs; on a server, over REST and
over gRPC (OUTBOXD_QDRANT__PREFER_GRPC)."""
from __future__ import annotations

import pytest
from psycopg.types.json import Jsonb

from tests.support import add_document, all_points, assert_converged, drain, open_qdrant, outbox_rows, server_settings

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture(params=["rest", "grpc"])
def transport(request) -> str:
    if request.param == "grpc" and server_settings() is None:
        pytest.skip("gRPC needs a Qdrant server: this session runs local mode")
    return request.param


@pytest.fixture
async def qdrant(collection, transport):
    """The session's Qdrant, over the transport the daemon uses too."""
    client = open_qdrant(":memory:", prefer_grpc=transport == "grpc")
    yield client
    await client.close()


@pytest.fixture
def make_settings(make_settings, transport):
    return lambda **overrides: make_settings(
        **{**overrides, "qdrant": {"prefer_grpc": transport == "grpc", **overrides.get("qdrant", {})}})

TEXTS = [
    "PostgreSQL is the system of record for every chunk.",
    "Qdrant stores one point per chunk, keyed by the chunk id.",
    "The outbox table is written in the same transaction as the chunk.",
    "Embeddings are computed only when the text changes.",
]


async def test_insert_update_delete_converge(conn, dsn, qdrant, collection, embedder, make_settings):
    settings = make_settings()
    doc_id, ids = add_document(conn, TEXTS, title="Guide", url="https://example.org/guide", document_type="html")
    await drain(settings, dsn, embedder, qdrant)
    assert await assert_converged(dsn, qdrant, collection, embedder) == 4
    assert outbox_rows(conn) == []

    conn.execute("UPDATE chunks SET text = %s WHERE id = %s", ("Rewritten text about vector search.", ids[0]))
    conn.execute("DELETE FROM chunks WHERE id = %s", (ids[1],))
    add_document(conn, ["A second document arrives later."])
    await drain(settings, dsn, embedder, qdrant)
    assert await assert_converged(dsn, qdrant, collection, embedder) == 4


async def test_payload_only_changes_never_embed(conn, dsn, qdrant, collection, embedder, make_settings):
    settings = make_settings()
    doc_id, ids = add_document(conn, TEXTS)
    await drain(settings, dsn, embedder, qdrant)

    conn.execute("UPDATE documents SET title = 'Renamed', url = 'https://example.org/x', metadata = %s WHERE id = %s",
                 (Jsonb({"lang": "en"}), doc_id))
    conn.execute("UPDATE chunks SET metadata = %s, chunk_index = chunk_index + 10 WHERE id = %s", (Jsonb({"k": 1}), ids[2]))
    daemon = await drain(settings, dsn, embedder, qdrant)
    assert daemon.stats.embedded == 0
    # 4 chunks; the retitled document's chunk that changed itself too may be written
    # once or twice, as its two events land in one claim or in the two workers' claims
    assert 4 <= daemon.stats.payload_only <= 5
    await assert_converged(dsn, qdrant, collection, embedder)


async def test_identical_text_is_embedded_once(conn, dsn, qdrant, collection, embedder, make_settings):
    settings = make_settings(embedding={"cache_size": 0})  # within one batch, not thanks to the cache
    embedder._cache.clear()  # the session's embedder may have seen these texts in another test
    text = "The same sentence, stored in many chunks."
    add_document(conn, [text] * 5 + ["something else entirely"])
    daemon = await drain(settings, dsn, embedder, qdrant)
    assert daemon.stats.upserted == 6
    assert daemon.stats.embedded == 2
    await assert_converged(dsn, qdrant, collection, embedder)


async def test_empty_and_whitespace_text_have_no_point(conn, dsn, qdrant, collection, embedder, make_settings):
    settings = make_settings()
    _, ids = add_document(conn, ["real text", "", "   \n\t "])
    await drain(settings, dsn, embedder, qdrant)
    assert set(await all_points(qdrant, collection)) == {str(ids[0])}

    conn.execute("UPDATE chunks SET text = '  ' WHERE id = %s", (ids[0],))
    conn.execute("UPDATE chunks SET text = 'now it has words' WHERE id = %s", (ids[1],))
    await drain(settings, dsn, embedder, qdrant)
    assert set(await all_points(qdrant, collection)) == {str(ids[1])}
    await assert_converged(dsn, qdrant, collection, embedder)


async def test_identical_text_after_restart_reuses_the_stored_vector(conn, dsn, qdrant, collection, embedder, make_settings):
    """Invariant 7 across restarts: with reuse_vectors, a text whose vector this model
    already stored under another chunk is not encoded again (cache empty, new daemon)."""
    settings = make_settings(reuse_vectors=True)
    text = "A sentence that a second document repeats word for word."
    add_document(conn, [text])
    await drain(settings, dsn, embedder, qdrant)

    embedder._cache.clear()  # what a restart does to the in-memory cache
    add_document(conn, [text, "and one new sentence"])
    second = await drain(settings, dsn, embedder, qdrant)
    assert (second.stats.embedded, second.stats.reused, second.stats.upserted) == (1, 1, 2)
    await assert_converged(dsn, qdrant, collection, embedder)


@pytest.mark.parametrize("transport", ["rest"], indirect=True)
def test_reuse_vectors_defaults_to_on_with_a_server_only(make_settings, tmp_path):
    """Local mode would scan every point per lookup, so reuse is on only with QDRANT_URL."""
    assert make_settings(qdrant={"path": tmp_path / "qdrant"}).reuse_stored_vectors is False  # beats QDRANT_URL
    assert make_settings(qdrant={"url": "http://qdrant:6333"}).reuse_stored_vectors is True
    assert make_settings(reuse_vectors=True).reuse_stored_vectors is True
