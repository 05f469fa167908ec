"""Figure 13: search at a million chunks, and figure 1e: the pipeline with the
sparse vector on.

13. N chunks (100,000, then grown to 1,000,000 in a full run) in a real
    content database with outboxd's schema (PostgreSQL full text:
    chunks.search_vector) and on a fresh Qdrant server from the tests' binary,
    in the collection outboxd's own QdrantStore creates (the model's dense
    vector unnamed, the sparse vector `bm25` with IDF, computed by the server
    from each chunk's whole text); the payload is outboxd's projection of the
    chunk (ChunkState.payload), checked on a sample with plan(). Loaded
    directly: PostgreSQL by COPY with the capture triggers off, Qdrant by
    batched upserts over gRPC (the pipeline would spend hours embedding a
    million chunks on this CPU; figures 1 and 8 measure it).

    The data: the real model's vectors of the shipped corpus's text windows
    (figures_qdrant.corpus_texts) and synthetic vectors around them, made as
    figures_qdrant.vector_set makes them (a real vector plus noise shaped by
    the real vectors' covariance, at a cosine of about 0.85 to it), streamed
    in blocks so a million fit in little memory. Each chunk's text is the
    window its vector came from followed by one to eight consecutive sentences
    of the same corpus document, so BM25 and PostgreSQL's full text read real
    words in real order. The queries: 200 phrases of two to six words of the
    corpus's sentences, embedded once by the real model; the searches read
    those vectors back through the Embedder seam (a lookup backend under the
    real model's fingerprint), so a query's time is the search's, not the model's.

    For each size and quantization (none, scalar int8 with rescoring; one
    collection switched in place by QdrantStore.reshape, as `outboxd
    collection --apply` does), the server restarted on its storage and each
    query searched through the library (daemon.hybrid_search.hybrid_search),
    one at a time, the three ways interleaved: dense only (keywords="none"),
    native hybrid (keywords="qdrant", RRF in the server) and PostgreSQL-fused
    hybrid (keywords="postgres"): p50 and p99. Then the server's RSS (before
    any exact search, which reads every original vector), and the recall@10
    of the dense search against exact search (SearchParams(exact=True)).
    A profiled pass records where a query's time goes: the Qdrant calls the
    library makes (their wall time in the client, and the server's own `time`
    from each REST response), the rest (PostgreSQL, Python).

1e. The pipeline of figure 1 (real model, default claim batch) with the
    sparse vector on ([qdrant] sparse = "bm25", the default on a server)
    against dense only (sparse = "none"), alternating runs on the same server.

    python -m tests.benchmarks.search_scale --out docs/benchmarks/search_scale.json   # 100k, then 1M
    python -m tests.benchmarks.search_scale --quick --out search_scale_quick.json     # tiny: checks the code
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import os
import platform
import pstats
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import psutil
import psycopg
from qdrant_client import AsyncQdrantClient, QdrantClient, models

from daemon.config import Settings
from daemon.core.chunk_state import BOOKKEEPING, ChunkState, Projection
from daemon.core.collection_shape import SPARSE_VECTOR, CollectionShape
from daemon.core.plan import Action, plan
from daemon.core.qdrant_connect import make_client
from daemon.core.qdrant_store import QdrantStore, Upserts
from daemon.core.settings import QdrantSettings
from daemon.corpus import corpus_documents
from daemon.embedding.backend import Backend, BackendInfo, Encoded
from daemon.embedding.embedder import Embedder
from daemon.hybrid_search import hybrid_search
from db.gateway import make_pool
from tests.benchmarks import e2e_throughput
from tests.benchmarks.figures_qdrant import (
    NEEDS_BINARY,
    corpus_texts,
    percentile,
    recall_at_k,
    server_memory,
    top_ids,
    wait_optimized,
)
from tests.benchmarks.services import NEEDS_SERVER, Postgres, QdrantTarget, cpu_of, load_average, settings_for
from tests.qdrant_server import QdrantServer, find_binary

ALIAS = "chunks"
CHUNKS_PER_DOCUMENT = 20
DOCUMENTS_PER_SOURCE = 50
BLOCK = 10_000  # chunks generated at a time; a multiple of CHUNKS_PER_DOCUMENT
UPLOAD_BATCH = 256
MODES = {  # the library's searches, by the name the figures give them
    "dense": {"keywords": "none"},
    "native_hybrid": {"keywords": "qdrant", "fusion": "rrf"},
    "postgres_hybrid": {"keywords": "postgres"},
}
POOL = 2  # connections: a hybrid search holds two at once
QUANTIZATIONS = ("none", "scalar")
# per search, not counted: enough for each connection to run every query more often than psycopg's
# prepare threshold (5), after which a prepared query may be planned once for all parameters
WARM_QUERIES = 30
MODE_BUDGET_S = 180.0  # a search is left out once it took this long in all (a pathological plan, say)
PROFILED_QUERIES = 50
HNSW_EFS = (128, 256, 512)
PROFILE_BUDGET_S = 60.0


# --- the data ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Material:
    """The shipped corpus cut up: text windows (each with the document it comes
    from) and each document's sentences."""

    windows: list[str]
    document_of: list[int]
    sentences: list[list[str]]
    documents: list[dict]


