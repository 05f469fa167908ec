"""Hybrid search on real PostgreSQL, Qdrant and MiniLM over the shipped corpus:
known queries find their chunk in the top 3 (one only keyword search finds,
one only vector search finds), both fusion modes, every filter on both sides,
the stale-result guard, the model-mismatch refusal, and `outboxd search`."""
from __future__ import annotations

import asyncio

import orjson
import pytest

from daemon import cli
from daemon.config import Settings
from daemon.corpus import corpus_documents, load_corpus
from daemon.embedding import torch_backend
from daemon.embedding.embedder import Embedder
from daemon.embedding.torch_backend import encode_now
from daemon.errors import ModelMismatchError
from daemon.hybrid_search import SearchFilters, hybrid_search
from db.gateway import make_pool
from tests.support import add_document, drain, open_qdrant, qdrant_choice, qdrant_flags, server_settings

# (query, document slug, paragraph index of the right chunk, which searches can find it)
KNOWN_QUERIES = [
    ("transactional outbox dual write", "transactional-outbox", 1, "both"),
    ("serialization failure deadlock retry", "postgres-troubleshooting", 1, "both"),
    ("point-in-time recovery", "database-backups", 1, "both"),
    ("kafka consumer group rebalance", "kafka-basics", 1, "vector"),
    ("how do bees survive the winter", "beekeeping", 2, "vector"),
    # An exact identifier in a gardening note: the vector search prefers the
    # proxy error codes that look like it (PGX-4470, PGX-4417, ...).
    ("PGX-4471", "greenhouse-tomatoes", 2, "keyword only"),
    # A paraphrase sharing no word with the eclipse paragraph it describes.
    ("the lunar shadow covering our star in the middle of the day", "solar-eclipses", 0, "vector only"),
]
async def pg_search(*args, **kwargs):
    """The search with PostgreSQL's keywords, fused here (what local mode takes by itself), asked for by name:
    its ranks are the two lists' own. Native hybrid in Qdrant: tests/integration/test_native_hybrid.py."""
    return await hybrid_search(*args, **{"keywords": "postgres", **kwargs})


KEYWORD_ONLY = next(q for q in KNOWN_QUERIES if q[3] == "keyword only")
VECTOR_ONLY = next(q for q in KNOWN_QUERIES if q[3] == "vector only")


@pytest.fixture
async def corpus(pool, dsn, qdrant, embedder, make_settings):
    """The shipped corpus, loaded and converged into Qdrant."""
    ids = await load_corpus(pool)
    await drain(make_settings(), dsn, embedder, qdrant)
    return ids


def chunk(corpus, slug: str, index: int):
    return corpus["documents"][slug]["chunk_ids"][index]


async def test_corpus_is_varied_and_each_paragraph_is_a_chunk(conn, pool):
    """About thirty documents on many topics and types; load_corpus stores one chunk per paragraph."""
    docs = corpus_documents()
    assert len(docs) >= 30
    assert len({d["topic"] for d in docs}) >= 10 and len({d["document_type"] for d in docs}) >= 5
    ids = await load_corpus(pool)
    assert set(ids["documents"]) == {d["slug"] for d in docs}
    assert ids["chunk_count"] == sum(len(d["paragraphs"]) for d in docs)
    rows = conn.execute(
        "SELECT d.source_id, count(*), count(DISTINCT c.document_id), bool_and(c.search_vector IS NOT NULL), "
        "bool_and(c.token_count > 0) FROM chunks c JOIN documents d ON d.id = c.document_id GROUP BY 1"
    ).fetchall()
    assert rows == [(ids["source_id"], ids["chunk_count"], len(docs), True, True)]
    sourdough = ids["documents"]["sourdough-bread"]["chunk_ids"]
    assert conn.execute(
        "SELECT chunk_index, metadata FROM chunks WHERE id = %s", (sourdough[1],)
    ).fetchone() == (1, {"topic": "cooking", "paragraph": 2})


