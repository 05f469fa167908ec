"""End-to-end throughput of the notify path against raw model.encode.

    python -m tests.benchmarks.e2e_throughput [--chunks 1000] [--out results.json]

Measures, in one run on the same texts and batch size: raw `model.encode`
chunks/s (before and after, averaged), and chunks/s from the commit of the
chunks to all of them visible in Qdrant through the daemon (real PostgreSQL
from pgserver, Qdrant local mode in memory, the real MiniLM). Their ratio is
the pipeline efficiency: what outboxd adds to the cost of embedding.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import time
from pathlib import Path

import orjson
import psycopg
from qdrant_client import AsyncQdrantClient

from daemon.config import Settings
from daemon.embedding.embedder import Embedder
from daemon.outbox.notify_daemon import NotifyDaemon
from db import migrate
from tests.folders import server_folder

SYLLABLES = ["ka", "lo", "mi", "ne", "ra", "to", "vi", "su", "de", "pa", "ri", "mo", "ta", "shi", "en", "or"]
LENGTHS = [20] * 5 + [60] * 4 + [200]  # words: mostly short and medium chunks, some long ones


def make_texts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(3000)]
    return [f"{i} " + " ".join(rng.choices(vocab, k=rng.choice(LENGTHS))) for i in range(n)]


def reference_st(embedder: Embedder):
    """sentence-transformers' own SentenceTransformer behind the embedder: the
    torch backend's model, else (another backend) the reference model loaded
    with the same settings."""
    model = getattr(embedder.backend, "model", None)
    if model is not None and hasattr(model, "encode"):
        return model
    from daemon.embedding.torch_backend import reference_model

    s = embedder._settings.embedding
    return reference_model(s.name, s.device, s.max_seq_length)


def raw_encode_rate(embedder: Embedder, texts: list[str], batch_size: int) -> float:
    """texts/s of sentence-transformers' `encode` as it is, the whole corpus in one call."""
    model = reference_st(embedder)
    started = time.perf_counter()
    model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    return len(texts) / (time.perf_counter() - started)


def backend_encode_rate(embedder: Embedder, texts: list[str]) -> float:
    """texts/s of the configured backend's own encode (through its encode stage),
    the whole corpus in one call: what the daemon's embedding could do at best."""

    async def once() -> float:
        started = time.perf_counter()
        await embedder.backend.encode(texts)
        return len(texts) / (time.perf_counter() - started)

    return asyncio.run(once())


async def pipeline_rate(dsn: str, embedder: Embedder, texts: list[str], settings: Settings,
                        qdrant: AsyncQdrantClient | None = None) -> tuple[float, float]:
    """(chunks/s from commit to visible, share of that time spent in encode).
    qdrant: the client to write through (closed here); default local mode in memory."""
    qdrant = qdrant if qdrant is not None else AsyncQdrantClient(location=":memory:")
    encode_before = embedder.encode_seconds  # the embedder may be shared between runs
    daemon = NotifyDaemon(settings, dsn, embedder=embedder, qdrant=qdrant)
    await daemon.start()
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            sid = conn.execute("INSERT INTO sources (source_type) VALUES ('api') RETURNING id").fetchone()[0]
            did = conn.execute("INSERT INTO documents (source_id, title) VALUES (%s, 'bench') RETURNING id", (sid,)).fetchone()[0]
            with conn.cursor().copy("COPY chunks (document_id, chunk_index, text) FROM STDIN") as copy:
                for i, text in enumerate(texts):
                    copy.write_row((did, i, text))
        committed = time.perf_counter()
    try:
        assert await daemon.run(drain=True) == 0
        elapsed = time.perf_counter() - committed
    finally:
        await daemon.close()
        await qdrant.close()
    points = daemon.stats.upserted
    assert points == len(texts), f"expected {len(texts)} points, daemon upserted {points}"
    return len(texts) / elapsed, (embedder.encode_seconds - encode_before) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("results.json"))
    args = parser.parse_args()

    import pgserver

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = make_texts(args.chunks)
    pgdata = server_folder("bench-pg")
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    dsn = server.get_uri()
    migrate.upgrade(dsn)
    settings = Settings(database_url=dsn, collection="bench", batch_size=args.batch_size,
                        log_level="WARNING", embedding={"cache_size": 0})
    embedder = Embedder(settings)
    asyncio.run(embedder.load())
    reference_st(embedder).encode(texts[:64], batch_size=embedder.batch_size)  # warm up

    # The reference: the whole corpus in one encode() call, which sorts all of it by
    # length, at the daemon's forward-pass size and at 64.
    sizes = sorted({embedder.batch_size, 64})
    raw_before = {bs: raw_encode_rate(embedder, texts, bs) for bs in sizes}
    pipeline, encode_share = asyncio.run(pipeline_rate(dsn, embedder, texts, settings))
    raw_after = {bs: raw_encode_rate(embedder, texts, bs) for bs in sizes}
    raw = {bs: (raw_before[bs] + raw_after[bs]) / 2 for bs in sizes}
    best = max(raw.values())
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "chunks": len(texts),
        "claim_batch_size": args.batch_size,
        "embed_batch_size": embedder.batch_size,
        "raw_encode_chunks_per_s": {str(bs): round(v, 1) for bs, v in raw.items()},
        "raw_encode_runs": {str(bs): [round(raw_before[bs], 1), round(raw_after[bs], 1)] for bs in sizes},
        "pipeline_chunks_per_s": round(pipeline, 1),
        "pipeline_encode_share": round(encode_share, 3),
        "pipeline_efficiency_same_batch": round(pipeline / raw[embedder.batch_size], 3),
        "pipeline_efficiency_vs_best_raw": round(pipeline / best, 3),
    }
    args.out.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    server.cleanup()


if __name__ == "__main__":
    main()
