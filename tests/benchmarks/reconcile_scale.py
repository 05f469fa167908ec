"""Reconcile rate and memory at growing sizes.

    python -m tests.benchmarks.reconcile_scale [--sizes 10000 50000 100000] [--out reconcile.json]

For each size N: N chunks in a real PostgreSQL (pgserver) and N matching points
in Qdrant local mode (in memory; vectors are random, since reconcile compares
ids, hashes and payloads, never vectors), then one full `Reconciler.run()`.
Reports chunks/s and the peak of Python memory allocated during the run
(tracemalloc): flat in N is the claim, since both sides are streamed.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
import tracemalloc
from pathlib import Path

import orjson
import psycopg
from qdrant_client import AsyncQdrantClient, models

from daemon.admin.reconcile import LOCAL_QDRANT_PAGE, Reconciler
from daemon.core.chunk_state import ChunkState, Projection
from daemon.core.qdrant_store import QdrantStore
from daemon.embedding.embedder import ModelFingerprint
from db import migrate
from db.gateway import make_pool
from tests.folders import server_folder

FINGERPRINT = ModelFingerprint("bench/model", 8, True, 256)
PROJECTION = Projection(FINGERPRINT.id)  # random vectors written directly: no sparse vector


def populate(dsn: str, n: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE sources CASCADE")
        conn.execute("ALTER TABLE chunks DISABLE TRIGGER USER")  # the outbox is not under test here
        sid = conn.execute("INSERT INTO sources (source_type) VALUES ('api') RETURNING id").fetchone()[0]
        did = conn.execute("INSERT INTO documents (source_id, title) VALUES (%s, 'bench') RETURNING id", (sid,)).fetchone()[0]
        with conn.cursor().copy("COPY chunks (document_id, chunk_index, text, search_vector) FROM STDIN") as copy:
            for i in range(n):
                copy.write_row((did, i, f"chunk number {i} of the reconcile benchmark", ""))
        conn.execute("ALTER TABLE chunks ENABLE TRIGGER USER")


async def load_points(dsn: str, client: AsyncQdrantClient, collection: str) -> None:
    rng = random.Random(1)
    sink = QdrantStore(client, collection)
    sink.collection = collection
    await sink.create_physical(FINGERPRINT)
    with psycopg.connect(dsn, row_factory=psycopg.rows.dict_row) as conn:
        cur = conn.cursor(name="all_chunks")
        cur.execute(
            "SELECT chunk_id, document_id, source_id, chunk_index, text, token_count, content_hash, metadata, "
            "title, url, document_type, state_hash FROM outboxd.chunk_state"
        )
        while rows := cur.fetchmany(5000):
            points = [
                models.PointStruct(
                    id=str(r["chunk_id"]),
                    vector=[rng.random() for _ in range(FINGERPRINT.dimension)],
                    payload=ChunkState.from_row(r).payload(PROJECTION),
                )
                for r in rows
            ]
            await client.upsert(collection, points, wait=True)


async def measure(dsn: str, n: int, qdrant_page_size: int, client: AsyncQdrantClient | None = None,
                  collection: str | None = None, trace_memory: bool = True) -> dict:
    """client: the Qdrant to reconcile against (closed here; default local mode in memory).
    trace_memory: the peak of Python allocations (tracemalloc, which also slows
    every allocation down: the rate of a run that traces is not the figure)."""
    populate(dsn, n)
    client = client if client is not None else AsyncQdrantClient(location=":memory:")
    collection = collection or f"bench_{n}"
    await load_points(dsn, client, collection)
    pool = make_pool(dsn, application_name="outboxd:bench", min_size=1, max_size=2)
    await pool.open(wait=True)
    try:
        if trace_memory:
            tracemalloc.start()
        started = time.perf_counter()
        report = await Reconciler(pool, client, collection, PROJECTION, qdrant_page_size=qdrant_page_size).run()
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] if trace_memory else None
        tracemalloc.stop()
    finally:
        await pool.close()
        await client.close()
    assert report.chunks == n and report.points == n and report.drift == 0, report.as_dict()
    return {
        "chunks": n,
        "qdrant_page_size": qdrant_page_size,
        "seconds": round(seconds, 2),
        "chunks_per_s": round(n / seconds),
        "peak_python_mib_during_run": round(peak / 2**20, 1) if peak is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--qdrant-page-size", type=int, default=LOCAL_QDRANT_PAGE)
    parser.add_argument("--out", type=Path, default=Path("reconcile.json"))
    args = parser.parse_args()

    import pgserver

    server = pgserver.get_server(server_folder("bench-pg"), cleanup_mode="delete")
    dsn = server.get_uri()
    migrate.upgrade(dsn)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "qdrant": "local mode, in memory",
        "runs": [asyncio.run(measure(dsn, n, args.qdrant_page_size)) for n in args.sizes],
    }
    text = orjson.dumps(results, option=orjson.OPT_INDENT_2).decode()
    args.out.write_text(text)
    print(text)
    server.cleanup()


if __name__ == "__main__":
    main()