@pytest.mark.parametrize("fusion", ["weighted", "rrf"])
async def test_known_queries_rank_the_right_chunk_in_the_top_3(corpus, pool, qdrant, collection, embedder, fusion):
    """Each known query's chunk is among the first three hybrid results, with both fusion methods."""
    for text, slug, index, _ in KNOWN_QUERIES:
        hits = await pg_search(pool, qdrant, collection, embedder, text, limit=3, fusion=fusion)
        assert chunk(corpus, slug, index) in [h.chunk_id for h in hits], (
            f"{text!r}: expected {slug}[{index}] in the top 3, got {[(h.title, h.chunk_index) for h in hits]}"
        )


async def test_fusion_matters_keyword_only_and_vector_only_targets(corpus, pool, qdrant, collection, embedder, conn):
    """The keyword-only target is outside the vector top 3 but first by keyword; the vector-only
    target is absent from the keyword list (it shares no lexeme with its query); hybrid ranks both."""
    text, slug, index, _ = KEYWORD_ONLY
    hits = await pg_search(pool, qdrant, collection, embedder, text, limit=10)
    target = next(h for h in hits if h.chunk_id == chunk(corpus, slug, index))
    assert target.keyword_rank == 1
    assert target.vector_rank is None or target.vector_rank > 3
    assert hits.index(target) < 3
    vector_top3 = [h for h in hits if h.vector_rank in (1, 2, 3)]
    assert len(vector_top3) == 3 and target not in vector_top3

    text, slug, index, _ = VECTOR_ONLY
    hits = await pg_search(pool, qdrant, collection, embedder, text, limit=10)
    target = next(h for h in hits if h.chunk_id == chunk(corpus, slug, index))
    assert target.keyword_rank is None and target.vector_rank <= 3 and hits.index(target) < 3
    query_lexemes, chunk_lexemes = conn.execute(
        "SELECT tsvector_to_array(to_tsvector('english', %s)), tsvector_to_array(search_vector) "
        "FROM chunks WHERE id = %s",
        (text, target.chunk_id),
    ).fetchone()
    assert query_lexemes and not set(query_lexemes) & set(chunk_lexemes)


async def test_hits_carry_the_chunk_and_document_fields(corpus, pool, qdrant, collection, embedder):
    """A hit is the chunk as PostgreSQL has it: ids, title, url, type, index and full text; scores descend."""
    hits = await pg_search(pool, qdrant, collection, embedder, "transactional outbox dual write", limit=5)
    assert len(hits) == 5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    top = hits[0]
    doc = corpus["documents"]["transactional-outbox"]
    assert (top.chunk_id, top.document_id, top.source_id) == (doc["chunk_ids"][1], doc["id"], corpus["source_id"])
    assert (top.title, top.document_type, top.chunk_index) == (doc["title"], "article", 1)
    assert top.url.endswith("/transactional-outbox")
    assert top.text.startswith("The transactional outbox removes the dual write.") and len(top.text) > 200
    assert (top.vector_rank, top.keyword_rank) == (1, 1) and top.score == pytest.approx(1.0)


