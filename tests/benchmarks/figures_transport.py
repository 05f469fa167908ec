"""Figures about moving events without encoding: the notify transport's
ceiling and the Kafka path (5), Qdrant traffic per payload-only event (5b),
the CPU of the daemon, the Qdrant server and PostgreSQL per 10,000
payload-only events (5c), and gRPC against REST upserts on one server (5f).

Every round here: n short chunks converged with random vectors under the real
model's fingerprint (services.converge's way, on the same Qdrant), the
server's optimizers left to finish, then one metadata update of all of them,
drained by the real NotifyDaemon: n payload-only events, no encoding at all."""
from __future__ import annotations

import asyncio
import gc
import time
import uuid

import numpy as np
from qdrant_client import AsyncQdrantClient, models

from daemon.config import Settings
from daemon.core.qdrant_store import Upserts
from daemon.embedding.backend import BackendInfo
from daemon.embedding.embedder import Embedder
from daemon.outbox.notify_daemon import NotifyDaemon
from tests.benchmarks import kafka_transport
from tests.benchmarks.qdrant_counter import CountingQdrant, WireBytes
from tests.benchmarks.services import (
    Postgres,
    QdrantTarget,
    add_chunks,
    drain,
    free_embedder,
    load_average,
    settings_for,
    sql,
    update_metadata,
)

NO_GRPC = "not measured: needs a Qdrant server (local mode speaks no gRPC)"


def _per_10k(value: float | None, n: int) -> float | None:
    return None if value is None else round(value * 10_000 / n, 3)


async def payload_only_round(pg: Postgres, dsn: str, n: int, settings: Settings, info: BackendInfo,
                             target: QdrantTarget, client, wire: WireBytes | None = None) -> dict:
    """n chunks converged through `client`, one payload-only update of all, the
    drain measured: seconds, this process's CPU in run() (minus the engine's where
    local mode runs it here), the Qdrant server's and PostgreSQL's CPU during the
    drain (where this run owns them), the server's CPU after it until its
    optimizers are idle again, and, through a CountingQdrant, the traffic."""
    embedder = free_embedder(settings, info)
    await embedder.load()
    doc_id = add_chunks(dsn, "payload-only", [f"short chunk {i}" for i in range(n)])
    await drain(settings, dsn, embedder, client)  # converge: random vectors, the real model's fingerprint
    settled_before = await target.settle(settings.collection)
    update_metadata(dsn, doc_id, 2)
    daemon = NotifyDaemon(settings, dsn, embedder=embedder, qdrant=client)
    await daemon.start()
    try:
        if isinstance(client, CountingQdrant):
            client.reset()  # the start-up's requests are not the events'
        if wire is not None:
            wire.reset()
        gc.collect()
        gc.freeze()  # as `outboxd run` does once started: full collections skip what start-up loaded
        q0, p0, threads0 = target.cpu_seconds(), pg.cpu_seconds(), target.thread_cpu()
        c0, w0 = time.process_time(), time.perf_counter()
        assert await daemon.run(drain=True) == 0
        cpu, seconds = time.process_time() - c0, time.perf_counter() - w0
        q1, p1, threads1 = target.cpu_seconds(), pg.cpu_seconds(), target.thread_cpu()
        gc.unfreeze()
    finally:
        await daemon.close()
    settled_after = await target.settle(settings.collection)
    q2 = target.cpu_seconds()
    s = daemon.stats
    assert s.embedded == 0 and s.events_acked == n and s.payload_only == n, s
    engine = client.cpu_inside if isinstance(client, CountingQdrant) and client.local else 0.0
    out = {"events": n, "claim_batch_size": settings.batch_size, "concurrency": settings.concurrency,
           "seconds": round(seconds, 3), "events_per_s": round(n / seconds),
           "process_cpu_s": round(cpu, 3), "engine_cpu_s": round(engine, 3),
           "daemon_cpu_s_per_10k": round((cpu - engine) * 10_000 / n, 3),
           "qdrant_cpu_s_per_10k_during": _per_10k(None if q0 is None else q1 - q0, n),
           "qdrant_cpu_s_per_10k_after": _per_10k(None if q0 is None else q2 - q1, n),
           "qdrant_threads_cpu_s_per_10k_during": {k: _per_10k(v - threads0.get(k, 0.0), n)
                                                   for k, v in threads1.items() if v - threads0.get(k, 0.0) > 0.01},
           "postgresql_cpu_s_per_10k": _per_10k(None if p0 is None else p1 - p0, n),
           "seconds_until_optimizers_idle": {"before": settled_before, "after": settled_after}}
    if isinstance(client, CountingQdrant):
        out["traffic_per_event"] = client.per_event(n)
    if wire is not None:
        out["rest_body_bytes_per_event"] = wire.per_event(n)
    return out


