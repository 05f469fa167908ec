"""Figures about Qdrant as its users deploy it: a source deleted with its
chunks (11), the server's memory and the search's recall by quantization and
on-disk setting (12), and figures 5d and 5e against a 3-node cluster.

11 and the cluster rows run the CLI as deployed (`python -m daemon.cli run`),
as figures_scaleout does; 12 needs no outboxd process: it measures the
collection outboxd's own CollectionShape creates, on a fresh server per
setting, with vectors made from the real model's (vector_set says how)."""
from __future__ import annotations

import asyncio
import re
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
from qdrant_client import QdrantClient, models

from daemon.core.collection_shape import CollectionShape
from daemon.core.settings import QdrantSettings
from daemon.corpus import corpus_documents
from daemon.embedding.backend import BackendInfo
from daemon.embedding.embedder import Embedder
from tests.benchmarks.figures_scaleout import OutboxdProcess, process_env, wait_until
from tests.benchmarks.services import (
    NEEDS_SERVER,
    Postgres,
    QdrantTarget,
    converge,
    load_average,
    outbox_pending,
)
from tests.qdrant_server import QdrantServer, find_binary

NEEDS_BINARY = "not measured: needs the Qdrant server binary (tests/qdrant_server.py) to start a fresh server per setting"


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# --- figure 11: a source deleted with its chunks -----------------------------------------------
def _add_source(conn: psycopg.Connection, tag: str, chunks: int) -> str:
    """One source, one document, `chunks` chunks (COPY), in one transaction; the source's id."""
    with conn.transaction():
        sid = conn.execute("INSERT INTO sources (source_type) VALUES ('api') RETURNING id").fetchone()[0]
        doc = conn.execute("INSERT INTO documents (source_id, title) VALUES (%s, %s) RETURNING id",
                           (sid, f"cascade {tag}")).fetchone()[0]
        with conn.cursor().copy("COPY chunks (document_id, chunk_index, text) FROM STDIN") as copy:
            for i in range(chunks):
                copy.write_row((doc, i, f"source {tag} chunk {i}"))
    return str(sid)


def _listening(conn: psycopg.Connection) -> bool:
    """A session of this database waits on LISTEN (the daemon's wake-up)."""
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND query LIKE 'LISTEN %'").fetchone()[0] > 0


async def _gone_after(client, collection: str, source_id: str, dsn: str, poll: float) -> dict:
    """DELETE the source (its documents and chunks go by ON DELETE CASCADE) and
    poll Qdrant's exact count of its points until none is left: seconds from
    the DELETE's return (its commit: autocommit) to the first point gone and to
    the last."""
    where = models.Filter(must=[models.FieldCondition(key="source_id", match=models.MatchValue(value=source_id))])
    before = (await client.count(collection, count_filter=where, exact=True)).count
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("DELETE FROM sources WHERE id = %s", (source_id,))
        committed = time.perf_counter()
    first = None
    deadline = committed + 120
    while True:
        left = (await client.count(collection, count_filter=where, exact=True)).count
        now = time.perf_counter()
        if left < before and first is None:
            first = now - committed
        if left == 0:
            return {"points": before, "first_gone_s": first, "all_gone_s": now - committed}
        if now > deadline:
            raise TimeoutError(f"{left} of {before} points of source {source_id} still in Qdrant after 120 s")
        await asyncio.sleep(poll)