async def test_source_and_document_filters(corpus, conn, dsn, pool, qdrant, collection, embedder, make_settings):
    """--source keeps another source's near-duplicate out; --document keeps one document's chunks."""
    other_doc, (other_chunk,) = add_document(
        conn, ["Transactional outbox, transactional outbox: the outbox ends the dual write, every dual write."],
        title="Copy",
    )
    await drain(make_settings(), dsn, embedder, qdrant)
    query = "transactional outbox dual write"
    unfiltered = await pg_search(pool, qdrant, collection, embedder, query, limit=5)
    copy = next(h for h in unfiltered if h.chunk_id == other_chunk)
    assert copy.keyword_rank == 1 and copy.vector_rank <= 2

    only_corpus = await pg_search(pool, qdrant, collection, embedder, query, limit=5,
                                      filters=SearchFilters(source_id=corpus["source_id"]))
    assert len(only_corpus) == 5 and {h.source_id for h in only_corpus} == {corpus["source_id"]}
    # Both searches were filtered, not just the answer: the ranks are ranks among the corpus alone.
    assert (only_corpus[0].chunk_id, only_corpus[0].vector_rank, only_corpus[0].keyword_rank) == (
        chunk(corpus, "transactional-outbox", 1), 1, 1)

    kafka = corpus["documents"]["kafka-basics"]
    in_doc = await pg_search(pool, qdrant, collection, embedder, query, limit=10,
                                 filters=SearchFilters(document_id=kafka["id"]))
    assert sorted(h.chunk_id for h in in_doc) == sorted(kafka["chunk_ids"])
    assert sorted(h.vector_rank for h in in_doc) == [1, 2, 3]  # Qdrant searched only this document
    only_other = await pg_search(pool, qdrant, collection, embedder, query,
                                     filters=SearchFilters(document_id=other_doc))
    assert [(h.chunk_id, h.vector_rank, h.keyword_rank) for h in only_other] == [(other_chunk, 1, 1)]


async def test_document_type_and_metadata_filters(corpus, pool, qdrant, collection, embedder):
    """--document-type and --metadata restrict both searches: every hit matches, and the ranks
    are ranks within the filtered candidates."""
    recipes = {c for d in corpus["documents"].values() if d["document_type"] == "recipe" for c in d["chunk_ids"]}
    hits = await pg_search(pool, qdrant, collection, embedder, "water", limit=50,
                               filters=SearchFilters(document_type="recipe"))
    assert {h.chunk_id for h in hits} == recipes and {h.document_type for h in hits} == {"recipe"}
    assert sorted(h.vector_rank for h in hits) == list(range(1, len(recipes) + 1))
    keyword_ranked = sorted(h.keyword_rank for h in hits if h.keyword_rank)
    assert keyword_ranked == list(range(1, len(keyword_ranked) + 1)) and keyword_ranked  # "water" is in recipes

    astronomy = {c for d in corpus["documents"].values() if d["topic"] == "astronomy" for c in d["chunk_ids"]}
    hits = await pg_search(pool, qdrant, collection, embedder, "PGX-4471", limit=50,
                               filters=SearchFilters(metadata={"topic": "astronomy"}))
    assert {h.chunk_id for h in hits} == astronomy and all(h.keyword_rank is None for h in hits)

    first_cooking = {d["chunk_ids"][0] for d in corpus["documents"].values() if d["topic"] == "cooking"}
    hits = await pg_search(pool, qdrant, collection, embedder, "water", limit=50, fusion="rrf",
                               filters=SearchFilters(metadata={"topic": "cooking", "paragraph": 1}))
    assert {h.chunk_id for h in hits} == first_cooking
    assert sorted(h.vector_rank for h in hits) == list(range(1, len(first_cooking) + 1))