async def _round(pg: Postgres, target: QdrantTarget, n: int, claim: int, info: BackendInfo, collection: str,
                 count_bytes: bool) -> dict:
    raw = target.client()
    wire = WireBytes(raw) if count_bytes and target.is_server and not target.prefer_grpc else None
    client = CountingQdrant(raw, local=target.is_local, count_bytes=count_bytes)
    dsn = pg.fresh()
    settings = Settings(database_url=dsn, collection=collection, log_level="WARNING", batch_size=claim, **target.settings())
    try:
        out = await payload_only_round(pg, dsn, n, settings, info, target, client, wire)
    finally:
        await raw.close()
    out["qdrant"] = target.label
    return out


def figure_traffic_and_cpu(pg: Postgres, target: QdrantTarget, info: BackendInfo, n: int, claims: list[int],
                           repeats: int = 1) -> dict:
    """5b: traffic per payload-only event through CountingQdrant around the daemon's
    client, and (over REST) the bytes on the wire. 5c: the CPU per 10,000 events,
    claim by claim, `repeats` times, interleaved; the least daemon CPU of the runs
    is the figure (a busy neighbour only ever adds). Local mode is a second row."""
    out: dict = {"events": n, "load_average_before": load_average(), "qdrant": target.label}
    out["traffic"] = asyncio.run(_round(pg, target, n, 256, info, target.name("traffic"), count_bytes=True))
    targets = {"server" if target.is_server else "local": target}
    if target.is_server:
        targets["local"] = QdrantTarget.local()
    runs: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for claim in claims:
            for which, t in targets.items():
                runs.setdefault(f"{which}_claim_{claim}", []).append(asyncio.run(
                    _round(pg, t, n, claim, info, t.name(f"cpu_{claim}"), count_bytes=False)))
    out["cpu"] = {key: {**min(rs, key=lambda r: r["daemon_cpu_s_per_10k"]),
                        "runs_daemon_cpu_s_per_10k": [r["daemon_cpu_s_per_10k"] for r in rs]}
                  for key, rs in runs.items()}
    out["primary"] = "server" if target.is_server else "local"
    out["load_average_after"] = load_average()
    return out


# --- figure 5: the transport ceiling, notify and Kafka -------------------------------------
def transport_ceiling(pg: Postgres, target: QdrantTarget, info: BackendInfo, n: int) -> dict:
    """Figure 5, notify path: n payload-only events drained by the real daemon at the defaults."""
    dsn = pg.fresh()
    settings = settings_for(dsn, target, collection=target.name("transport"))

    async def go() -> dict:
        client = target.client()
        try:
            return await payload_only_round(pg, dsn, n, settings, info, target, client)
        finally:
            await client.close()

    return {**asyncio.run(go()), "qdrant": target.label,
            "what": "payload-only updates of converged chunks, the real daemon in drain mode, default settings"}


def transport_kafka(pg: Postgres, target: QdrantTarget, embedder: Embedder, n: int, bootstrap: str) -> dict:
    r = asyncio.run(kafka_transport.measure(
        pg.fresh(), embedder, n, bootstrap, lambda dsn, **kw: settings_for(dsn, target, **kw), add_chunks, sql,
        qdrant=target.client(), collection=target.name("kafka")))
    return {**r, "qdrant": target.label}


# --- figure 5f: gRPC against REST -------------------------------------------------------------
async def _upserts_per_s(client: AsyncQdrantClient, collection: str, n: int, batch: int, dim: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = vectors.tolist()
    started = time.perf_counter()
    for lo in range(0, n, batch):
        up = Upserts()
        for i in range(lo, min(n, lo + batch)):
            up.add(str(uuid.UUID(int=seed * 10_000_000 + i)), rows[i],
                   {"chunk_index": i, "outboxd": {"content_hash": f"{i:064x}"}, "title": "bench"}, "bench")
        await client.batch_update_points(collection, [up.operation(None)], wait=True)
    return n / (time.perf_counter() - started)


def figure_grpc(target: QdrantTarget, n: int, batch: int = 256, dim: int = 384) -> dict | str:
    """Upserts (the daemon's own batch operation) through REST and through gRPC
    to the same server, alternating REST, gRPC, REST, gRPC; best of each."""
    if not target.is_server:
        return NO_GRPC

    async def go() -> dict:
        rest, grpc = target.client(prefer_grpc=False), target.client(prefer_grpc=True)
        collection = target.name("grpc_vs_rest")
        rates: dict[str, list[float]] = {"rest": [], "grpc": []}
        try:
            await rest.create_collection(collection, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE))
            for rnd, (name, client) in enumerate([("rest", rest), ("grpc", grpc)] * 2):
                rates[name].append(await _upserts_per_s(client, collection, n, batch, dim, seed=rnd + 1))
        finally:
            await rest.close()
            await grpc.close()
        return {"points": n, "batch": batch, "qdrant": target.label, "rest_points_per_s": [round(r) for r in rates["rest"]],
                "grpc_points_per_s": [round(r) for r in rates["grpc"]],
                "ratio": round(max(rates["grpc"]) / max(rates["rest"]), 3)}

    try:
        return asyncio.run(go())
    except Exception as exc:  # noqa: BLE001 - a server without gRPC reachable: said in the figure
        return f"not measured: gRPC to {target.url} failed: {type(exc).__name__}: {exc}"[:300]
