"""The benchmark harness of issue 6: every figure, side by side, in one process.

    python -m tests.benchmarks [--quick] [--out DIR]

Writes DIR/results.json, DIR/results.md (figure, value, target, met?) and PNG
plots: throughput against claim batch size (figure 1), reconcile chunks/s and
peak memory against N (figure 6). Services are the tests' own: DATABASE_URL
if set, else a throwaway pgserver PostgreSQL; Qdrant local mode in memory; the
real MiniLM. Every figure is a ratio or a distribution measured in this run,
because absolute times on a shared machine move from run to run. --quick runs
the same code at tiny sizes (seconds): it checks the harness, it measures
nothing worth publishing.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from qdrant_client import AsyncQdrantClient

from daemon.config import Settings
from daemon.embedding.embedder import Embedder
from daemon.outbox.notify_daemon import Daemon
from db import migrate
from tests.benchmarks import e2e_throughput, kafka_transport, reconcile_scale

NO_GPU = "not measured: no GPU"

# key -> (figure label, target text, check(value, all figures) -> bool); the order of the table
FIGURES: dict[str, tuple[str, str, object]] = {
    "1_pipeline_efficiency": ("1. pipeline efficiency (pipeline ÷ raw encode, claim batch 64)", "≥ 0.90", lambda v, _f: v >= 0.90),
    "2_write_cost_ratio_executemany": ("2. write path: with ÷ without capture triggers, executemany", "≥ 0.75", lambda v, _f: v >= 0.75),
    "2_write_cost_ratio_copy": ("2. write path: with ÷ without capture triggers, COPY", "≥ 0.75", lambda v, _f: v >= 0.75),
    "2_write_chunks_per_s_executemany": ("2. chunks/s inserted with triggers, executemany", "≥ 10,000", lambda v, _f: v >= 10_000),
    "2_write_chunks_per_s_copy": ("2. chunks/s inserted with triggers, COPY", "≥ 10,000", lambda v, _f: v >= 10_000),
    "3_freshness_p50_ms_notify": ("3. freshness p50 (ms, commit → visible), NOTIFY", "", None),
    "3_freshness_p99_ms_notify": ("3. freshness p99 (ms, commit → visible), NOTIFY", "", None),
    "3_freshness_p50_overhead_ms_notify": ("3. freshness p50 minus encode of its batch (ms), NOTIFY", "", None),
    "3_freshness_p99_overhead_ms_notify": ("3. freshness p99 minus encode of its batch (ms), NOTIFY", "≤ 50", lambda v, _f: v <= 50),
    "3_freshness_p50_ms_polling": ("3. freshness p50 (ms), polling only", "", None),
    "3_freshness_p99_ms_polling": ("3. freshness p99 (ms), polling only", "", None),
    "3_freshness_p99_overhead_ms_polling": ("3. freshness p99 minus encode (ms), polling only", "", None),
    "4_encodes_per_metadata_update": ("4. encodes per payload-only update (chunk metadata)", "0", lambda v, _f: v == 0),
    "4_encodes_per_title_update": ("4. encodes per payload-only update (document title)", "0", lambda v, _f: v == 0),
    "4_encodes_per_duplicate_text": ("4. encodes per chunk with a duplicate text (daemon running)", "0", lambda v, _f: v == 0),
    "4_encodes_per_duplicate_text_after_restart": ("4. the same after a restart (embedding cache cold)", "0", lambda v, _f: v == 0),
    "5_transport_events_per_s_notify": ("5. transport ceiling, notify path (events/s, no encoding)", "≥ 5,000", lambda v, _f: v >= 5_000),
    "5_transport_events_per_s_kafka": ("5. transport ceiling, relay + consume through Kafka (events/s)", "≥ notify",
                                       lambda v, f: v >= f["5_transport_events_per_s_notify"]),
    "5_relay_events_per_s": ("5. Kafka: relay alone, outbox → topic (events/s)", "", None),
    "5_consume_events_per_s": ("5. Kafka: one consumer alone, topic → Qdrant (events/s, no encoding)", "", None),
    "6_reconcile_chunks_per_s": ("6. reconcile chunks/s at the largest N", "≥ 20,000", lambda v, _f: v >= 20_000),
    "6_reconcile_peak_mib_growth": ("6. reconcile peak memory, largest N ÷ smallest N", "flat (≈ 1)", lambda v, _f: v <= 1.5),
    "7_gpu_pipeline_efficiency": ("7. pipeline efficiency with the model on the GPU", "≥ 0.90", lambda v, _f: v >= 0.90),
}

FULL = dict(pipeline_chunks=1000, claim_batches=[16, 64, 256], write_rows=100_000, freshness_seconds=60.0,
            freshness_rate=10.0, wasted_chunks=300, transport_chunks=5000, reconcile_sizes=[10_000, 50_000, 100_000])
QUICK = dict(pipeline_chunks=24, claim_batches=[8, 64], write_rows=1000, freshness_seconds=2.0,
             freshness_rate=10.0, wasted_chunks=12, transport_chunks=200, reconcile_sizes=[200, 600])

CAPTURE_TRIGGERS = ["outboxd_capture_insert", "outboxd_capture_update", "outboxd_capture_delete", "outboxd_capture_truncate"]


# --- services ------------------------------------------------------------------
class Postgres:
    """DATABASE_URL if set, else a throwaway pgserver; one fresh migrated
    database per measurement, cloned from a template."""

    def __init__(self) -> None:
        self._server = None
        url = os.environ.get("DATABASE_URL")
        if url:
            self.base = url
        else:
            import pgserver

            self._server = pgserver.get_server(Path(tempfile.mkdtemp(prefix="outboxd-bench-pg-")), cleanup_mode="delete")
            self.base = self._server.get_uri()
        self.template = f"outboxd_bench_tpl_{os.getpid()}"
        migrate.upgrade(self._create(self.template))
        self._made: list[str] = [self.template]

    def _dsn(self, name: str) -> str:
        params = conninfo_to_dict(self.base)
        params["dbname"] = name
        return make_conninfo(**params)

    def _create(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self._dsn(name)

    def fresh(self) -> str:
        name = f"outboxd_bench_{uuid.uuid4().hex[:10]}"
        self._made.append(name)
        return self._create(name, self.template)

    def close(self) -> None:
        with psycopg.connect(self.base, autocommit=True) as conn:
            for name in reversed(self._made):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if self._server is not None:
            self._server.cleanup()


def settings_for(dsn: str, **overrides) -> Settings:
    base = dict(database_url=dsn, collection="bench", log_level="WARNING")
    return Settings(**{**base, **overrides})


def new_document(conn: psycopg.Connection, title: str = "bench") -> object:
    sid = conn.execute("INSERT INTO sources (source_type) VALUES ('api') RETURNING id").fetchone()[0]
    return conn.execute("INSERT INTO documents (source_id, title) VALUES (%s, %s) RETURNING id", (sid, title)).fetchone()[0]


async def drain(daemon_settings: Settings, dsn: str, embedder: Embedder, qdrant: AsyncQdrantClient) -> tuple[Daemon, float]:
    """A Daemon run in drain mode on the given Qdrant; (the daemon, seconds run() took)."""
    daemon = Daemon(daemon_settings, dsn, embedder=embedder, qdrant=qdrant)
    await daemon.start()
    try:
        started = time.perf_counter()
        assert await daemon.run(drain=True) == 0
        return daemon, time.perf_counter() - started
    finally:
        await daemon.close()


# --- figure 1 (and 7): pipeline efficiency ----------------------------------------
def figure_pipeline(pg: Postgres, embedder: Embedder, n: int, claim_batches: list[int]) -> dict:
    texts = e2e_throughput.make_texts(n)
    embedder._model.encode(texts[:64], batch_size=embedder.batch_size, show_progress_bar=False)  # warm up
    bs = embedder.batch_size
    raw_before = e2e_throughput.raw_encode_rate(embedder, texts, bs)
    sweep = []
    for claim in claim_batches:
        embedder._cache.clear()  # the same texts run again: no cache hit may flatter the pipeline
        dsn = pg.fresh()
        rate, share = asyncio.run(e2e_throughput.pipeline_rate(dsn, embedder, texts, settings_for(dsn, batch_size=claim)))
        sweep.append({"claim_batch_size": claim, "pipeline_chunks_per_s": round(rate, 1), "encode_share": round(share, 3)})
    raw_after = e2e_throughput.raw_encode_rate(embedder, texts, bs)
    raw = (raw_before + raw_after) / 2
    for row in sweep:
        row["efficiency"] = round(row["pipeline_chunks_per_s"] / raw, 3)
    main = next((r for r in sweep if r["claim_batch_size"] == 64), sweep[-1])
    return {
        "chunks": n,
        "device": str(embedder._model.device),
        "embed_batch_size": bs,
        "raw_encode_chunks_per_s": round(raw, 1),
        "raw_encode_runs": [round(raw_before, 1), round(raw_after, 1)],
        "sweep": sweep,
        "efficiency": main["efficiency"],
    }


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
    out: dict = {"rows": rows, "rows_per_transaction": 5000}
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
def _pct(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def freshness_run(dsn: str, embedder: Embedder, seconds: float, rate: float, notify: bool) -> dict:
    """Insert one chunk every 1/rate s for `seconds`, each in its own transaction;
    poll Qdrant every few ms for the ids not yet visible. The encode time of a
    chunk's batch is taken by wrapping the embedder's encode call (instance
    attribute; the daemon's code is unchanged)."""
    encode_of: dict[str, float] = {}
    original = embedder._encode

    def timed(texts: list[str]):
        started = time.perf_counter()
        try:
            return original(texts)
        finally:
            took = time.perf_counter() - started
            for t in texts:
                encode_of[t] = took

    embedder._encode = timed
    texts = e2e_throughput.make_texts(int(seconds * rate) + 1, seed=11 if notify else 13)
    qdrant = AsyncQdrantClient(location=":memory:")
    settings = settings_for(dsn)  # default poll_interval, claim batch, concurrency
    with psycopg.connect(dsn, autocommit=True) as conn:
        doc_id = new_document(conn)
        if not notify:  # polling only: the outbox's NOTIFY trigger is off for this run
            conn.execute("ALTER TABLE outboxd.outbox DISABLE TRIGGER outboxd_notify")
    daemon = Daemon(settings, dsn, embedder=embedder, qdrant=qdrant)
    pending: dict[str, tuple[float, str]] = {}
    latency: list[float] = []
    overhead: list[float] = []
    writing_done = asyncio.Event()
    try:
        await daemon.start()
        collection = daemon.core.qdrant_store.collection
        runner = asyncio.create_task(daemon.run())
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
        embedder._encode = original
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


def figure_freshness(pg: Postgres, embedder: Embedder, seconds: float, rate: float) -> dict:
    embedder._cache.clear()
    out = {"seconds": seconds, "chunks_per_s": rate, "poll_interval_s": Settings.model_fields["poll_interval"].default,
           "qdrant_poll_ms": 5}
    for mode, notify in (("notify", True), ("polling", False)):
        out[mode] = asyncio.run(freshness_run(pg.fresh(), embedder, seconds, rate, notify))
    return out


# --- figures 4 and 5: wasted work, transport ceiling -----------------------------------
def sql(dsn: str, statement: str, params=()) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)


