"""Figures about the outbox itself: the write path's cost (2), freshness from
commit to visible (3), and the work outboxd does not do (4)."""
from __future__ import annotations

import asyncio
import statistics
import time
from contextlib import contextmanager

import psycopg

from daemon.config import Settings
from daemon.embedding.embedder import Embedder
from daemon.outbox.notify_daemon import NotifyDaemon
from daemon.runtime.service import run_service
from tests.benchmarks import e2e_throughput
from tests.benchmarks.services import (
    NO_QDRANT,
    Postgres,
    QdrantTarget,
    add_chunks,
    drain,
    new_document,
    settings_for,
    sql,
)

CAPTURE_TRIGGERS = ["outboxd_capture_insert", "outboxd_capture_update", "outboxd_capture_delete", "outboxd_capture_truncate"]


# --- figure 2: write-path cost -----------------------------------------------------
@contextmanager
def capture_triggers(conn: psycopg.Connection, enabled: bool):
    if not enabled:
        for t in CAPTURE_TRIGGERS:
            conn.execute(f"ALTER TABLE chunks DISABLE TRIGGER {t}")
    try:
        yield
    finally:
        if not enabled:
            for t in CAPTURE_TRIGGERS:
                conn.execute(f"ALTER TABLE chunks ENABLE TRIGGER {t}")


def insert_rate(conn: psycopg.Connection, doc_id, texts: list[str], method: str, batch: int = 5000) -> float:
    rows = [(doc_id, i, t) for i, t in enumerate(texts)]
    started = time.perf_counter()
    for lo in range(0, len(rows), batch):
        with conn.transaction():
            part = rows[lo:lo + batch]
            if method == "copy":
                with conn.cursor().copy("COPY chunks (document_id, chunk_index, text) FROM STDIN") as copy:
                    for r in part:
                        copy.write_row(r)
            else:
                conn.cursor().executemany("INSERT INTO chunks (document_id, chunk_index, text) VALUES (%s, %s, %s)", part)
    return len(rows) / (time.perf_counter() - started)


def figure_write_path(pg: Postgres, rows: int) -> dict:
    texts = [f"row {i} " + "lorem ipsum dolor sit amet " * 8 for i in range(rows)]  # about 40 words
    dsn = pg.fresh()
    out: dict = {"qdrant": NO_QDRANT, "rows": rows, "rows_per_transaction": 5000}
    with psycopg.connect(dsn, autocommit=True) as conn:
        doc_id = new_document(conn)
        for method in ("executemany", "copy"):
            rates = {}
            # off, on, off, on: the two conditions alternate so that drift hits both alike
            for enabled in (False, True, False, True):
                with capture_triggers(conn, enabled=False):
                    conn.execute("TRUNCATE chunks")
                conn.execute("TRUNCATE outboxd.outbox")
                conn.execute("VACUUM ANALYZE chunks")
                with capture_triggers(conn, enabled):
                    rates.setdefault(enabled, []).append(insert_rate(conn, doc_id, texts, method))
            on, off = max(rates[True]), max(rates[False])
            outbox = conn.execute("SELECT count(*) FROM outboxd.outbox").fetchone()[0]
            assert outbox == rows, f"with triggers on, {rows} inserts left {outbox} outbox rows"
            out[method] = {"with_triggers_chunks_per_s": round(on), "without_triggers_chunks_per_s": round(off),
                           "ratio": round(on / off, 3)}
    return out


