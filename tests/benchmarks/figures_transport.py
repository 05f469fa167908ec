"""Figures about moving events without encoding: the notify transport's
ceiling and the Kafka path (5), Qdrant traffic per payload-only event (5b),
the daemon's own CPU per 10,000 payload-only events (5c), and gRPC against
REST upserts on one server (5f).

Every round here: n short chunks converged with random vectors under the real
model's fingerprint (services.converge's way, on the same Qdrant), then one
metadata update of all of them, drained by the real NotifyDaemon: n
payload-only events, no encoding at all."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import httpx
import numpy as np
from qdrant_client import AsyncQdrantClient, models

from daemon.config import Settings
from daemon.core.qdrant_store import Upserts
from daemon.embedding.backend import BackendInfo
from daemon.embedding.embedder import Embedder
from daemon.outbox.notify_daemon import NotifyDaemon
from tests.benchmarks import kafka_transport
from tests.benchmarks.qdrant_counter import CountingQdrant
from tests.benchmarks.rest_shim import RestShim
from tests.benchmarks.shim_server import SHIM_LABEL
from tests.benchmarks.services import (LOCAL_LABEL, Postgres, QdrantTarget, add_chunks, drain, free_embedder,
                                       load_average, settings_for, sql, update_metadata)

IN_PROCESS_SHIM = SHIM_LABEL + "; in this process (httpx.MockTransport), its engine's CPU subtracted"
NO_GRPC = "not measured: needs a Qdrant server with gRPC (QDRANT_URL); the shim and local mode speak no gRPC"


async def payload_only_round(dsn: str, n: int, settings: Settings, info: BackendInfo, client,
                             engine_cpu: Callable[[], float] | None = None,
                             on_run: Callable[[], None] | None = None) -> dict:
    """n chunks converged through `client`, one payload-only update of all, the
    drain measured: seconds, process CPU of run() minus the engine's CPU where
    it runs in this process (engine_cpu), and, where client is a CountingQdrant,
    its counts for run() alone."""
    embedder = free_embedder(settings, info)
    await embedder.load()
    doc_id = add_chunks(dsn, "payload-only", [f"short chunk {i}" for i in range(n)])
    await drain(settings, dsn, embedder, client)  # converge: random vectors, the real model's fingerprint
    update_metadata(dsn, doc_id, 2)
    daemon = NotifyDaemon(settings, dsn, embedder=embedder, qdrant=client)
    await daemon.start()
    try:
        if isinstance(client, CountingQdrant):
            client.reset()  # the start-up's requests are not the events'
        if on_run is not None:
            on_run()
        e0 = engine_cpu() if engine_cpu else 0.0
        c0, w0 = time.process_time(), time.perf_counter()
        assert await daemon.run(drain=True) == 0
        cpu, seconds = time.process_time() - c0, time.perf_counter() - w0
        engine = (engine_cpu() - e0) if engine_cpu else 0.0
    finally:
        await daemon.close()
    s = daemon.stats
    assert s.embedded == 0 and s.events_acked == n and s.payload_only == n, s
    out = {"events": n, "claim_batch_size": settings.batch_size, "concurrency": settings.concurrency,
           "seconds": round(seconds, 3), "events_per_s": round(n / seconds),
           "process_cpu_s": round(cpu, 3), "engine_cpu_s": round(engine, 3),
           "daemon_cpu_s_per_10k": round((cpu - engine) * 10_000 / n, 3)}
    if isinstance(client, CountingQdrant):
        out["traffic_per_event"] = client.per_event(n)
        if client.local:
            out["engine_cpu_s"] = round(client.cpu_inside, 3)
            out["daemon_cpu_s_per_10k"] = round((cpu - client.cpu_inside) * 10_000 / n, 3)
    return out


class _WireCounter:
    """Bytes of REST bodies through an in-process RestShim, both ways."""

    def __init__(self, shim: RestShim) -> None:
        self.shim = shim
        self.reset()

    def reset(self) -> None:
        self.sent = self.received = self.requests = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        response = await self.shim.handle(request)
        self.requests += 1
        self.sent += len(request.content or b"")
        self.received += len(response.content or b"")
        return response

    def client(self) -> AsyncQdrantClient:
        return AsyncQdrantClient(url="http://qdrant-shim:6333", transport=httpx.MockTransport(self.handle),
                                 check_compatibility=False)


async def _variant(variant: str, dsn: str, n: int, claim: int, info: BackendInfo, target: QdrantTarget,
                   socket_qdrant: QdrantTarget | None, collection: str, count_bytes: bool) -> dict:
    """One payload-only round through one kind of Qdrant:
    - "target": the harness's Qdrant (a server, or local mode in memory);
    - "socket": a Qdrant over a real socket in another process (a server, or the
      shim server): the engine's CPU is not this process's at all;
    - "rest_shim": the REST shim in this process, its engine's CPU subtracted;
    - "local": local mode in memory, the engine's CPU (CountingQdrant.cpu_inside) subtracted."""
    engine_cpu = None
    wire = None
    if variant == "rest_shim":
        shim = RestShim()
        wire = _WireCounter(shim)
        raw = wire.client()
        engine_cpu = lambda: shim.engine_cpu  # noqa: E731
        kw, label = {"qdrant_url": "http://qdrant-shim:6333"}, IN_PROCESS_SHIM
    elif variant == "local" or (variant == "target" and target.is_local):
        raw, kw, label = AsyncQdrantClient(location=":memory:"), {"qdrant_url": None, "qdrant_path": ":memory:"}, LOCAL_LABEL
    elif variant == "socket_no_keepalive":  # what qdrant-client does for a Qdrant at localhost / 127.0.0.1
        raw = AsyncQdrantClient(url=socket_qdrant.url, api_key=socket_qdrant.api_key, timeout=60, check_compatibility=False,
                                limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))
        kw, label = socket_qdrant.settings(), socket_qdrant.label + "; HTTP keep-alive off"
    else:
        where = target if variant == "target" else socket_qdrant
        raw, kw, label = where.client(), where.settings(), where.label
    client = CountingQdrant(raw, local=label == LOCAL_LABEL, count_bytes=count_bytes)
    settings = Settings(database_url=dsn, collection=collection, log_level="WARNING", batch_size=claim, **kw)
    try:
        out = await payload_only_round(dsn, n, settings, info, client, engine_cpu, wire.reset if wire else None)
    finally:
        await raw.close()
    out["qdrant"] = label
    if wire is not None:
        out["rest_body_bytes_per_event"] = {"sent": round(wire.sent / n, 1), "received": round(wire.received / n, 1),
                                            "requests": round(wire.requests / n, 4)}
    return out