def add_chunks(dsn: str, title: str, texts: list[str]) -> object:
    """One document with one chunk per text, in one transaction; its id."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        doc_id = new_document(conn, title)
        with conn.cursor().copy("COPY chunks (document_id, chunk_index, text) FROM STDIN") as copy:
            for i, t in enumerate(texts):
                copy.write_row((doc_id, i, t))
    return doc_id


async def wasted_work(dsn: str, embedder: Embedder, n: int) -> dict:
    """Encodes counted by the daemon (Stats.embedded) for payload-only updates
    and duplicate texts, each change drained by its own Daemon on one Qdrant."""
    embedder._cache.clear()
    settings = settings_for(dsn)  # the defaults, embedding cache included
    texts = e2e_throughput.make_texts(n, seed=17)
    qdrant = AsyncQdrantClient(location=":memory:")
    try:
        doc_id = add_chunks(dsn, "wasted work", texts)
        d, _ = await drain(settings, dsn, embedder, qdrant)
        assert d.stats.embedded == n, d.stats
        out: dict = {"chunks": n}
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
        out["duplicates_cold_cache"] = {"chunks": n, "embedded": d.stats.embedded}
    finally:
        await qdrant.close()
    return out


async def transport_ceiling(dsn: str, embedder: Embedder, n: int) -> dict:
    """n short chunks converged, then one payload-only update of all of them,
    drained by the real daemon: events/s with no encoding at all."""
    settings = settings_for(dsn)
    qdrant = AsyncQdrantClient(location=":memory:")
    try:
        doc_id = add_chunks(dsn, "transport", [f"short chunk {i}" for i in range(n)])
        await drain(settings, dsn, embedder, qdrant)
        sql(dsn, "UPDATE chunks SET metadata = jsonb_build_object('rev', 2) WHERE document_id = %s", (doc_id,))
        d, seconds = await drain(settings, dsn, embedder, qdrant)
    finally:
        await qdrant.close()
    assert d.stats.embedded == 0 and d.stats.events_acked == n and d.stats.payload_only == n, d.stats
    return {"events": n, "seconds": round(seconds, 3), "events_per_s": round(n / seconds),
            "claim_batch_size": settings.batch_size, "concurrency": settings.concurrency,
            "what": "payload-only updates of converged chunks, daemon in drain mode, Qdrant local mode in memory"}


# --- figure 6: reconcile ---------------------------------------------------------------
def figure_reconcile(pg: Postgres, sizes: list[int]) -> dict:
    runs = [asyncio.run(reconcile_scale.measure(pg.fresh(), n, reconcile_scale.LOCAL_QDRANT_PAGE)) for n in sizes]
    return {"qdrant": "local mode, in memory", "memory": "peak Python allocation during the run (tracemalloc)", "runs": runs}


# --- figure 7: GPU -------------------------------------------------------------------------
def gpu_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


# --- output ------------------------------------------------------------------------------
def collect_figures(d: dict) -> dict:
    f: dict = {}
    f["1_pipeline_efficiency"] = d["pipeline"]["efficiency"]
    for m in ("executemany", "copy"):
        f[f"2_write_cost_ratio_{m}"] = d["write_path"][m]["ratio"]
        f[f"2_write_chunks_per_s_{m}"] = d["write_path"][m]["with_triggers_chunks_per_s"]
    for mode in ("notify", "polling"):
        r = d["freshness"][mode]
        f[f"3_freshness_p50_ms_{mode}"] = r["p50_ms"]
        f[f"3_freshness_p99_ms_{mode}"] = r["p99_ms"]
        f[f"3_freshness_p99_overhead_ms_{mode}"] = r["p99_overhead_ms"]
    f["3_freshness_p50_overhead_ms_notify"] = d["freshness"]["notify"]["p50_overhead_ms"]
    w = d["wasted_work"]
    f["4_encodes_per_metadata_update"] = round(w["metadata"]["embedded"] / w["metadata"]["updates"], 3)
    f["4_encodes_per_title_update"] = round(w["title"]["embedded"] / w["title"]["chunks_affected"], 3)
    f["4_encodes_per_duplicate_text"] = round(w["duplicates_warm_cache"]["embedded"] / w["duplicates_warm_cache"]["chunks"], 3)
    f["4_encodes_per_duplicate_text_after_restart"] = round(
        w["duplicates_cold_cache"]["embedded"] / w["duplicates_cold_cache"]["chunks"], 3)
    f["5_transport_events_per_s_notify"] = d["transport"]["events_per_s"]
    f["5_transport_events_per_s_kafka"] = d["transport_kafka"]["events_per_s"]
    f["5_relay_events_per_s"] = d["transport_kafka"]["relay_events_per_s"]
    f["5_consume_events_per_s"] = d["transport_kafka"]["consume_events_per_s"]
    runs = d["reconcile"]["runs"]
    f["6_reconcile_chunks_per_s"] = runs[-1]["chunks_per_s"]
    f["6_reconcile_peak_mib_growth"] = round(runs[-1]["peak_python_mib_during_run"] / max(runs[0]["peak_python_mib_during_run"], 0.1), 2)
    f["7_gpu_pipeline_efficiency"] = d["gpu"]["efficiency"] if isinstance(d["gpu"], dict) else d["gpu"]
    return {k: f[k] for k in FIGURES}


def markdown(figures: dict, meta: dict) -> str:
    lines = [f"Run {meta['date']} on {meta['machine']}, mode: **{meta['mode']}**.", "",
             "| figure | value | target | met? |", "|---|---|---|---|"]
    for key, (label, target, check) in FIGURES.items():
        v = figures[key]
        if isinstance(v, str):
            met = "—"
        elif check is None:
            met = "—"
        else:
            met = "yes" if check(v, figures) else "**no**"
        shown = f"{v:,}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
        lines.append(f"| {label} | {shown} | {target or '—'} | {met} |")
    return "\n".join(lines) + "\n"


def plots(d: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = d["pipeline"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["claim_batch_size"] for r in p["sweep"]]
    ax.plot(xs, [r["pipeline_chunks_per_s"] for r in p["sweep"]], "o-", label="outboxd, commit → visible in Qdrant")
    ax.axhline(p["raw_encode_chunks_per_s"], color="grey", ls="--", label=f"raw model.encode (batch {p['embed_batch_size']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("claim batch size (events)")
    ax.set_ylabel("chunks/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Figure 1: pipeline throughput, {p['chunks']} mixed-length chunks ({p['device']})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "pipeline_throughput.png", dpi=100)
    plt.close(fig)

    runs = d["reconcile"]["runs"]
    ns = [r["chunks"] for r in runs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    a1.plot(ns, [r["chunks_per_s"] for r in runs], "o-")
    a1.set_xlabel("chunks (N)")
    a1.set_ylabel("chunks/s")
    a1.set_ylim(bottom=0)
    a1.set_title("reconcile rate")
    a2.plot(ns, [r["peak_python_mib_during_run"] for r in runs], "o-", color="tab:orange")
    a2.set_xlabel("chunks (N)")
    a2.set_ylabel("peak MiB (tracemalloc)")
    a2.set_ylim(bottom=0)
    a2.set_title("reconcile peak memory")
    fig.suptitle("Figure 6: reconcile at growing N (Qdrant local mode)")
    fig.tight_layout()
    fig.savefig(out / "reconcile_scale.png", dpi=100)
    plt.close(fig)
    return ["pipeline_throughput.png", "reconcile_scale.png"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness in seconds")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def say(what: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {what}", flush=True)

    started = time.perf_counter()
    pg = Postgres()
    embedder = Embedder(Settings(database_url=pg.base, collection="bench", log_level="WARNING"))
    try:
        asyncio.run(embedder.load())
        d: dict = {}
        say("figure 1: pipeline efficiency")
        d["pipeline"] = figure_pipeline(pg, embedder, sizes["pipeline_chunks"], sizes["claim_batches"])
        say("figure 2: write-path cost")
        d["write_path"] = figure_write_path(pg, sizes["write_rows"])
        say("figure 3: freshness")
        d["freshness"] = figure_freshness(pg, embedder, sizes["freshness_seconds"], sizes["freshness_rate"])
        say("figures 4 and 5: wasted work, transport ceiling")
        d["wasted_work"] = asyncio.run(wasted_work(pg.fresh(), embedder, sizes["wasted_chunks"]))
        d["transport"] = asyncio.run(transport_ceiling(pg.fresh(), embedder, sizes["transport_chunks"]))
        with kafka_transport.kafka_bootstrap() as bootstrap:
            d["transport_kafka"] = asyncio.run(kafka_transport.measure(
                pg.fresh(), embedder, sizes["transport_chunks"], bootstrap, settings_for, add_chunks, sql))
        say("figure 6: reconcile")
        d["reconcile"] = figure_reconcile(pg, sizes["reconcile_sizes"])
        if gpu_available():
            say("figure 7: pipeline efficiency on the GPU")
            gpu = Embedder(Settings(database_url=pg.base, collection="bench", log_level="WARNING", device="cuda"))
            asyncio.run(gpu.load())
            d["gpu"] = figure_pipeline(pg, gpu, sizes["pipeline_chunks"], [64])
            gpu.close()
        else:
            d["gpu"] = NO_GPU
    finally:
        embedder.close()
        pg.close()
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {'GPU' if gpu_available() else 'no GPU'}, "
                   f"Python {platform.python_version()}",
        "mode": "quick (tiny sizes: checks the harness, not a measurement)" if args.quick else "full",
        "sizes": sizes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    figures = collect_figures(d)
    result = {"meta": meta, "figures": figures, "details": d}
    (args.out / "results.json").write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    (args.out / "results.md").write_text(markdown(figures, meta))
    plots(d, args.out)
    say(f"done in {meta['seconds']}s: {args.out}")
    print(markdown(figures, meta))
    return result
