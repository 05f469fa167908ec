"""Helpers the tests share: reach the session's Qdrant, write content the way
an application does, run the daemon in-process, and check invariant 2
(convergence) in full."""
from __future__ import annotations

import asyncio
import inspect
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from qdrant_client import AsyncQdrantClient, models

from daemon.core.chunk_state import ChunkState, Projection
from daemon.core.qdrant_store import is_local
from daemon.core.settings import QdrantSettings
from daemon.embedding.embedder import Embedder
from daemon.outbox.notify_daemon import NotifyDaemon


# --- the session's Qdrant (tests/conftest.py publishes it as QDRANT_URL) -------------------
def server_settings() -> dict[str, Any] | None:
    """Client keywords of the session's Qdrant server, or None in local mode."""
    url = os.environ.get("QDRANT_URL")
    if not url:
        return None
    extra: dict[str, Any] = {"url": url, "api_key": os.environ.get("QDRANT_API_KEY"), "timeout": 60, "check_compatibility": False,
                             "grpc_port": int(os.environ.get("OUTBOXD_QDRANT__GRPC_PORT", "6334"))}
    ca = os.environ.get("OUTBOXD_QDRANT__CA_FILE")
    if ca:
        import ssl

        extra["verify"] = ssl.create_default_context(cafile=ca)
    return extra


def require_server() -> dict[str, Any]:
    """Skip a test whose meaning needs a Qdrant server, in a session that runs local mode."""
    server = server_settings()
    if server is None:
        import pytest

        pytest.skip("needs a Qdrant server: this session runs qdrant-client's local mode")
    return server


def open_qdrant(local_path: str | Path, *, prefer_grpc: bool = False) -> AsyncQdrantClient:
    """A client of the session's Qdrant server; in local mode, of the folder
    (or ':memory:') that an in-process daemon or an outboxd process was given."""
    server = server_settings()
    if server is None:
        return AsyncQdrantClient(location=":memory:") if str(local_path) == ":memory:" else AsyncQdrantClient(path=str(local_path))
    return AsyncQdrantClient(prefer_grpc=prefer_grpc, **server)


def qdrant_flags(local_path: str | Path) -> list[str]:
    """CLI flags for the session's Qdrant: none on a server (QDRANT_URL is in the
    environment), else --qdrant-path of the local-mode folder."""
    return [] if server_settings() else ["--qdrant-path", str(local_path)]


def qdrant_choice(local_path: str | Path) -> dict[str, Any]:
    """Settings keywords for the same choice: none on a server, else the local-mode folder."""
    return {} if server_settings() else {"qdrant": {"path": Path(local_path)}}


def delete_collections(prefix: str) -> list[str]:
    """On the session's server: delete every collection named prefix* (their aliases go with them)."""
    from qdrant_client import QdrantClient

    server = server_settings()
    if server is None:
        return []
    client = QdrantClient(**server)
    try:
        gone = [c.name for c in client.get_collections().collections if c.name.startswith(prefix)]
        for name in gone:
            client.delete_collection(name)
        return gone
    finally:
        client.close()


def add_source(conn: psycopg.Connection, source_type: str = "api") -> uuid.UUID:
    return conn.execute("INSERT INTO sources (source_type) VALUES (%s) RETURNING id", (source_type,)).fetchone()[0]


def add_document(conn: psycopg.Connection, texts: list[str], *, source_id=None, title="A document", **doc) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A document with one chunk per text, in one transaction. Returns (document id, chunk ids)."""
    with conn.transaction():
        source_id = source_id or add_source(conn)
        doc_id = conn.execute(
            "INSERT INTO documents (source_id, title, url, document_type, metadata) VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (source_id, title, doc.get("url"), doc.get("document_type"), Jsonb(doc.get("metadata", {}))),
        ).fetchone()[0]
        chunk_ids = []
        for i, text in enumerate(texts):
            chunk_ids.append(
                conn.execute(
                    "INSERT INTO chunks (document_id, chunk_index, text, token_count, metadata) VALUES (%s, %s, %s, %s, %s) RETURNING id",
                    (doc_id, i, text, len(text.split()), Jsonb({"i": i})),
                ).fetchone()[0]
            )
    return doc_id, chunk_ids


async def physical_collection(client: AsyncQdrantClient, name: str) -> str:
    """The collection behind `name` when it is an alias, else `name` itself."""
    aliases = {a.alias_name: a.collection_name for a in (await client.get_aliases()).aliases}
    return aliases.get(name, name)


NO_SPARSE_DRIFT = {"missing_sparse": 0, "wrong_sparse": 0}  # reconcile's two sparse kinds (test_native_hybrid.py's)


async def make_every_drift(conn: psycopg.Connection, qdrant: AsyncQdrantClient, target: str, ids: list[uuid.UUID]) -> str:
    """One drift of each kind behind the daemon's back, on the first five chunks of `ids`:
    missing (0), orphaned (1, and a stray point), stale (2: text; 3: payload) and
    wrong_model (4). Returns the stray point's id."""
    await qdrant.delete(target, models.PointIdsList(points=[str(ids[0])]))
    stray = str(uuid.uuid4())
    await qdrant.upsert(target, [models.PointStruct(id=stray, vector=[0.1] * 384, payload={})])
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")  # writes the triggers do not see
        conn.execute("DELETE FROM chunks WHERE id = %s", (ids[1],))
        conn.execute("UPDATE chunks SET text = 'changed behind the back' WHERE id = %s", (ids[2],))
    await qdrant.set_payload(target, {"title": "tampered"}, points=[str(ids[3])])
    await qdrant.set_payload(target, {"embedding_model": "another-model"}, key="outboxd", points=[str(ids[4])])
    return stray