def figure_cascade_delete(pg: Postgres, target: QdrantTarget, info: BackendInfo, chunks: int, runs: int,
                          poll: float = 0.005) -> dict | str:
    """`runs` + 1 sources of `chunks` chunks each, converged (random vectors under
    the real model's fingerprint); one `python -m daemon.cli run` (default
    settings) started and listening; then each source deleted in turn (the first
    one a warm-up, not counted), each once the previous one's events are
    acknowledged and the server's optimizers are idle."""
    if not target.is_server:
        return NEEDS_SERVER
    dsn = pg.fresh()
    collection = target.name("cascade")
    with psycopg.connect(dsn, autocommit=True) as conn:
        sources = [_add_source(conn, str(k), chunks) for k in range(runs + 1)]
    assert asyncio.run(converge(dsn, target, collection, info)) == chunks * (runs + 1)
    out: dict = {"qdrant": target.label, "chunks_per_source": chunks, "runs": runs, "qdrant_poll_ms": poll * 1000,
                 "load_average_before": load_average(),
                 "what": f"DELETE FROM sources of one source with {chunks} chunks (ON DELETE CASCADE: {chunks} delete "
                         "events in one transaction), one `python -m daemon.cli run` process (default settings) idle "
                         "and listening; from the DELETE's commit to Qdrant's exact count of points with that "
                         f"source_id at 0, polled every {poll * 1000:g} ms; each run once the outbox is empty and the "
                         "server's optimizers are idle; the first run a warm-up, not counted"}
    proc = OutboxdProcess(["run"], process_env(dsn, target, collection, tempfile.mkdtemp(prefix="outboxd-bench-data-")))
    samples: list[dict] = []
    try:
        with psycopg.connect(dsn, autocommit=True) as watch:
            wait_until("the daemon listening", lambda: bool(proc.said("outboxd running")) and _listening(watch),
                       [proc], 300)

        async def go() -> None:
            client = target.client(prefer_grpc=False)
            try:
                for sid in sources:
                    await target.settle(collection)
                    samples.append(await _gone_after(client, collection, sid, dsn, poll))
                    deadline = time.monotonic() + 120
                    while outbox_pending(dsn):  # every event acknowledged before the next run
                        if not proc.alive() or time.monotonic() > deadline:
                            raise RuntimeError(f"the daemon left {outbox_pending(dsn)} events:\n{proc.tail()}")
                        await asyncio.sleep(0.05)
            finally:
                await client.close()

        asyncio.run(go())
        code = proc.stop()
    finally:
        proc.close()
    assert code == 0, f"outboxd run exited {code}"
    counted = samples[1:] or samples
    assert all(s["points"] == chunks for s in counted), [s["points"] for s in counted]
    ms = lambda xs, q: round(percentile(xs, q) * 1000, 1)
    last = [s["all_gone_s"] for s in counted]
    first = [s["first_gone_s"] for s in counted if s["first_gone_s"] is not None]
    out.update(p50_ms=ms(last, 50), p99_ms=ms(last, 99), max_ms=round(max(last) * 1000, 1),
               first_point_gone_p50_ms=ms(first, 50) if first else None,
               samples_ms=[round(s * 1000, 1) for s in last], load_average_after=load_average())
    return out


# --- figure 12: memory and recall by quantization and on-disk setting ---------------------------
SETTINGS: dict[str, dict] = {
    "none": {"quantization": "none"},
    "scalar": {"quantization": "scalar"},
    "binary": {"quantization": "binary"},
    "scalar_on_disk": {"quantization": "scalar", "on_disk": True},
    "none_on_disk": {"quantization": "none", "on_disk": True},
}


def corpus_texts() -> list[str]:
    """Real texts from the shipped corpus: each document's words in windows of
    12, 20 and 32 words, every third word a new start (as overlapping chunks would be)."""
    texts: list[str] = []
    for doc in corpus_documents():
        words = re.findall(r"\S+", " ".join(doc["paragraphs"]))
        for size in (12, 20, 32):
            texts += [" ".join(words[i:i + size]) for i in range(0, max(1, len(words) - size + 1), 3)]
    return list(dict.fromkeys(texts))


