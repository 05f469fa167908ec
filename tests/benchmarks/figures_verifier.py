"""Figure 9: what the continuous verifier costs.

- Its CPU per 10,000 chunks checked: n chunks converged (random vectors under
  the real model's fingerprint, services.converge's way), then the daemon's own
  Verifier (Reconciler.check_range, the lease row, the metrics) runs one full
  pass unthrottled, in this process as in `outboxd run`; this process's CPU for
  the pass, and the Qdrant server's and PostgreSQL's where this run owns them.
  At the default rate that is a share of one core: CPU per chunk x rate.
- What it does to the pipeline's throughput at its default settings: chunks
  committed to visible in Qdrant with the real model (the daemon in drain mode,
  as figure 1 measures it), on a collection that already holds `base` chunks
  for the verifier to walk, with the verifier beside the daemon and without,
  alternating off, on, off, on; the best of each.
"""
from __future__ import annotations

import asyncio
import time

from daemon.admin.reconcile import Reconciler, enqueue_repair
from daemon.core.chunk_state import Projection
from daemon.core.qdrant_store import QdrantStore
from daemon.embedding.backend import BackendInfo
from daemon.embedding.embedder import Embedder
from daemon.outbox.notify_daemon import NotifyDaemon
from daemon.outbox.settings import VerifySettings
from daemon.outbox.verifier import Verifier, VerifierLease
from daemon.telemetry import Metrics
from db.gateway import make_pool
from tests.benchmarks import e2e_throughput
from tests.benchmarks.services import (
    NEEDS_SERVER,
    Postgres,
    QdrantTarget,
    add_chunks,
    converge,
    free_embedder,
    load_average,
    settings_for,
)

DEFAULT = VerifySettings()