async def test_stale_guard_deleted_changed_and_refiltered_chunks(corpus, conn, pool, qdrant, collection, embedder):
    """Before the daemon catches up: a deleted chunk is not returned although its point is still in
    Qdrant; a changed chunk shows its new text; a document whose type changed leaves the type filter."""
    from daemon.core.qdrant_store import QdrantStore

    sink = QdrantStore(qdrant, collection)
    sink.collection = await sink.resolve()

    gone = chunk(corpus, *KEYWORD_ONLY[1:3])
    hits = await pg_search(pool, qdrant, collection, embedder, "PGX-4471", limit=10)
    assert next(h for h in hits if h.chunk_id == gone).vector_rank is not None  # Qdrant finds it
    conn.execute("DELETE FROM chunks WHERE id = %s", (gone,))
    assert str(gone) in await sink.payloads([str(gone)])  # and still has it
    hits = await pg_search(pool, qdrant, collection, embedder, "PGX-4471", limit=10)
    assert gone not in [h.chunk_id for h in hits] and len(hits) == 10

    changed = chunk(corpus, "kafka-basics", 1)
    new_text = "Consumer groups were rewritten: this paragraph now says something else entirely."
    conn.execute("UPDATE chunks SET text = %s WHERE id = %s", (new_text, changed))
    hits = await pg_search(pool, qdrant, collection, embedder, "kafka consumer group rebalance", limit=3)
    hit = next(h for h in hits if h.chunk_id == changed)
    assert hit.text == new_text and hit.vector_rank is not None  # found by its old vector, shown as it is now

    emptied = chunk(corpus, "kafka-basics", 0)
    conn.execute("UPDATE chunks SET text = '  ' WHERE id = %s", (emptied,))
    hits = await pg_search(pool, qdrant, collection, embedder, "kafka consumer group rebalance", limit=10)
    assert emptied not in [h.chunk_id for h in hits]

    beekeeping = corpus["documents"]["beekeeping"]
    filters = SearchFilters(document_type="guide")
    before = await pg_search(pool, qdrant, collection, embedder, "bees", limit=3, filters=filters)
    assert {h.document_id for h in before} == {beekeeping["id"]}
    conn.execute("UPDATE documents SET document_type = 'article', title = 'Bees, renamed' WHERE id = %s",
                 (beekeeping["id"],))
    after = await pg_search(pool, qdrant, collection, embedder, "bees", limit=3, filters=filters)
    assert beekeeping["id"] not in {h.document_id for h in after}
    unfiltered = await pg_search(pool, qdrant, collection, embedder, "bees", limit=3)
    assert {h.title for h in unfiltered} == {"Bees, renamed"}  # the current title, not the payload's


async def test_a_different_model_is_refused_with_both_fingerprints(conn, dsn, pool, qdrant, collection, embedder,
                                                                  make_settings):
    """A query embedder whose fingerprint differs (a 128-token window) is refused before any search,
    naming the collection's model, the configured one, and what to set."""
    add_document(conn, ["one chunk, so that the collection exists"])
    await drain(make_settings(), dsn, embedder, qdrant)
    other = Embedder(Settings(database_url=None, embedding={"max_seq_length": 128}))
    await other.load()
    try:
        with pytest.raises(ModelMismatchError) as info:
            await pg_search(pool, qdrant, collection, other, "anything")
    finally:
        await other.close()
    message = str(info.value)
    assert str(embedder.fingerprint) in message and str(other.fingerprint) in message
    assert "OUTBOXD_EMBEDDING__MAX_SEQ_LENGTH=256" in message and "reindex" in message


async def test_bad_arguments_are_value_errors(corpus, pool, qdrant, collection, embedder):
    """An empty query, a weight outside [0, 1] or an unknown fusion is refused plainly."""
    for kwargs in ({"query": "  "}, {"query": "x", "vector_weight": 1.5}, {"query": "x", "fusion": "borda"},
                   {"query": "x", "limit": 0}):
        with pytest.raises(ValueError):
            await pg_search(pool, qdrant, collection, embedder, **kwargs)