def vector_set(embedder: Embedder, points: int, queries: int, real: int | None = None,
               seed: int = 12) -> tuple[np.ndarray, np.ndarray, dict]:
    """(the collection's vectors, the queries, how they were made). The real
    model's vectors of corpus_texts() (`real` of them where given); `queries` of
    them held out as the queries; the rest go into the collection with synthetic
    vectors around them up to `points`: a real vector plus Gaussian noise shaped
    like the real vectors' own covariance (so it spreads along the directions
    the model uses, not uniformly), scaled so that a synthetic vector's cosine
    to its real one is about 0.85, normalised."""
    rng = np.random.default_rng(seed)
    texts = corpus_texts()
    if real is not None:
        texts = [texts[i] for i in sorted(rng.choice(len(texts), size=min(real, len(texts)), replace=False))]
    vectors = asyncio.run(embedder.backend.encode(texts)).vectors.astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(len(vectors))
    query_vectors, base = vectors[order[:queries]], vectors[order[queries:]]
    centred = base - base.mean(axis=0)
    cov = centred.T @ centred / max(1, len(base) - 1)
    shape = np.linalg.cholesky(cov + 1e-6 * np.eye(cov.shape[0], dtype=cov.dtype))
    extra = max(0, points - len(base))
    parents = base[rng.integers(0, len(base), size=extra)]
    noise = rng.standard_normal((extra, base.shape[1])).astype(np.float32) @ shape.T
    # a unit vector p plus noise n has cosine 1/sqrt(1 + |n|^2) to p (n nearly orthogonal to p): 0.85 at |n| = 0.62
    scale = 0.62 / float(np.sqrt(np.trace(cov)))
    synthetic = parents + scale * noise
    synthetic /= np.linalg.norm(synthetic, axis=1, keepdims=True)
    data = np.concatenate([base, synthetic])[:points].astype(np.float32)
    cos_to_parent = float(np.mean(np.sum(synthetic * parents, axis=1))) if extra else None
    top = np.sort(query_vectors @ data.T, axis=1)[:, ::-1]
    real_top = np.sort(query_vectors @ base.T, axis=1)[:, ::-1]
    how = {"real_vectors": len(base), "synthetic_vectors": extra, "queries": len(query_vectors),
           "texts": "windows of 12, 20 and 32 words (every third word a new start) of the shipped corpus "
                    "(daemon/corpus/corpus.json), embedded by all-MiniLM-L6-v2; queries: real texts held out",
           "synthetic": "a real vector + Gaussian noise with the real vectors' covariance, scaled so the cosine "
                        "to that real vector is about 0.85, normalised",
           # binary quantization keeps one sign bit per dimension: a dimension where nearly every vector has
           # the same sign tells the vectors apart by almost nothing
           "share_of_dimensions_90pct_one_sign": round(float(np.mean(np.maximum(
               (base > 0).mean(axis=0), (base < 0).mean(axis=0)) >= 0.9)), 3),
           "mean_cosine_synthetic_to_its_real": None if cos_to_parent is None else round(cos_to_parent, 3),
           "queries_mean_cosine_top1_top10": [round(float(top[:, 0].mean()), 3), round(float(top[:, 9].mean()), 3)],
           "queries_mean_cosine_top1_top10_real_only": [round(float(real_top[:, 0].mean()), 3),
                                                         round(float(real_top[:, min(9, real_top.shape[1] - 1)].mean()), 3)]}
    return data, query_vectors, how


def server_memory(pid: int) -> dict:
    """The process's resident memory (MiB): all of it, anonymous, file-backed (memory-mapped files)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mib": fields.get("VmRSS"), "anon_mib": fields.get("RssAnon"), "file_mib": fields.get("RssFile")}


def wait_optimized(client: QdrantClient, collection: str, timeout: float = 3600.0, quiet: float = 3.0,
                   done: tuple = (models.CollectionStatus.GREEN,)) -> float:
    """Wait until the collection's status is one of `done` with its optimizers idle
    for `quiet` seconds on end; the seconds waited."""
    started = time.perf_counter()
    green_since = None
    while (now := time.perf_counter()) - started < timeout:
        info = client.get_collection(collection)
        idle = info.status in done and info.optimizer_status == models.OptimizersStatusOneOf.OK
        green_since = (green_since or now) if idle else None
        if green_since is not None and now - green_since >= quiet:
            return round(now - started - quiet, 1)
        time.sleep(0.25)
    raise TimeoutError(f"collection {collection} not optimized within {timeout:.0f} s")


def top_ids(client: QdrantClient, collection: str, queries: np.ndarray, params: models.SearchParams | None,
            k: int = 10) -> list[set]:
    """The ids of each query's top k, searched with `params`."""
    found = []
    for lo in range(0, len(queries), 50):
        answers = client.query_batch_points(collection, [
            models.QueryRequest(query=q.tolist(), limit=k, params=params) for q in queries[lo:lo + 50]])
        found += [{p.id for p in a.points} for a in answers]
    return found


def recall_at_k(exact: list[set], approx: list[set], k: int = 10) -> float:
    """Mean share of the exact top k that the other search returned."""
    return round(sum(len(e & a) for e, a in zip(exact, approx, strict=True)) / (k * len(exact)), 4)


