"""Native hybrid search: every point's BM25 vector, made by the Qdrant server from
the chunk's text, and searched with the dense one in one server-side fusion; the
sparse vector judged and repaired like the dense one (nothing embedded again);
an existing dense-only collection given its sparse vector in place; local mode's
fallback to PostgreSQL's keywords. Real PostgreSQL, the real Qdrant server (local
mode where the test is about it) and the real MiniLM."""
from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from qdrant_client import AsyncQdrantClient, models

from daemon import cli
from daemon.admin.reconcile import Reconciler, enqueue_repair
from daemon.core.chunk_state import Projection
from daemon.core.collection_shape import CollectionShape
from daemon.core.qdrant_store import QdrantStore
from daemon.core.settings import QdrantSettings
from daemon.corpus import load_corpus
from daemon.errors import ConfigError
from daemon.hybrid_search import SearchFilters, hybrid_search
from db.gateway import make_pool
from tests.support import add_document, all_points, assert_converged, drain, open_qdrant, require_server

pytestmark = [pytest.mark.integration]

RARE = "PGX-4471"  # an exact identifier in one gardening paragraph: dense search prefers lookalike codes


async def converge_corpus(dsn, qdrant, embedder, settings) -> dict:
    async with make_pool(dsn, application_name="outboxd:test", min_size=1, max_size=2) as pool:
        ids = await load_corpus(pool)
    await drain(settings, dsn, embedder, qdrant)
    return ids


async def test_hybrid_search_fuses_dense_and_bm25_in_qdrant(dsn, pool, qdrant, collection, embedder, make_settings):
    require_server()
    ids = await converge_corpus(dsn, qdrant, embedder, make_settings())
    docs = ids["documents"]
    rare = docs["greenhouse-tomatoes"]["chunk_ids"][2]
    # the bm25 vector alone, queried as any reader would: the server made it from the text
    by_keywords = await qdrant.query_points(collection, query=models.Document(text=RARE, model="qdrant/bm25"),
                                           using="bm25", limit=3)
    assert str(by_keywords.points[0].id) == str(rare)

    # dense alone ranks the code's chunk below look-alike codes; fused, it is in the top two (with
    # reciprocal ranks it ties with the look-alike the dense side ranks first: 1/(1+1) + 1/(1+4) each)
    dense = await hybrid_search(pool, qdrant, collection, embedder, RARE, limit=3, keywords="none")
    assert rare not in [h.chunk_id for h in dense[:2]]
    for fusion in ("rrf", "dbsf"):
        hits = await hybrid_search(pool, qdrant, collection, embedder, RARE, limit=3, keywords="qdrant", fusion=fusion)
        assert (hits.keywords, hits.fusion) == ("qdrant", fusion)
        assert rare in [h.chunk_id for h in hits[:2]]
        assert RARE in next(h.text for h in hits if h.chunk_id == rare)
    auto = await hybrid_search(pool, qdrant, collection, embedder, RARE, limit=3)
    assert auto.keywords == "qdrant" and rare in [h.chunk_id for h in auto[:2]]

    # a paraphrase sharing no word with its paragraph: the dense prefetch finds it
    eclipse = docs["solar-eclipses"]["chunk_ids"][0]
    hits = await hybrid_search(pool, qdrant, collection, embedder,
                               "the lunar shadow covering our star in the middle of the day", limit=3)
    assert eclipse in [h.chunk_id for h in hits]

    # the filter holds for both prefetches: no gardening chunk for the gardening code
    astronomy = {c for d in docs.values() if d["topic"] == "astronomy" for c in d["chunk_ids"]}
    hits = await hybrid_search(pool, qdrant, collection, embedder, RARE, limit=50,
                               filters=SearchFilters(metadata={"topic": "astronomy"}))
    assert hits and {h.chunk_id for h in hits} <= astronomy

    with pytest.raises(ValueError, match="does not go with qdrant"):
        await hybrid_search(pool, qdrant, collection, embedder, RARE, keywords="qdrant", fusion="weighted")


async def test_a_payload_only_change_embeds_nothing_and_leaves_both_vectors(conn, dsn, qdrant, collection, embedder,
                                                                            make_settings):
    require_server()
    settings = make_settings()
    doc, (chunk,) = add_document(conn, ["Bees cluster to keep the queen warm through the winter."], title="Bees")
    await drain(settings, dsn, embedder, qdrant)
    (before,) = await qdrant.retrieve(collection, [str(chunk)], with_vectors=True)
    conn.execute("UPDATE documents SET title = 'Bees in winter' WHERE id = %s", (doc,))
    daemon = await drain(settings, dsn, embedder, qdrant)
    assert (daemon.stats.embedded, daemon.stats.payload_only, daemon.stats.upserted) == (0, 1, 0)
    (after,) = await qdrant.retrieve(collection, [str(chunk)], with_vectors=True)
    assert after.payload["title"] == "Bees in winter"
    assert after.vector[""] == before.vector[""] and after.vector["bm25"] == before.vector["bm25"]
    assert after.payload["outboxd"]["truncated"] == before.payload["outboxd"]["truncated"]
    await assert_converged(dsn, qdrant, collection, embedder)