def test_cli_search_json_table_filters_and_mismatch(conn, dsn, collection, embedder, make_settings, tmp_path,
                                                    capsys, monkeypatch):
    """`outboxd search --json` is one document with the ranked hits; the table names the columns;
    --document-type/--metadata filter; the model loads without encoding a sample; another model exits 78."""
    path = tmp_path / "qdrant"  # in local mode, on disk, so the CLI can open it once the test closed it

    async def load_and_converge():
        async with make_pool(dsn, application_name="outboxd:test", min_size=1, max_size=1) as pool:
            ids = await load_corpus(pool)
        client = open_qdrant(path)
        await drain(make_settings(**qdrant_choice(path)), dsn, embedder, client)
        await client.close()
        return ids

    ids = asyncio.run(load_and_converge())
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("OUTBOXD_COLLECTION", collection)
    base = ["search", *qdrant_flags(path)]
    capsys.readouterr()

    assert cli.main(base + ["--json", "--limit", "3", "PGX-4471"]) == 0
    doc = orjson.loads(capsys.readouterr().out)  # auto: Qdrant's own BM25 on a server, else PostgreSQL's
    native = server_settings() is not None
    assert (doc["keywords"], doc["fusion"]) == (("qdrant", "rrf") if native else ("postgres", "weighted"))
    # (reciprocal ranks: the code's chunk ties with the look-alike code the dense side ranks first)
    assert str(ids["documents"]["greenhouse-tomatoes"]["chunk_ids"][2]) in [h["chunk_id"] for h in doc["hits"][:2]]

    assert cli.main(base + ["--json", "--keywords", "postgres", "--limit", "3", "PGX-4471"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert (doc["query"], doc["keywords"], doc["fusion"], doc["vector_weight"]) == (
        "PGX-4471", "postgres", "weighted", 0.7)
    assert len(doc["hits"]) == 3
    first = doc["hits"][0]
    assert first["chunk_id"] == str(ids["documents"]["greenhouse-tomatoes"]["chunk_ids"][2])
    assert first["title"] == "Growing tomatoes under glass" and "PGX-4471" in first["text"]
    assert first["keyword_rank"] == 1 and set(first) >= {"score", "vector_rank", "document_id", "source_id", "url"}

    assert cli.main(base + ["--json", "--fusion", "rrf", "--document-type", "recipe",
                            "--metadata", "paragraph=1", "water"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    recipes = {str(d["chunk_ids"][0]) for d in ids["documents"].values() if d["document_type"] == "recipe"}
    assert {h["chunk_id"] for h in doc["hits"]} == recipes and doc["vector_weight"] is None
    assert doc["filters"]["metadata"] == {"paragraph": 1}

    monkeypatch.setenv("COLUMNS", "200")  # room for each title on one line (piped, tables are 100 wide)
    assert cli.main(base + ["--limit", "2", "--keywords", "postgres", "transactional outbox dual write"]) == 0
    out = capsys.readouterr().out
    for column in ("rank", "score", "vector rank", "keyword rank", "title", "excerpt"):
        assert column in out
    assert "The transactional outbox pattern" in out and "removes the dual write" in out
    if native:  # fused in Qdrant, which returns no rank per prefetch: no columns for them
        assert cli.main(base + ["--limit", "2", "transactional outbox dual write"]) == 0
        out = capsys.readouterr().out
        assert "Qdrant's BM25, reciprocal rank fusion in Qdrant" in out and "vector rank" not in out
        assert "The transactional outbox pattern" in out

    assert cli.main(base + ["--fusion", "borda", "anything"]) == 2  # a usage error, before anything runs
    assert cli.main(base + ["--keywords", "postgres", "--fusion", "dbsf", "anything"]) == 2  # the server's own
    assert "does not go with postgres's keywords" in capsys.readouterr().err
    assert cli.main(base + ["--document", "not-a-uuid", "anything"]) == 2
    assert "is not a valid UUID" in capsys.readouterr().err

    # a search encodes its query alone: no sample checking a lower precision against fp32 at the load
    checks = []
    monkeypatch.setattr(torch_backend, "encode_now", lambda *a, **k: checks.append(1) or encode_now(*a, **k))
    monkeypatch.setenv("OUTBOXD_EMBEDDING__BACKEND", "sentence-transformers")
    monkeypatch.setenv("OUTBOXD_EMBEDDING__PRECISION", "bf16")
    assert cli.main(base + ["--json", "--keywords", "postgres", "PGX-4471"]) == 0
    assert orjson.loads(capsys.readouterr().out)["hits"][0]["chunk_id"] == first["chunk_id"] and checks == []
    monkeypatch.delenv("OUTBOXD_EMBEDDING__PRECISION")

    monkeypatch.setenv("OUTBOXD_EMBEDDING__MAX_SEQ_LENGTH", "128")
    assert cli.main(base + ["anything"]) == 78
    assert "OUTBOXD_EMBEDDING__MAX_SEQ_LENGTH=256" in capsys.readouterr().err