def material(real: int | None = None, seed: int = 13) -> Material:
    docs = corpus_documents()
    joined = [" ".join(re.findall(r"\S+", " ".join(d["paragraphs"]))) for d in docs]
    windows = corpus_texts()
    if real is not None and real < len(windows):
        keep = sorted(random.Random(seed).sample(range(len(windows)), real))
        windows = [windows[i] for i in keep]
    document_of = [next(k for k, text in enumerate(joined) if w in text) for w in windows]
    sentences = [[s for p in d["paragraphs"] for s in re.split(r"(?<=[.!?])\s+", p) if s] for d in docs]
    return Material(windows, document_of, sentences, docs)


def query_phrases(m: Material, n: int, seed: int = 29) -> list[str]:
    """n distinct phrases of two to six consecutive words of the corpus's sentences,
    each with a word of five letters or more (a phrase of stopwords finds nothing)."""
    rng = random.Random(seed)
    every = [s for doc in m.sentences for s in doc]
    found: dict[str, None] = {}
    while len(found) < n:
        words = re.findall(r"[A-Za-z][A-Za-z'-]*", rng.choice(every))
        size = rng.randint(2, 6)
        if len(words) < size:
            continue
        start = rng.randrange(len(words) - size + 1)
        phrase = " ".join(words[start:start + size])
        if any(len(w) >= 5 for w in words[start:start + size]):
            found[phrase.lower()] = None
    return list(found)