def test_a_dense_only_collection_gets_its_bm25_vectors_in_place_without_embedding(
        dsn, collection, embedder, make_settings, monkeypatch, capsys, caplog):
    """A collection made before sparse vectors (OUTBOXD_QDRANT__SPARSE=none then): a daemon
    with the default settings warns and keeps writing dense vectors; `collection --apply`
    adds the bm25 vector to the same collection (Qdrant 1.18's create_vector_name, no
    reindex); reconcile names each point missing_sparse, and its repair writes every
    point again with the vector it holds: nothing is embedded, and the alias never moves."""
    require_server()
    qdrant = open_qdrant(":memory:")

    async def converge(**qdrant_settings):
        return await converge_corpus(dsn, qdrant, embedder, make_settings(qdrant=qdrant_settings))

    ids = asyncio.run(converge(sparse="none"))
    chunks = sum(len(d["chunk_ids"]) for d in ids["documents"].values())
    physical = asyncio.run(qdrant.get_aliases()).aliases
    assert not asyncio.run(qdrant.get_collection(collection)).config.params.sparse_vectors

    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("OUTBOXD_COLLECTION", collection)
    with caplog.at_level(logging.WARNING):
        asyncio.run(drain(make_settings(), dsn, embedder, qdrant))
    assert any("has no sparse vector 'bm25'" in r.getMessage() for r in caplog.records)

    capsys.readouterr()
    assert cli.main(["collection", "--check"]) == 3
    assert "sparse: configured bm25, the collection has none (can change in place)" in capsys.readouterr().out
    assert cli.main(["collection", "--apply"]) == 0
    assert "bm25" in asyncio.run(qdrant.get_collection(collection)).config.params.sparse_vectors
    capsys.readouterr()
    assert cli.main(["reconcile", "--check", "--json"]) == 3
    report = orjson.loads(capsys.readouterr().out)
    assert report["counts"]["missing_sparse"] == chunks and report["drift"] == chunks
    assert cli.main(["reconcile", "--repair", "--json"]) == 0
    daemon = asyncio.run(drain(make_settings(), dsn, embedder, qdrant))
    assert (daemon.stats.embedded, daemon.stats.rewritten) == (0, chunks)
    asyncio.run(assert_converged(dsn, qdrant, collection, embedder))
    assert asyncio.run(qdrant.get_aliases()).aliases == physical  # the same collection, read all along
    asyncio.run(qdrant.close())


async def test_other_bm25_settings_are_drift_that_a_repair_fixes_without_embedding(
        dsn, qdrant, collection, embedder, make_settings):
    require_server()
    ids = await converge_corpus(dsn, qdrant, embedder, make_settings())
    chunks = sum(len(d["chunk_ids"]) for d in ids["documents"].values())
    german = make_settings(qdrant={"bm25_language": "german"})
    projection = Projection(embedder.fingerprint.id, german.qdrant.sparse_id())
    async with make_pool(dsn, application_name="outboxd:test", min_size=1, max_size=2) as pool:
        report = await Reconciler(pool, qdrant, (await qdrant.get_aliases()).aliases[0].collection_name,
                                  projection).run()
        assert report.counts["wrong_sparse"] == chunks
        report = await Reconciler(pool, qdrant, (await qdrant.get_aliases()).aliases[0].collection_name,
                                  projection).run(enqueue_repair(pool))
    daemon = await drain(german, dsn, embedder, qdrant)
    assert (daemon.stats.embedded, daemon.stats.rewritten) == (0, chunks)
    await assert_converged(dsn, qdrant, collection, embedder, sparse=german.qdrant.sparse_id())
    assert german.qdrant.sparse_id() != QdrantSettings().sparse_id()


async def test_points_of_the_earlier_payload_layout_are_rewritten_without_embedding(
        conn, dsn, qdrant, collection, embedder, make_settings):
    """Points an outboxd before the bookkeeping group wrote (every key at the top): a repair
    writes them again whole in today's layout with the vector each holds."""
    settings = make_settings()
    add_document(conn, ["The first paragraph.", "The second paragraph."], title="Old layout")
    await drain(settings, dsn, embedder, qdrant)
    points = await all_points(qdrant, collection)
    for pid, point in points.items():
        old = {**{k: v for k, v in point.payload.items() if k not in ("outboxd", "text_cut")},
               **{k: v for k, v in point.payload["outboxd"].items() if k not in ("text_chars", "sparse")}}
        await qdrant.overwrite_payload(collection, old, points=[pid], wait=True)
    async with make_pool(dsn, application_name="outboxd:test", min_size=1, max_size=2) as pool:
        target = (await qdrant.get_aliases()).aliases[0].collection_name
        store = QdrantStore(qdrant, collection, target, shape=CollectionShape.of(settings))
        report = await Reconciler(pool, qdrant, target, await store.projection(embedder.fingerprint.id)).run(
            enqueue_repair(pool))
    assert report.counts["stale"] == 2
    daemon = await drain(settings, dsn, embedder, qdrant)
    assert (daemon.stats.embedded, daemon.stats.rewritten) == (0, 2)
    await assert_converged(dsn, qdrant, collection, embedder)
    assert all("content_hash" not in p.payload for p in (await all_points(qdrant, collection)).values())


async def test_local_mode_has_no_sparse_vector_and_search_takes_postgres_keywords(
        dsn, pool, collection, embedder, make_settings, caplog):
    qdrant = AsyncQdrantClient(location=":memory:")
    ids = await converge_corpus(dsn, qdrant, embedder, make_settings(qdrant={"path": ":memory:"}))
    await assert_converged(dsn, qdrant, collection, embedder, sparse=None)
    with caplog.at_level(logging.INFO, logger="daemon.hybrid_search"):
        for _ in range(2):
            hits = await hybrid_search(pool, qdrant, collection, embedder, RARE, limit=3)
            assert hits.keywords == "postgres" and hits[0].chunk_id == ids["documents"]["greenhouse-tomatoes"][
                "chunk_ids"][2]
    said = [r for r in caplog.records if r.name == "daemon.hybrid_search" and "PostgreSQL" in r.getMessage()]
    assert len(said) == 1
    with pytest.raises(ConfigError, match="no 'bm25' sparse vector"):
        await hybrid_search(pool, qdrant, collection, embedder, RARE, keywords="qdrant")
    await qdrant.close()