def _one_setting(binary: Path, name: str, knobs: dict, data: np.ndarray, queries: np.ndarray,
                 oversampling: list[float]) -> dict:
    shape = CollectionShape(QdrantSettings(**knobs))
    collection = f"memory_{name}"
    rng = np.random.default_rng(0)
    out: dict = {"setting": name, "qdrant_settings": {k: str(v).lower() for k, v in knobs.items()}}
    with QdrantServer(binary) as server:
        out["empty_server"] = server_memory(server.pid)
        client = QdrantClient(url=server.url, prefer_grpc=True, grpc_port=server.grpc_port, timeout=300,
                              check_compatibility=False)
        try:
            client.create_collection(collection, **shape.create_kwargs(data.shape[1]))
            for field, schema in shape.indexes().items():
                client.create_payload_index(collection, field, field_schema=schema, wait=True)
            # outboxd's indexed keys per point; a document and a source per 100 chunks
            docs = [str(uuid.UUID(int=int(x))) for x in rng.integers(1, 2**63, size=len(data) // 100 + 1)]
            payloads = ({"document_id": docs[i // 100], "source_id": docs[i // 1000], "document_type": "article",
                         "content_hash": f"{i:064x}"} for i in range(len(data)))
            started = time.perf_counter()
            client.upload_collection(collection, vectors=data, payload=payloads, ids=range(1, len(data) + 1),
                                     batch_size=512, parallel=1, wait=True)
            out["upload_s"] = round(time.perf_counter() - started, 1)
            out["optimize_s"] = wait_optimized(client, collection)
            out["after_optimizing"] = server_memory(server.pid)
            info = client.get_collection(collection)
            out["points"], out["indexed_vectors"] = info.points_count, info.indexed_vectors_count
            out["segments"] = info.segments_count
        finally:
            client.close()
        # restarted on its storage: the memory a server serving this collection holds, without the build's
        server.restart()
        client = QdrantClient(url=server.url, prefer_grpc=True, grpc_port=server.grpc_port, timeout=300,
                              check_compatibility=False)
        try:
            # grey: a restarted server holds its optimizations back until the next write; there is none to run
            wait_optimized(client, collection, quiet=1.0,
                           done=(models.CollectionStatus.GREEN, models.CollectionStatus.GREY))
            out["after_restart"] = server_memory(server.pid)
            out["segments_after_restart"] = client.get_collection(collection).segments_count
            found = top_ids(client, collection, queries, shape.search_params())
            # before any exact search, which reads every original vector (on disk too) into memory
            out["after_queries"] = server_memory(server.pid)
            exact = top_ids(client, collection, queries, models.SearchParams(exact=True))
            out["recall_at_10"] = recall_at_k(exact, found)
            if shape.search_params() is not None:
                for o in oversampling:
                    wider = CollectionShape(QdrantSettings(**knobs, search_oversampling=o)).search_params()
                    out[f"recall_at_10_oversampling_{o:g}"] = recall_at_k(exact, top_ids(client, collection, queries, wider))
            out["after_exact_search"] = server_memory(server.pid)
        finally:
            client.close()
        # blocks allocated, not file sizes: Qdrant's write-ahead log and mapped files are preallocated and sparse
        out["storage_mib"] = round(sum(f.stat().st_blocks * 512 for f in (server.folder / "storage").rglob("*")
                                       if f.is_file()) / 2**20, 1)
    return out


def figure_memory_recall(embedder: Embedder, points: int, queries: int, real: int | None = None,
                         oversampling: tuple[float, ...] = (2.0, 4.0, 8.0)) -> dict | str:
    """For each [qdrant] setting in SETTINGS, a fresh server from the tests' binary,
    the collection created by CollectionShape, `points` vectors (vector_set)
    uploaded over gRPC and optimized; its RSS; then restarted on its storage and
    searched as outboxd searches (CollectionShape.search_params: quantized first,
    rescored with the originals), its RSS then (the figure), and the recall@10 of
    that search against exact search, with more oversampling too."""
    binary = find_binary()
    if binary is None:
        return NEEDS_BINARY
    data, query_vectors, how = vector_set(embedder, points, queries, real)
    out: dict = {"qdrant": f"a fresh Qdrant server per setting ({binary.name} as the tests find it)",
                 "points": len(data), "dimension": int(data.shape[1]), "vectors": how,
                 "load_average_before": load_average(),
                 "what": "the server's resident memory (VmRSS, with its anonymous and memory-mapped parts) with one "
                         f"collection of {len(data):,} points created by outboxd's CollectionShape for the setting "
                         "(payload: document_id, source_id, document_type, content_hash, indexed as outboxd indexes "
                         "them; no text), after upload and optimization; then (the figure) restarted on its storage "
                         f"and searched by {len(query_vectors)} queries as outboxd searches, before any exact search "
                         "(which reads every original vector); recall@10: that search (the setting's search_params: "
                         "quantized first, rescored with the originals, Qdrant's default oversampling, and "
                         f"oversampling {', '.join(f'{o:g}' for o in oversampling)}) against exact search "
                         "(SearchParams(exact=True))"}
    out["settings"] = {name: _one_setting(binary, name, knobs, data, query_vectors, list(oversampling))
                       for name, knobs in SETTINGS.items()}
    out["load_average_after"] = load_average()
    return out