class OnePass(VerifierLease):
    """The daemon's lease row, which stops the verifier once its first pass is complete."""

    def __init__(self, *args, stop: asyncio.Event, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.done = stop

    async def complete(self, checked, drift):
        state = await super().complete(checked, drift)
        self.done.set()
        return state


async def _physical(client, alias: str) -> str:
    return {a.alias_name: a.collection_name for a in (await client.get_aliases()).aliases}.get(alias, alias)


def verifier(pool, client, collection: str, alias: str, projection: Projection, settings: VerifySettings,
             stop: asyncio.Event,
             lease: VerifierLease | None = None) -> Verifier:
    """A verifier made as NotifyDaemon.verifier() makes it (metrics as no-ops)."""
    lease = lease or VerifierLease(pool, alias, "bench-verifier", settings.lease_seconds)
    return Verifier(Reconciler(pool, client, collection, projection), lease, settings, Metrics(None),
                    enqueue_repair(pool), stop)


async def pass_cost(pg: Postgres, target: QdrantTarget, info: BackendInfo, n: int) -> dict:
    dsn = pg.fresh()
    alias = target.name("verify_cpu")
    add_chunks(dsn, "verified", [f"verified chunk {i}" for i in range(n)])
    assert await converge(dsn, target, alias, info) == n
    probe = free_embedder(settings_for(dsn, target, collection=alias), info)
    await probe.load()  # the fingerprint the converged points carry: the real model's
    client = target.client()
    pool = make_pool(dsn, application_name="outboxd:bench", min_size=1, max_size=2)
    await pool.open(wait=True)
    try:
        collection = await _physical(client, alias)
        await target.settle(collection)
        unthrottled = VerifySettings(chunks_per_second=1e9, range_size=DEFAULT.range_size)
        stop = asyncio.Event()
        lease = OnePass(pool, alias, "bench-verifier", unthrottled.lease_seconds, stop=stop)
        projection = await QdrantStore(client, alias, collection).projection(probe.fingerprint.id)
        task = verifier(pool, client, collection, alias, projection, unthrottled, stop, lease)
        q0, p0 = target.cpu_seconds(), pg.cpu_seconds()
        c0, w0 = time.process_time(), time.perf_counter()
        running = asyncio.create_task(task.run())
        await asyncio.wait_for(lease.done.wait(), 600)
        cpu, seconds = time.process_time() - c0, time.perf_counter() - w0
        q1, p1 = target.cpu_seconds(), pg.cpu_seconds()
        await running
        state = await lease.take()
    finally:
        await pool.close()
        await client.close()
    assert state.passes == 1 and state.last_pass_checked == n and not state.last_pass_drift, state
    per_10k = cpu * 10_000 / n
    return {
        "chunks": n, "range_size": DEFAULT.range_size, "seconds": round(seconds, 3),
        "chunks_per_s_unthrottled": round(n / seconds),
        "process_cpu_s": round(cpu, 3),
        "cpu_s_per_10k": round(per_10k, 4),
        "qdrant_cpu_s_per_10k": None if q0 is None else round((q1 - q0) * 10_000 / n, 4),
        "postgresql_cpu_s_per_10k": None if p0 is None else round((p1 - p0) * 10_000 / n, 4),
        "default_chunks_per_second": DEFAULT.chunks_per_second,
        "core_share_at_default_rate": round(per_10k / 10_000 * DEFAULT.chunks_per_second, 5),
        "engine_in_process": target.is_local,  # local mode: the engine's CPU is in this process's
    }


async def pipeline_round(dsn: str, target: QdrantTarget, embedder: Embedder, alias: str, texts: list[str],
                         with_verifier: bool) -> float:
    """Chunks/s from the commit of `texts` to all of them in Qdrant, the daemon at its
    defaults, with the verifier beside it at its defaults or not."""
    embedder._cache.clear()
    settings = settings_for(dsn, target, collection=alias)
    client = target.client()
    daemon = NotifyDaemon(settings, dsn, embedder=embedder, qdrant=client)
    await daemon.start()
    stop = asyncio.Event()
    beside = None
    try:
        if with_verifier:
            projection = await daemon.writer.store.projection(embedder.fingerprint.id)
            beside = asyncio.create_task(verifier(daemon.pool, client, daemon.outbox.collection, alias,
                                                  projection, DEFAULT, stop).run())
        add_chunks(dsn, "pipeline", texts)
        started = time.perf_counter()
        assert await daemon.run(drain=True) == 0
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        if beside is not None:
            await beside
        await daemon.close()
        await client.close()
    assert daemon.stats.upserted == len(texts), daemon.stats
    return len(texts) / elapsed


def throughput(pg: Postgres, target: QdrantTarget, embedder: Embedder, info: BackendInfo, chunks: int,
               base: int) -> dict:
    dsn = pg.fresh()
    alias = target.name("verify_pipeline")
    add_chunks(dsn, "already converged", [f"base chunk {i}" for i in range(base)])
    asyncio.run(converge(dsn, target, alias, info))
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for rnd, on in enumerate((False, True, False, True)):
        texts = e2e_throughput.make_texts(chunks, seed=100 + rnd)
        rates["on" if on else "off"].append(asyncio.run(pipeline_round(dsn, target, embedder, alias, texts, on)))
    return {"chunks_per_round": chunks, "base_chunks": base,
            "chunks_per_s_without": [round(r, 1) for r in rates["off"]],
            "chunks_per_s_with": [round(r, 1) for r in rates["on"]],
            "ratio": round(max(rates["on"]) / max(rates["off"]), 3)}


def figure_verifier(pg: Postgres, target: QdrantTarget, embedder: Embedder, info: BackendInfo, cpu_chunks: int,
                    pipeline_chunks: int, base: int) -> dict | str:
    if not target.is_server:  # the verifier reads what converge wrote: in local mode each client is a new engine
        return NEEDS_SERVER
    out: dict = {"qdrant": target.label, "load_average_before": load_average(),
                 "default": DEFAULT.model_dump()}
    out["pass"] = asyncio.run(pass_cost(pg, target, info, cpu_chunks))
    out["throughput"] = throughput(pg, target, embedder, info, pipeline_chunks, base)
    out["load_average_after"] = load_average()
    return out