def figure_traffic_and_cpu(pg: Postgres, target: QdrantTarget, socket_qdrant: QdrantTarget | None, info: BackendInfo,
                           n: int, claims: list[int], repeats: int = 1) -> dict:
    """5b: traffic per payload-only event through CountingQdrant around the daemon's
    client (the target, claim 64). 5c: the daemon's own CPU per 10,000 events, each
    variant `repeats` times, interleaved; the least CPU of its runs is its figure
    (a busy neighbour only ever adds)."""
    out: dict = {"events": n, "load_average_before": load_average()}
    traffic = asyncio.run(_variant("target", pg.fresh(), n, 64, info, target, socket_qdrant,
                                   target.name("traffic"), count_bytes=True))
    out["traffic"] = traffic
    wire = asyncio.run(_variant("rest_shim", pg.fresh(), n, 64, info, target, socket_qdrant,
                                "traffic_rest", count_bytes=False))
    out["traffic_rest_shim"] = {k: wire[k] for k in ("qdrant", "traffic_per_event", "rest_body_bytes_per_event")}
    primary = "socket" if socket_qdrant is not None else "rest_shim"
    out["primary"] = primary
    variants = [primary] + [v for v in ("rest_shim", "local") if v != primary]
    if socket_qdrant is not None and socket_qdrant.is_shim:  # details only: what a Qdrant at localhost costs
        variants.append("socket_no_keepalive")
    runs: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for claim in claims:
            for v in variants:
                runs.setdefault(f"{v}_claim_{claim}", []).append(asyncio.run(_variant(
                    v, pg.fresh(), n, claim, info, target, socket_qdrant,
                    (socket_qdrant or target).name(f"cpu_{v}_{claim}") if v.startswith("socket") else f"cpu_{v}_{claim}",
                    count_bytes=False)))
    out["cpu"] = {key: {**min(rs, key=lambda r: r["daemon_cpu_s_per_10k"]),
                        "runs_daemon_cpu_s_per_10k": [r["daemon_cpu_s_per_10k"] for r in rs]}
                  for key, rs in runs.items()}
    out["load_average_after"] = load_average()
    return out


# --- figure 5: the transport ceiling, notify and Kafka -------------------------------------
def transport_ceiling(pg: Postgres, target: QdrantTarget, info: BackendInfo, n: int) -> dict:
    """Figure 5, notify path: n payload-only events drained by the real daemon at the defaults."""
    dsn = pg.fresh()
    settings = settings_for(dsn, target, collection=target.name("transport"))
    client = target.client()
    try:
        r = asyncio.run(payload_only_round(dsn, n, settings, info, client))
    finally:
        asyncio.run(client.close())
    return {**r, "qdrant": target.label,
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
                   {"chunk_index": i, "content_hash": f"{i:064x}", "title": "bench"})
        await client.batch_update_points(collection, [up.operation()], wait=True)
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