def outbox_rows(conn: psycopg.Connection) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM outboxd.outbox ORDER BY id").fetchall()


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 120.0, interval: float = 0.05) -> Any:
    """Poll predicate (a function, or one returning an awaitable) until it returns something
    true, and return that; after timeout seconds fail the test, naming what did not happen.
    The timeout is a deadline for a stuck test, never a pace: keep it generous."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


def db_clock_passed(conn: psycopg.Connection, query: str, params: tuple = ()) -> bool:
    """Whether PostgreSQL's clock has passed the timestamp the query selects (a lease's
    end, an event's available_at): time as the queries that compare with now() see it."""
    row = conn.execute(f"SELECT clock_timestamp() > ({query})", params).fetchone()
    return bool(row and row[0])


async def drain(settings, dsn: str, embedder: Embedder, qdrant: AsyncQdrantClient, timeout: float = 120) -> NotifyDaemon:
    """Run the daemon in-process until nothing is pending; return it for its stats."""
    daemon = NotifyDaemon(settings, dsn, embedder=embedder, qdrant=qdrant)
    await daemon.start()
    try:
        code = await asyncio.wait_for(daemon.run(drain=True), timeout)
    finally:
        await daemon.close()
    assert code == 0
    return daemon


async def all_points(qdrant: AsyncQdrantClient, collection: str) -> dict[str, Any]:
    points, offset = {}, None
    while True:
        batch, offset = await qdrant.scroll(collection, limit=256, offset=offset, with_payload=True, with_vectors=True)
        points.update({str(p.id): p for p in batch})
        if offset is None:
            return points


async def projection_of(qdrant: AsyncQdrantClient, collection: str, model_id: str):
    """What the points of a collection written with the default settings hold beside each chunk."""
    from daemon.core.qdrant_store import QdrantStore

    return await QdrantStore(qdrant, collection, collection).projection(model_id)


async def assert_converged(dsn: str, qdrant: AsyncQdrantClient, collection: str, embedder: Embedder,
                           sparse: str | None | bool = True) -> int:
    """Invariant 2: one point per chunk with non-empty text, id = chunk id, the
    vector = the model's embedding of the text, the payload = the projection;
    no other points. sparse: the id of the BM25 settings every point's sparse
    vector is made with (True: the default settings' on a server, none in local
    mode; None: no point has one). Returns the number of points."""
    if sparse is True:
        sparse = None if is_local(qdrant) else QdrantSettings().sparse_id()
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        states = [ChunkState.from_row(r) for r in conn.execute(
            "SELECT chunk_id, document_id, source_id, chunk_index, text, token_count, content_hash, metadata, "
            "title, url, document_type, state_hash FROM outboxd.chunk_state"
        ).fetchall()]
    expected = {str(s.chunk_id): s for s in states if s.has_text}
    points = await all_points(qdrant, collection)
    assert set(points) == set(expected), (
        f"missing points: {sorted(set(expected) - set(points))[:5]}, "
        f"orphaned points: {sorted(set(points) - set(expected))[:5]}"
    )
    if not expected:
        return 0
    model_id = embedder.fingerprint.id
    texts = [s.text for s in expected.values()]
    # the truth is sentence-transformers' own encode() (loaded once per process from the
    # same folder), not the daemon's encode stage
    from daemon.embedding.torch_backend import reference_model

    truth = reference_model(embedder.name, None, embedder.max_seq_length).encode(
        texts, normalize_embeddings=True, convert_to_numpy=True
    )
    for (pid, state), vec in zip(expected.items(), truth):
        point = points[pid]
        want = state.payload(Projection(model_id, sparse))
        got = {k: point.payload.get(k) for k in want}
        got["outboxd"] = {k: v for k, v in (got["outboxd"] or {}).items() if k not in ("truncated", "version")}
        assert orjson.loads(orjson.dumps(got)) == orjson.loads(orjson.dumps(want)), f"payload of {pid} differs"
        vectors = point.vector if isinstance(point.vector, dict) else {"": point.vector}
        if sparse is None:
            assert "bm25" not in vectors, f"point {pid} has a sparse vector where none is configured"
        else:  # Qdrant's BM25 of the whole text: at least one term of it
            assert vectors.get("bm25") is not None and vectors["bm25"].indices, f"point {pid} lacks its bm25 vector"
        cos = float(np.dot(np.asarray(vectors[""]), vec))
        assert cos > 0.999, f"vector of {pid} is not the embedding of its text (cosine {cos:.4f})"
    return len(expected)