def say(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", flush=True)


def _uuid(kind: str, i: int) -> uuid.UUID:
    return uuid.UUID(bytes=hashlib.blake2b(f"{kind} {i}".encode(), digest_size=16).digest(), version=4)


@dataclass
class Block:
    ids: list[uuid.UUID]
    document: list[int]  # the benchmark's document number of each chunk
    texts: list[str]
    vectors: np.ndarray


class Chunks:
    """Chunk i of the benchmark, the same for any i whatever was made before it:
    generated in blocks of BLOCK, each from its own seeded generator. The first
    chunks are the real windows with their real vectors; each later one has a
    parent window (of its document's corpus document) and a vector made from the
    parent's, as figures_qdrant.vector_set makes its synthetic vectors."""

    def __init__(self, m: Material, real_vectors: np.ndarray, seed: int = 12) -> None:
        self.m = m
        self.seed = seed
        self.base = real_vectors / np.linalg.norm(real_vectors, axis=1, keepdims=True)
        centred = self.base - self.base.mean(axis=0)
        cov = centred.T @ centred / max(1, len(self.base) - 1)
        self.shape = np.linalg.cholesky(cov + 1e-6 * np.eye(cov.shape[0], dtype=cov.dtype)).astype(np.float32)
        self.scale = 0.62 / float(np.sqrt(np.trace(cov)))  # cosine about 0.85 to the parent (see vector_set)
        self.by_document = [[i for i, d in enumerate(m.document_of) if d == k] for k in range(len(m.documents))]
        self.by_document = [w or list(range(len(m.windows))) for w in self.by_document]

    def corpus_document(self, document: int) -> int:
        """Which corpus document the benchmark's document `document` is made of."""
        first = document * CHUNKS_PER_DOCUMENT
        if first < len(self.m.windows):
            return self.m.document_of[first]
        return int(np.random.default_rng([self.seed, 1, document]).integers(len(self.m.documents)))

    def block(self, k: int) -> Block:
        rng = np.random.default_rng([self.seed, 0, k])
        lo = k * BLOCK
        ids, documents, texts, parents = [], [], [], []
        for i in range(lo, lo + BLOCK):
            document = i // CHUNKS_PER_DOCUMENT
            if i < len(self.m.windows):
                parent = i
            else:
                choices = self.by_document[self.corpus_document(document)]
                parent = choices[int(rng.integers(len(choices)))]
            own = self.m.sentences[self.m.document_of[parent]]
            start, many = int(rng.integers(len(own))), int(rng.integers(1, 9))
            tail = " ".join(own[(start + j) % len(own)] for j in range(many))
            ids.append(_uuid("chunk", i))
            documents.append(document)
            texts.append(f"{self.m.windows[parent]} {tail}")
            parents.append(parent)
        parent_vectors = self.base[parents]
        noise = rng.standard_normal(parent_vectors.shape, dtype=np.float32) @ self.shape.T
        vectors = parent_vectors + self.scale * noise
        real = min(BLOCK, max(0, len(self.m.windows) - lo))
        vectors[:real] = parent_vectors[:real]
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return Block(ids, documents, texts, vectors.astype(np.float32))

    def rows(self, lo: int, hi: int):
        """(i, id, document, text, vector) of chunks lo..hi-1."""
        for k in range(lo // BLOCK, (hi + BLOCK - 1) // BLOCK):
            b = self.block(k)
            for j in range(max(lo, k * BLOCK) - k * BLOCK, min(hi, (k + 1) * BLOCK) - k * BLOCK):
                yield k * BLOCK + j, b.ids[j], b.document[j], b.texts[j], b.vectors[j]

    def document_row(self, document: int) -> tuple:
        """(id, source id, title, document_type, url) of the benchmark's document."""
        d = self.m.documents[self.corpus_document(document)]
        return (_uuid("document", document), _uuid("source", document // DOCUMENTS_PER_SOURCE),
                f"{d['title']} ({document})", d["document_type"], f"https://example.org/{d['slug']}/{document}")

    def state(self, i: int, chunk_id: uuid.UUID, document: int, text: str) -> ChunkState:
        """What outboxd.chunk_state reads for this chunk (state_hash aside, which no payload holds)."""
        doc_id, source_id, title, document_type, url = self.document_row(document)
        d = self.m.documents[self.corpus_document(document)]
        return ChunkState(chunk_id=chunk_id, document_id=doc_id, source_id=source_id,
                          chunk_index=i % CHUNKS_PER_DOCUMENT, text=text, token_count=len(text.split()),
                          content_hash=hashlib.sha256(text.encode()).hexdigest(), metadata=self.metadata(i, d),
                          title=title, url=url, document_type=document_type, state_hash="")

    @staticmethod
    def metadata(i: int, d: dict) -> dict:
        return {"topic": d["topic"], "paragraph": i % CHUNKS_PER_DOCUMENT + 1}


# --- loading ------------------------------------------------------------------------------------
GIN_INDEX = "idx_chunks_search_vector"


def load_postgres(dsn: str, chunks: Chunks, lo: int, hi: int) -> dict:
    """Chunks lo..hi-1 (their sources and documents) by COPY, the capture triggers
    off (the full-text trigger on: it fills search_vector); the full-text index
    dropped during the load and built again after it, as a bulk load does."""
    started = time.perf_counter()
    first_doc, end_doc = -(-lo // CHUNKS_PER_DOCUMENT), -(-hi // CHUNKS_PER_DOCUMENT)
    with psycopg.connect(dsn, autocommit=True) as conn:
        definition = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (GIN_INDEX,)).fetchone()[0]
        capture = [r[0] for r in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'public.chunks'::regclass AND tgname LIKE 'outboxd_capture%%' "
            "AND tgenabled <> 'D'")]
        for name in capture:
            conn.execute(f"ALTER TABLE public.chunks DISABLE TRIGGER {name}")
        conn.execute(f"DROP INDEX {GIN_INDEX}")
        try:
            with conn.transaction():
                made = (first_doc - 1) // DOCUMENTS_PER_SOURCE if first_doc else -1  # by an earlier load
                sources = sorted({d // DOCUMENTS_PER_SOURCE for d in range(first_doc, end_doc)} - set(range(made + 1)))
                with conn.cursor().copy("COPY sources (id, source_type, url) FROM STDIN") as copy:
                    for s in sources:
                        copy.write_row((_uuid("source", s), "api", f"https://example.org/source/{s}"))
                with conn.cursor().copy("COPY documents (id, source_id, title, document_type, url, total_chunks) "
                                        "FROM STDIN") as copy:
                    for d in range(first_doc, end_doc):
                        copy.write_row((*chunks.document_row(d), CHUNKS_PER_DOCUMENT))
                with conn.cursor().copy("COPY chunks (id, document_id, chunk_index, text, token_count, metadata) "
                                        "FROM STDIN") as copy:
                    for i, chunk_id, document, text, _ in chunks.rows(lo, hi):
                        meta = Chunks.metadata(i, chunks.m.documents[chunks.corpus_document(document)])
                        copy.write_row((chunk_id, _uuid("document", document), i % CHUNKS_PER_DOCUMENT, text,
                                        len(text.split()), orjson.dumps(meta).decode()))
            copied = time.perf_counter() - started
            conn.execute(definition)
        finally:
            for name in capture:
                conn.execute(f"ALTER TABLE public.chunks ENABLE TRIGGER {name}")
        conn.execute("ANALYZE public.sources, public.documents, public.chunks")
        size = conn.execute("SELECT pg_total_relation_size('public.chunks')").fetchone()[0]
    return {"chunks": hi - lo, "copy_s": round(copied, 1), "seconds": round(time.perf_counter() - started, 1),
            "chunks_table_mib": round(size / 2**20, 1)}


def load_qdrant(client: QdrantClient, collection: str, chunks: Chunks, lo: int, hi: int,
                projection: Projection, sparse: dict | None) -> dict:
    """Chunks lo..hi-1 upserted in batches, each point as outboxd's store writes it
    (QdrantStore's Upserts: the dense vector unnamed, the text for the server to
    make the BM25 vector of; `sparse`: its options)."""
    started = time.perf_counter()
    batch = Upserts()
    for i, chunk_id, document, text, vector in chunks.rows(lo, hi):
        payload = chunks.state(i, chunk_id, document, text).payload(projection)
        payload[BOOKKEEPING]["truncated"] = False
        batch.add(str(chunk_id), vector.tolist(), payload, text)
        if len(batch) == UPLOAD_BATCH or i == hi - 1:
            client.batch_update_points(collection, [batch.operation(sparse)], wait=True)
            batch = Upserts()
    seconds = time.perf_counter() - started
    return {"points": hi - lo, "upload_s": round(seconds, 1), "points_per_s": round((hi - lo) / seconds)}


def check_sample(dsn: str, client: QdrantClient, collection: str, chunks: Chunks, n: int, projection: Projection,
                 size: int = 200) -> dict:
    """A sample of the points, judged by outboxd's own plan() against what
    PostgreSQL's chunk_state says now: every one agrees and has a sparse vector."""
    ids = [str(_uuid("chunk", i)) for i in random.Random(n).sample(range(n), min(size, n))]
    with psycopg.connect(dsn, row_factory=psycopg.rows.dict_row) as conn:
        rows = conn.execute("SELECT * FROM outboxd.chunk_state WHERE chunk_id = ANY(%s::uuid[])", (ids,)).fetchall()
    points = {str(p.id): p for p in client.retrieve(collection, ids, with_payload=True, with_vectors=[SPARSE_VECTOR])}
    verdicts = Counter(plan(ChunkState.from_row(r), points[str(r["chunk_id"])].payload, projection).action.value
                       for r in rows)
    sparse = sum(1 for p in points.values() if len((p.vector or {}).get(SPARSE_VECTOR, models.SparseVector(
        indices=[], values=[])).indices) > 0)
    assert len(rows) == len(ids) and verdicts == {Action.NOTHING.value: len(ids)} and sparse == len(ids), \
        (len(rows), verdicts, sparse)
    return {"sampled": len(ids), "plans": dict(verdicts), "with_sparse_vector": sparse}


# --- searching ------------------------------------------------------------------------------------
class LookupBackend(Backend):
    """The real model's vectors of known queries, read back: the search's time
    without the model's (measured once, beside the figures)."""

    kind = "lookup"

    def __init__(self, info: BackendInfo, vectors: dict[str, np.ndarray]) -> None:
        self.info = info
        self.vectors = vectors

    async def load(self) -> BackendInfo:
        return self.info

    async def encode(self, texts: list[str]) -> Encoded:
        return Encoded(np.stack([self.vectors[t] for t in texts]), [False] * len(texts))

    async def close(self) -> None:
        return None


class TimedQdrant:
    """A proxy around the library's client that, while `on`, records each call's
    name and wall time and, over REST, the server's own `time` of each search
    (read by an httpx hook on the client's private transport; a benchmark may
    reach in where a product must not)."""

    def __init__(self, client: AsyncQdrantClient) -> None:
        self._client = client
        self.on = False
        self.calls: list[tuple[str, float]] = []
        self.server_s: list[float] = []
        http = getattr(getattr(getattr(client._client, "openapi_client", None), "client", None), "_async_client", None)
        if http is not None:
            http.event_hooks = {"response": [self._response]}

    async def _response(self, response) -> None:
        if self.on and "/points/query" in response.request.url.path:
            await response.aread()
            self.server_s.append(float(orjson.loads(response.content).get("time", 0.0)))

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not (callable(attr) and asyncio.iscoroutinefunction(attr)):
            return attr

        async def timed(*args, **kwargs):
            if not self.on:
                return await attr(*args, **kwargs)
            started = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                self.calls.append((name, time.perf_counter() - started))

        return timed


@contextmanager
def _sync_client(server: QdrantServer):
    client = QdrantClient(url=server.url, prefer_grpc=True, grpc_port=server.grpc_port, timeout=600,
                          check_compatibility=False)
    try:
        yield client
    finally:
        client.close()


def _settings(dsn: str, server: QdrantServer, prefer_grpc: bool, quantization: str) -> Settings:
    return Settings(database_url=dsn, collection=ALIAS, log_level="WARNING",
                    qdrant={"url": server.url, "grpc_port": server.grpc_port, "prefer_grpc": prefer_grpc,
                            "quantization": quantization})


def _library_options(settings: Settings) -> dict:
    """What `outboxd search` passes the library besides the query (daemon/commands/search.py)."""
    return {"search_params": CollectionShape.of(settings).search_params(),
            "sparse_options": settings.qdrant.bm25_options()}


def _summary(seconds: list[float], budget_spent: bool) -> dict:
    if not seconds:
        return {"samples": 0, "stopped_at_its_time_budget": budget_spent}
    return {"p50_ms": round(percentile(seconds, 50) * 1000, 2), "p99_ms": round(percentile(seconds, 99) * 1000, 2),
            "mean_ms": round(sum(seconds) / len(seconds) * 1000, 2), "max_ms": round(max(seconds) * 1000, 2),
            "samples": len(seconds), "stopped_at_its_time_budget": budget_spent}


async def _prepared(pool) -> list[dict]:
    """How PostgreSQL planned the queries each connection of the pool prepared."""
    rows = []
    async with AsyncExitStack() as stack:
        for _ in range(POOL):
            conn = await stack.enter_async_context(pool.connection())
            rows += await (await conn.execute(
                "SELECT CASE WHEN statement LIKE '%%websearch_to_tsquery%%' THEN 'search_keyword' "
                "WHEN statement LIKE '%%= ANY(%%' THEN 'search_hits' ELSE left(statement, 60) END AS query, "
                "generic_plans, custom_plans FROM pg_prepared_statements")).fetchall()
    return [dict(r) for r in rows]


async def _searches(settings: Settings, dsn: str, info: BackendInfo, queries: dict[str, np.ndarray], repeats: int,
                    cpu: dict[str, Callable[[], float | None]]) -> dict:
    """Every query through the library, one at a time, the searches interleaved
    (their order turning with each query) so that the machine's load falls on
    each alike: WARM_QUERIES first, not counted, then `repeats` rounds, a search
    left out of the rest once it took MODE_BUDGET_S in all (its warm-up too);
    then the profiled pass (profile()), on the same connections, of the searches
    that stayed within their budget."""
    embedder = Embedder(settings, backend=LookupBackend(info, queries))
    await embedder.load()
    common = _library_options(settings)
    client = TimedQdrant(make_client(settings))
    pool = make_pool(dsn, application_name="outboxd:bench-search", min_size=POOL, max_size=POOL)
    await pool.open()
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    warm: dict[str, list[float]] = {m: [] for m in MODES}
    spent = Counter()
    dense_ids: dict[str, set] = {}
    keyword_hits = 0
    texts = list(queries)

    async def search(mode: str, text: str) -> tuple[list, float]:
        started = time.perf_counter()
        hits = await hybrid_search(pool, client, ALIAS, embedder, text, limit=10, **common, **MODES[mode])
        return hits, time.perf_counter() - started

    try:
        rounds = [texts[:WARM_QUERIES]] + [texts] * repeats
        for round_, these in enumerate(rounds):
            for q, text in enumerate(these):
                names = list(MODES)
                for mode in names[q % len(names):] + names[:q % len(names)]:
                    if mode != "dense" and spent[mode] > MODE_BUDGET_S:  # the dense search's hits make the recall
                        continue
                    hits, took = await search(mode, text)
                    spent[mode] += took
                    if round_ == 0:
                        warm[mode].append(round(took * 1000, 1))
                        continue
                    seconds[mode].append(took)
                    if round_ == 1 and mode == "dense":
                        dense_ids[text] = {str(h.chunk_id) for h in hits}
                    elif round_ == 1 and mode == "postgres_hybrid":
                        keyword_hits += any(h.keyword_rank for h in hits)
        prepared = await _prepared(pool)
        profile = await _profile(search, client, texts, cpu, [m for m in MODES if spent[m] <= MODE_BUDGET_S])
    finally:
        await pool.close()
        await client.close()
        await embedder.close()
    return {"latency": {m: _summary(s, spent[m] > MODE_BUDGET_S) for m, s in seconds.items()},
            "warm_up_ms": warm, "dense_ids": [dense_ids[t] for t in texts],
            "queries_with_a_keyword_hit": keyword_hits, "prepared_statements": prepared, "profile": profile}


async def _profile(search, client: TimedQdrant, texts: list[str], cpu: dict[str, Callable[[], float | None]],
                   modes: list[str]) -> dict:
    """Up to PROFILED_QUERIES queries per search (PROFILE_BUDGET_S at most), under
    a cProfile and the TimedQdrant: the Qdrant calls the library made (client
    wall time, the server's own time), the CPU of each process (`cpu`: name ->
    its CPU seconds so far), and the client-side functions that took longest."""
    out = {}
    for mode in modes:
        client.calls.clear()
        client.server_s.clear()
        client.on = True
        profiler = cProfile.Profile()
        cpu_before = {k: f() for k, f in cpu.items()}
        started = time.perf_counter()
        n = 0
        profiler.enable()
        for text in texts[:PROFILED_QUERIES]:
            await search(mode, text)
            n += 1
            if time.perf_counter() - started > PROFILE_BUDGET_S:
                break
        profiler.disable()
        total = time.perf_counter() - started
        cpu_after = {k: f() for k, f in cpu.items()}
        client.on = False
        by_call: dict[str, list[float]] = {}
        for name, s in client.calls:
            by_call.setdefault(name, []).append(s)
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(12)
        out[mode] = {
            "queries": n, "mean_ms_under_the_profiler": round(total / n * 1000, 2),
            "qdrant_calls_per_query": {k: round(len(v) / n, 2) for k, v in by_call.items()},
            "qdrant_client_ms_per_query": {k: round(sum(v) / n * 1000, 2) for k, v in by_call.items()},
            "qdrant_server_ms_per_query": round(sum(client.server_s) / n * 1000, 2) if client.server_s else None,
            "cpu_ms_per_query": {k: round((cpu_after[k] - cpu_before[k]) / n * 1000, 2) for k in cpu
                                 if cpu_before[k] is not None and cpu_after[k] is not None},
            "cprofile_top_tottime": [line.strip() for line in stream.getvalue().splitlines()
                                     if re.match(r"\s*\d+(/\d+)?\s+\d", line)][:12],
        }
    return out


def _keyword_matches(dsn: str, texts: list[str]) -> dict:
    """How many chunks PostgreSQL's full text matches per query (all words
    required, as websearch_to_tsquery reads them): what its ranking must sort."""
    counts = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for t in texts:
            counts.append(conn.execute("SELECT count(*) FROM public.chunks "
                                       "WHERE search_vector @@ websearch_to_tsquery('english', %s)", (t,)).fetchone()[0])
    ranked = sorted(zip(counts, texts, strict=True))
    counts = [c for c, _ in ranked]
    return {"queries": len(counts), "p50": counts[len(counts) // 2], "max": counts[-1],
            "none": sum(1 for c in counts if c == 0), "median_query": ranked[len(ranked) // 2][1]}


def _exact(client: QdrantClient, collection: str, queries: np.ndarray) -> tuple[list[set], list[float]]:
    """Each query's exact top 10 (SearchParams(exact=True)), and the mean cosine of the first and the tenth."""
    found, first, tenth = [], [], []
    for lo in range(0, len(queries), 50):
        answers = client.query_batch_points(collection, [
            models.QueryRequest(query=q.tolist(), limit=10, params=models.SearchParams(exact=True))
            for q in queries[lo:lo + 50]])
        for a in answers:
            found.append({p.id for p in a.points})
            first.append(a.points[0].score)
            tenth.append(a.points[-1].score)
    return found, [round(float(np.mean(first)), 3), round(float(np.mean(tenth)), 3)]


def measure(server: QdrantServer, pg: Postgres, collection: str, dsn: str, info: BackendInfo,
            queries: dict[str, np.ndarray], quantization: str, repeats: int, prefer_grpc: bool) -> dict:
    """One configuration: the server restarted on its storage, the searches and
    the profiled pass, the server's RSS, the recall of the dense search."""
    out: dict = {"quantization": quantization, "load_average_before": load_average()}
    server.restart()
    with _sync_client(server) as client:
        # grey: a restarted server holds its optimizations back until the next write; there is none to run
        wait_optimized(client, collection, quiet=1.0, done=(models.CollectionStatus.GREEN, models.CollectionStatus.GREY))
        out["after_restart"] = server_memory(server.pid)
        settings = _settings(dsn, server, prefer_grpc, quantization)
        qdrant = psutil.Process(server.pid)
        cpu = {"qdrant_server": lambda: cpu_of([qdrant]), "postgresql": pg.cpu_seconds, "client": time.process_time}
        searched = asyncio.run(_searches(settings, dsn, info, queries, repeats, cpu))
        out.update({k: v for k, v in searched.items() if k != "dense_ids"})
        # before any exact search, which reads every original vector into memory
        out["after_queries"] = server_memory(server.pid)
        vectors = np.stack(list(queries.values()))
        exact, out["exact_mean_cosine_top1_top10"] = _exact(client, collection, vectors)
        out["recall_at_10_dense"] = recall_at_k(exact, searched["dense_ids"])
        out["after_exact_search"] = server_memory(server.pid)
        # where the recall goes: Qdrant's own top 10 (the library asks for its candidates, 50), and with a
        # wider HNSW search (hnsw_ef; Qdrant's default is the index's ef_construct, 100), which outboxd has no
        # setting for
        params = CollectionShape(QdrantSettings(quantization=quantization)).search_params()
        quantized = params.quantization if params is not None else None
        out["recall_at_10_qdrant_top_10"] = recall_at_k(exact, top_ids(client, collection, vectors, params))
        for ef in HNSW_EFS:
            wider = top_ids(client, collection, vectors, models.SearchParams(hnsw_ef=ef, quantization=quantized))
            out[f"recall_at_10_qdrant_top_10_hnsw_ef_{ef}"] = recall_at_k(exact, wider)
    out["load_average_after"] = load_average()
    return out


async def _reshape(url: str, grpc_port: int, collection: str, quantization: str) -> list[str]:
    """Switch the collection's quantization in place, as `outboxd collection --apply` does."""
    shape = CollectionShape(QdrantSettings(quantization=quantization))
    client = AsyncQdrantClient(url=url, grpc_port=grpc_port, timeout=600, check_compatibility=False)
    try:
        store = QdrantStore(client, ALIAS, collection, shape=shape)
        differences = [d for d in shape.differences(await client.get_collection(collection))
                       if d.name.startswith("quantization")]
        await store.reshape(differences)
    finally:
        await client.close()
    return [str(d) for d in differences]


async def _create(url: str, grpc_port: int, embedder: Embedder) -> tuple[str, Projection]:
    """The collection and its alias, as the daemon creates them on a server (default
    [qdrant] and [payload] settings), and what its points hold beside the chunk."""
    client = AsyncQdrantClient(url=url, grpc_port=grpc_port, timeout=600, check_compatibility=False)
    try:
        store = QdrantStore(client, ALIAS, shape=CollectionShape())
        await store.ensure_collection(embedder.fingerprint)
        projection = await store.projection(embedder.fingerprint.id)
        assert projection.sparse is not None, "the collection outboxd created has no sparse vector"
        return store.collection, projection
    finally:
        await client.close()


def _growth(small: dict, large: dict) -> dict:
    """Each search's p99 and the server's RSS, the larger size's ÷ the smaller's (where both were measured)."""
    pairs = {f"{mode}_p99": (small["latency"][mode].get("p99_ms"), large["latency"][mode].get("p99_ms"))
             for mode in MODES}
    pairs["rss"] = (small["after_queries"]["rss_mib"], large["after_queries"]["rss_mib"])
    return {k: round(b / a, 3) if a and b else None for k, (a, b) in pairs.items()}


def figure_search_scale(pg: Postgres, embedder: Embedder, sizes: list[int], queries: int = 200,
                        real: int | None = None, repeats: int = 2, prefer_grpc: bool = False,
                        checkpoint: Callable[[dict], None] | None = None) -> dict | str:
    """Figure 13 (see the module's documentation). `embedder`: the real model,
    loaded; `checkpoint`: given what is measured so far after each configuration
    (a long run keeps what it measured if a later step fails)."""
    binary = find_binary()
    if binary is None:
        return NEEDS_BINARY
    out: dict = {"load_average_before": load_average(), "sizes": sorted(sizes), "repeats": repeats,
                 "transport": "gRPC" if prefer_grpc else "REST (the daemon's default)"}
    started = time.perf_counter()
    m = material(real)
    phrases = query_phrases(m, queries)
    real_vectors = asyncio.run(embedder.backend.encode(m.windows)).vectors.astype(np.float32)
    encode_started = time.perf_counter()
    encoded = asyncio.run(embedder.backend.encode(phrases)).vectors.astype(np.float32)
    out["query_encode_ms_each_in_one_batch"] = round((time.perf_counter() - encode_started) / len(phrases) * 1000, 2)
    one = time.perf_counter()
    for p in phrases[:20]:
        asyncio.run(embedder.embed_query(p))
    out["query_encode_ms_alone"] = round((time.perf_counter() - one) / 20 * 1000, 2)
    query_vectors = {p: v / np.linalg.norm(v) for p, v in zip(phrases, encoded, strict=True)}
    chunks = Chunks(m, real_vectors)
    out["data"] = {"real_vectors": len(m.windows), "queries": len(phrases), "query_examples": phrases[:8],
                   "chunks_per_document": CHUNKS_PER_DOCUMENT, "documents_per_source": DOCUMENTS_PER_SOURCE,
                   "text_example": chunks.block(0).texts[len(m.windows) + 1] if BLOCK > len(m.windows) else None}
    sparse = QdrantSettings().bm25_options()
    dsn = pg.fresh()
    runs: list[dict] = []
    out["runs"] = runs
    with QdrantServer(binary) as server:
        out["qdrant"] = f"a fresh Qdrant server {server.version} ({binary.name} as the tests find it)"
        out["empty_server"] = server_memory(server.pid)
        collection, projection = asyncio.run(_create(server.url, server.grpc_port, embedder))
        current = "none"
        loaded = 0
        for n in sorted(sizes):
            run: dict = {"chunks": n, "load_average_before": load_average()}
            say(f"figure 13: loading chunks {loaded:,} to {n:,} into PostgreSQL")
            run["postgres"] = load_postgres(dsn, chunks, loaded, n)
            say(f"figure 13: upserting them to Qdrant, then waiting for its optimizers ({run['postgres']})")
            with _sync_client(server) as client:
                run["qdrant_upload"] = load_qdrant(client, collection, chunks, loaded, n, projection, sparse)
                run["optimize_s"] = wait_optimized(client, collection)
                info = client.get_collection(collection)
                run["points"], run["segments"] = info.points_count, info.segments_count
                run["sample_check"] = check_sample(dsn, client, collection, chunks, n, projection)
            loaded = n
            run["keyword_matches"] = _keyword_matches(dsn, phrases[:40])
            run["configurations"] = {}
            for quantization in ([current] + [q for q in QUANTIZATIONS if q != current]):
                if quantization != current:
                    switched = time.perf_counter()
                    changed = asyncio.run(_reshape(server.url, server.grpc_port, collection, quantization))
                    with _sync_client(server) as client:
                        seconds = wait_optimized(client, collection)
                    run[f"switch_to_{quantization}"] = {"differences": changed, "optimize_s": seconds,
                                                        "seconds": round(time.perf_counter() - switched, 1)}
                    current = quantization
                say(f"figure 13: searching {n:,} chunks, quantization {quantization}")
                run["configurations"][quantization] = measure(server, pg, collection, dsn, embedder.info, query_vectors,
                                                              quantization, repeats, prefer_grpc)
                if checkpoint is not None:
                    checkpoint({**out, "runs": [*runs, run]})
            run["storage_mib"] = round(sum(f.stat().st_blocks * 512 for f in (server.folder / "storage").rglob("*")
                                           if f.is_file()) / 2**20, 1)
            run["load_average_after"] = load_average()
            runs.append(run)
    first, last = runs[0], runs[-1]
    if len(runs) > 1:
        out["growth_largest_over_smallest"] = {q: _growth(first["configurations"][q], last["configurations"][q])
                                               for q in QUANTIZATIONS}
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["load_average_after"] = load_average()
    out["what"] = ("N chunks in PostgreSQL (COPY, capture triggers off) and on a fresh Qdrant server (outboxd's "
                   "collection: unnamed dense vector, sparse bm25 with IDF computed by the server; outboxd's payload), "
                   f"grown from {first['chunks']:,} to {last['chunks']:,}; per size and quantization (switched in "
                   "place), the server restarted, then every query through daemon.hybrid_search one at a time, dense "
                   "only, native hybrid (RRF in Qdrant) and PostgreSQL-fused hybrid interleaved: p50 and p99; the "
                   "server's RSS after the searches; recall@10 of the dense search against exact search")
    return out


# --- figure 1e: the pipeline with the sparse vector on --------------------------------------------
def figure_sparse_pipeline(pg: Postgres, target: QdrantTarget, embedder: Embedder, n: int, runs: int = 2) -> dict | str:
    """Figure 1's pipeline (the real model, default claim batch) with the sparse
    vector on and off, alternating, `runs` each; the ratio of the mean rates."""
    if not target.is_server:
        return NEEDS_SERVER
    texts = e2e_throughput.make_texts(n)
    out: dict = {"qdrant": target.label, "chunks": n, "load_average_before": load_average(), "runs": []}
    for r in range(runs):
        for sparse in ("none", "bm25") if r % 2 == 0 else ("bm25", "none"):
            embedder._cache.clear()  # the same texts run again: no cache hit may flatter a run
            dsn = pg.fresh()
            collection = target.name(f"sparse_{sparse}")
            settings = settings_for(dsn, target, collection=collection,
                                    qdrant={**target.settings()["qdrant"], "sparse": sparse})
            cpu = target.cpu_seconds()
            rate, share = asyncio.run(e2e_throughput.pipeline_rate(dsn, embedder, texts, settings,
                                                                   qdrant=target.client()))
            server_cpu = target.cpu_seconds()
            made = asyncio.run(_sparse_vectors(target, collection))
            assert made == (n if sparse == "bm25" else 0), (sparse, made)  # the run wrote what it says
            out["runs"].append({"sparse": sparse, "chunks_per_s": round(rate, 1), "encode_share": round(share, 3),
                                "qdrant_cpu_s": round(server_cpu - cpu, 2) if cpu is not None else None,
                                "points_with_a_sparse_vector": made})
    mean = {s: sum(r["chunks_per_s"] for r in out["runs"] if r["sparse"] == s) / runs for s in ("none", "bm25")}
    out.update(dense_chunks_per_s=round(mean["none"], 1), sparse_chunks_per_s=round(mean["bm25"], 1),
               ratio=round(mean["bm25"] / mean["none"], 3), load_average_after=load_average())
    return out


async def _sparse_vectors(target: QdrantTarget, alias: str) -> int:
    """How many points of the collection carry a non-empty sparse vector."""
    client = target.client(prefer_grpc=False)
    try:
        points, _ = await client.scroll(alias, limit=100_000, with_payload=False, with_vectors=True)
    finally:
        await client.close()
    return sum(1 for p in points if isinstance(p.vector, dict) and getattr(p.vector.get(SPARSE_VECTOR), "indices", None))


# --- one command ------------------------------------------------------------------------------------
FULL = {"sizes": [100_000, 1_000_000], "queries": 200, "real": None, "repeats": 2, "pipeline_chunks": 1000,
        "pipeline_runs": 2}
QUICK = {"sizes": [1_000, 2_000], "queries": 12, "real": 150, "repeats": 1, "pipeline_chunks": 16, "pipeline_runs": 1}


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"platform": f"{platform.machine()}, Python {platform.python_version()}", "cpu_model": model,
            "nproc": len(os.sched_getaffinity(0)), "cores": os.cpu_count(), "memory_gib": round(memory / 2**20, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.search_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the code, measures nothing")
    parser.add_argument("--sizes", type=int, nargs="+", help="collection sizes, grown in order (default 100000 1000000)")
    parser.add_argument("--out", type=Path, default=Path("search_scale.json"))
    parser.add_argument("--grpc", action="store_true", help="search over gRPC (default: REST, as the daemon)")
    parser.add_argument("--skip-pipeline", action="store_true", help="leave figure 1e out")
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    if args.sizes:
        sizes["sizes"] = args.sizes
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result: dict = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(),
                             "mode": "quick (tiny sizes: not a measurement)" if args.quick else "full",
                             "sizes": sizes, "load_average_before": load_average()}}
    started = time.perf_counter()

    def write(partial: dict) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(orjson.dumps({**result, "search_scale": partial},
                                          option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))

    embedder = Embedder(Settings(database_url=None, collection="bench", log_level="WARNING",
                                 embedding={"device": "cpu"}))
    asyncio.run(embedder.load())
    pg = Postgres()
    try:
        result["search_scale"] = figure_search_scale(pg, embedder, sizes["sizes"], sizes["queries"], sizes["real"],
                                                     sizes["repeats"], args.grpc, write)
        if not args.skip_pipeline:
            with ExitStack() as stack:
                target = QdrantTarget.from_env(stack)
                try:
                    result["sparse_pipeline"] = figure_sparse_pipeline(pg, target, embedder, sizes["pipeline_chunks"],
                                                                       sizes["pipeline_runs"])
                finally:
                    target.cleanup()
    finally:
        pg.close()
        asyncio.run(embedder.close())
    result["meta"].update(load_average_after=load_average(), seconds=round(time.perf_counter() - started, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