# --- figure 3: freshness -------------------------------------------------------------
def _pct(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def freshness_run(dsn: str, target: QdrantTarget, embedder: Embedder, seconds: float, rate: float,
                        notify: bool) -> dict:
    """Insert one chunk every 1/rate s for `seconds`, each in its own transaction;
    poll Qdrant every few ms for the ids not yet visible. The encode time of a
    chunk's batch is taken by wrapping the backend's encode (an instance
    attribute of this run's backend; the daemon's code is unchanged)."""
    encode_of: dict[str, float] = {}
    backend = embedder.backend
    original = backend.encode

    async def timed(texts: list[str]):
        started = time.perf_counter()
        try:
            return await original(texts)
        finally:
            took = time.perf_counter() - started
            for t in texts:
                encode_of[t] = took

    backend.encode = timed
    texts = e2e_throughput.make_texts(int(seconds * rate) + 1, seed=11 if notify else 13)
    qdrant = target.client()
    settings = settings_for(dsn, target, collection=target.name("freshness"))  # default poll interval, claim, concurrency
    with psycopg.connect(dsn, autocommit=True) as conn:
        doc_id = new_document(conn)
        if not notify:  # polling only: the outbox's NOTIFY trigger is off for this run
            conn.execute("ALTER TABLE outboxd.outbox DISABLE TRIGGER outboxd_notify")
    daemon = NotifyDaemon(settings, dsn, embedder=embedder, qdrant=qdrant)
    pending: dict[str, tuple[float, str]] = {}
    latency: list[float] = []
    overhead: list[float] = []
    writing_done = asyncio.Event()
    try:
        # under the supervisor, as `outboxd run` runs it: the LISTEN wake-up is one of its side tasks
        runner = asyncio.create_task(run_service(daemon))
        while not daemon.started:
            if runner.done():
                await runner  # it failed to start: say why
            await asyncio.sleep(0.05)
        store = getattr(daemon, "writer", daemon).store  # the daemon's collection store (behind its writer)
        collection = store.collection
        await asyncio.sleep(0.5)  # the listener connects

        async def writer() -> None:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
                t0 = time.perf_counter()
                for i, text in enumerate(texts):
                    await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
                    cur = await aconn.execute(
                        "INSERT INTO chunks (document_id, chunk_index, text) VALUES (%s, %s, %s) RETURNING id",
                        (doc_id, i, text),
                    )
                    (cid,) = await cur.fetchone()
                    pending[str(cid)] = (time.perf_counter(), text)  # autocommit: committed on return
            writing_done.set()

        async def poller() -> None:
            deadline = None
            while not (writing_done.is_set() and not pending):
                if writing_done.is_set():
                    deadline = deadline or time.perf_counter() + 60
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"{len(pending)} chunks never became visible")
                if pending:
                    ids = list(pending)
                    found = await qdrant.retrieve(collection, ids, with_payload=False, with_vectors=False)
                    now = time.perf_counter()
                    for p in found:
                        committed, text = pending.pop(str(p.id))
                        latency.append(now - committed)
                        overhead.append(now - committed - encode_of.get(text, 0.0))
                await asyncio.sleep(0.005)

        await asyncio.gather(writer(), poller())
        daemon.stop.set()
        await runner
    finally:
        backend.encode = original
        await daemon.close()
        await qdrant.close()
        if not notify:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("ALTER TABLE outboxd.outbox ENABLE TRIGGER outboxd_notify")
    ms = lambda xs, q: round(_pct(xs, q) * 1000, 1)  # noqa: E731
    return {
        "chunks": len(latency),
        "p50_ms": ms(latency, 50), "p99_ms": ms(latency, 99),
        "p50_overhead_ms": ms(overhead, 50), "p99_overhead_ms": ms(overhead, 99),
        "mean_encode_ms": round(statistics.mean(encode_of.values()) * 1000, 1) if encode_of else None,
    }


def figure_freshness(pg: Postgres, target: QdrantTarget, embedder: Embedder, seconds: float, rate: float) -> dict:
    embedder._cache.clear()
    out = {"qdrant": target.label, "seconds": seconds, "chunks_per_s": rate,
           "poll_interval_s": Settings.model_fields["poll_interval"].default, "qdrant_poll_ms": 5}
    for mode, notify in (("notify", True), ("polling", False)):
        out[mode] = asyncio.run(freshness_run(pg.fresh(), target, embedder, seconds, rate, notify))
    return out


# --- figure 4: wasted work -----------------------------------------------------------------
async def wasted_work(dsn: str, target: QdrantTarget, embedder: Embedder, n: int) -> dict:
    """Encodes counted by the daemon (Stats.embedded) for payload-only updates
    and duplicate texts, each change drained by its own daemon on one Qdrant."""
    embedder._cache.clear()
    settings = settings_for(dsn, target, collection=target.name("wasted"))  # the defaults, embedding cache included
    texts = e2e_throughput.make_texts(n, seed=17)
    qdrant = target.client()
    try:
        doc_id = add_chunks(dsn, "wasted work", texts)
        d, _ = await drain(settings, dsn, embedder, qdrant)
        assert d.stats.embedded == n, d.stats
        out: dict = {"qdrant": target.label, "chunks": n, "reuse_stored_vectors": settings.reuse_stored_vectors}
        sql(dsn, "UPDATE chunks SET metadata = jsonb_build_object('rev', 2) WHERE document_id = %s", (doc_id,))
        d, _ = await drain(settings, dsn, embedder, qdrant)
        out["metadata"] = {"updates": n, "embedded": d.stats.embedded, "payload_only": d.stats.payload_only}
        sql(dsn, "UPDATE documents SET title = 'retitled' WHERE id = %s", (doc_id,))
        d, _ = await drain(settings, dsn, embedder, qdrant)
        out["title"] = {"chunks_affected": n, "embedded": d.stats.embedded, "payload_only": d.stats.payload_only}
        # a second document repeating every text, the daemon running all along (cache warm)
        add_chunks(dsn, "duplicates", texts)
        d, _ = await drain(settings, dsn, embedder, qdrant)
        out["duplicates_warm_cache"] = {"chunks": n, "embedded": d.stats.embedded}
        # a third one after a restart (embedding cache cold): what outboxd does beyond its cache
        embedder._cache.clear()
        add_chunks(dsn, "duplicates after restart", texts)
        d, _ = await drain(settings, dsn, embedder, qdrant)
        out["duplicates_cold_cache"] = {"chunks": n, "embedded": d.stats.embedded, "reused": d.stats.reused}
    finally:
        await qdrant.close()
    return out
