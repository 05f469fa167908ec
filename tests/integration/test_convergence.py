"""End to end on real PostgreSQL, Qdrant and MiniLM: writes converge (invariants
2 and 7), through the same daemon the CLI runs."""
from __future__ import annotations

from psycopg.types.json import Jsonb

from tests.support import add_document, all_points, assert_converged, drain, outbox_rows

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
    assert daemon.stats.payload_only == 4
    await assert_converged(dsn, qdrant, collection, embedder)


async def test_identical_text_is_embedded_once(conn, dsn, qdrant, collection, embedder, make_settings):
    settings = make_settings(embed_cache_size=0)  # within one batch, not thanks to the cache
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
