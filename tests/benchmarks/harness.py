"""The benchmark harness: every figure, side by side, in one run.

    python -m tests.benchmarks [--quick] [--out DIR] [--device cpu|cuda]

Writes DIR/results.json (every figure, which Qdrant it measured, the raw
measurements), DIR/results.md (figure, value, target, met?, Qdrant measured)
and PNG plots. Services: DATABASE_URL if set, else a throwaway pgserver
PostgreSQL; QDRANT_URL if set (QDRANT_API_KEY, OUTBOXD_QDRANT__PREFER_GRPC),
else a real Qdrant server started from its binary (tests/qdrant_server.py),
else Qdrant local mode in memory (the figures of several processes then say
they need a server); local mode is also measured as a labelled second row of
1d, 5, 5c and 6. KAFKA_BOOTSTRAP_SERVERS, else the tests' single-node Apache
Kafka; the real MiniLM on --device (default: cuda where available). Every
figure is a ratio, a count or a rate measured in this run: absolute times on a
shared machine move from run to run, so the load average is written beside
them. --quick runs the same code at tiny sizes: it checks the harness, it
measures nothing worth publishing.

Figures by theme: figures_embedding (1, 1b, 1c, 1d, 7), figures_outbox (2, 3,
4), figures_transport (5, 5b, 5c, 5f), figures_scaleout (5d, 5e),
large_collection (6, 8), figures_verifier (9), http_backend (10: a fleet's
embedding budget), figures_qdrant (11: a cascaded delete; 12: memory and
recall by quantization; 5d and 5e on a 3-node cluster), search_scale (13:
search at a million chunks; 1e: the pipeline with the sparse vector on);
services holds the set-up, report the table and plots.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
import traceback
from contextlib import ExitStack
from pathlib import Path

import orjson

from daemon.config import Settings
from daemon.embedding.embedder import Embedder
from tests.benchmarks import figures_embedding as emb
from tests.benchmarks import figures_outbox as outbox
from tests.benchmarks import figures_qdrant as production
from tests.benchmarks import figures_scaleout as scale
from tests.benchmarks import figures_transport as transport
from tests.benchmarks import figures_verifier as verifier
from tests.benchmarks import http_backend as http_figures
from tests.benchmarks import kafka_transport, search_scale
from tests.benchmarks import large_collection as large
from tests.benchmarks.report import FIGURES, NO_GPU, collect_figures, markdown, plots
from tests.benchmarks.services import Postgres, QdrantTarget, load_average
from tests.qdrant_server import find_binary

__all__ = ["FIGURES", "FULL", "QUICK", "main"]

FULL = dict(pipeline_chunks=1000, claim_batches=[16, 64, 256], backend_chunks=500, backend_rounds=2,
            ceiling_chunks=20_000, write_rows=100_000, freshness_seconds=60.0, freshness_rate=10.0, wasted_chunks=300,
            transport_chunks=5000, cpu_events=30_000, cpu_repeats=2, scale_events=60_000, scale_counts=[1, 2, 4],
            scale_repeats=2, grpc_points=20_000, large_sizes=[50_000, 100_000, 200_000], local_reconcile=50_000,
            verify_chunks=20_000, verify_pipeline_chunks=400, verify_base=5000, budget_chunks=960,
            cascade_chunks=1000, cascade_runs=20, memory_points=200_000, memory_queries=200, memory_real=None,
            cluster_counts=[1, 2, 4], search_sizes=[100_000, 1_000_000], search_queries=200, search_real=None,
            search_repeats=2, sparse_pipeline_runs=2)
QUICK = dict(pipeline_chunks=24, claim_batches=[8, 64], backend_chunks=24, backend_rounds=1, ceiling_chunks=300,
             write_rows=1000, freshness_seconds=2.0, freshness_rate=10.0, wasted_chunks=12, transport_chunks=200,
             cpu_events=300, cpu_repeats=1, scale_events=2000, scale_counts=[1, 2, 4], scale_repeats=1, grpc_points=1000,
             large_sizes=[200, 600], local_reconcile=600, verify_chunks=1000, verify_pipeline_chunks=24, verify_base=200,
             budget_chunks=96, cascade_chunks=100, cascade_runs=3, memory_points=1500, memory_queries=20,
             memory_real=300, cluster_counts=[1, 2], search_sizes=[1000, 2000], search_queries=12, search_real=150,
             search_repeats=1, sparse_pipeline_runs=1)


def say(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", flush=True)


def run_figures(sizes: dict, device: str, quick: bool, pg: Postgres, target: QdrantTarget) -> dict:
    d: dict = {}
    embedder = Embedder(Settings(database_url=pg.base, collection="bench", log_level="WARNING", embedding={"device": device}))
    asyncio.run(embedder.load())
    info = embedder.info  # the real model's: random vectors written under it are the model's to outboxd
    local = QdrantTarget.local() if target.is_server else None  # the second row of a few figures
    try:
        say("figure 1: pipeline against raw encode")
        d["pipeline"] = emb.figure_pipeline(pg, target, embedder, sizes["pipeline_chunks"], sizes["claim_batches"])
        say("figure 1e: the pipeline with the sparse vector on, against dense only")
        d["sparse_pipeline"] = search_scale.figure_sparse_pipeline(pg, target, embedder, sizes["pipeline_chunks"],
                                                                   sizes["sparse_pipeline_runs"])
        say("figure 1b: each embedding backend")
        d["backends"] = emb.figure_backends(sizes["backend_chunks"], device, sizes["backend_rounds"])
        say("figure 1c: the limit")
        d["limit"] = emb.figure_limit(sizes["pipeline_chunks"], embedder._settings, device, d["backends"], d["pipeline"])
        say("figure 1d: the ceiling (encoding made free)")
        d["ceiling"] = emb.figure_ceiling(pg, target, sizes["ceiling_chunks"], [256, 1024])
        if local is not None:
            d["ceiling_local"] = emb.figure_ceiling(pg, local, sizes["ceiling_chunks"], [256])
        say("figure 2: write-path cost")
        d["write_path"] = outbox.figure_write_path(pg, sizes["write_rows"])
        say("figure 3: freshness")
        d["freshness"] = outbox.figure_freshness(pg, target, embedder, sizes["freshness_seconds"], sizes["freshness_rate"])
        say("figure 4: wasted work")
        d["wasted_work"] = asyncio.run(outbox.wasted_work(pg.fresh(), target, embedder, sizes["wasted_chunks"]))
        say("figure 5: transport ceiling (notify)")
        d["transport"] = transport.transport_ceiling(pg, target, info, sizes["transport_chunks"])
        if local is not None:
            d["transport_local"] = transport.transport_ceiling(pg, local, info, sizes["transport_chunks"])
        say("figures 5b, 5c: Qdrant traffic and the CPU per payload-only event")
        d["traffic_cpu"] = transport.figure_traffic_and_cpu(pg, target, info, sizes["cpu_events"], [64, 256],
                                                           sizes["cpu_repeats"])
        say(f"figure 5d: N daemons ({target.label})")
        d["daemons"] = scale.figure_daemons(pg, target, info, sizes["scale_events"], sizes["scale_counts"],
                                            sizes["scale_repeats"])
        say("figure 5f: gRPC against REST")
        d["grpc"] = transport.figure_grpc(target, sizes["grpc_points"])
        say("figure 10: three daemons on one embedding budget, shared and per process")
        d["fleet_budget"] = http_figures.figure_fleet_budget(pg, target, sizes["budget_chunks"])
        with kafka_transport.kafka_bootstrap() as bootstrap:
            say("figure 5: transport through Kafka")
            d["transport_kafka"] = transport.transport_kafka(pg, target, embedder, sizes["transport_chunks"], bootstrap)
            say("figure 5e: N consumers")
            d["consumers"] = scale.figure_consumers(pg, target, info, sizes["scale_events"], sizes["scale_counts"],
                                                    bootstrap)
            binary = find_binary()
            if binary is None:
                d["daemons_cluster"] = d["consumers_cluster"] = production.NEEDS_BINARY
            else:
                with ExitStack() as stack:
                    say("figures 5d and 5e on a 3-node Qdrant cluster")
                    cluster = QdrantTarget.on_cluster(stack, binary, target.prefer_grpc, replication_factor=2,
                                                      write_consistency_factor=1)
                    d["daemons_cluster"] = scale.figure_daemons(pg, cluster, info, sizes["scale_events"],
                                                                sizes["cluster_counts"], sizes["scale_repeats"])
                    d["consumers_cluster"] = scale.figure_consumers(pg, cluster, info, sizes["scale_events"],
                                                                    sizes["cluster_counts"], bootstrap)
                    cluster.cleanup()
        say("figures 6 and 8: a growing collection (backfill, reconcile)")
        d["large"] = large.figure_large_collection(pg, target, sizes["large_sizes"])
        d["reconcile_local"] = large.local_reconcile(pg, sizes["local_reconcile"])
        say("figure 11: a source deleted with its chunks")
        d["cascade_delete"] = production.figure_cascade_delete(pg, target, info, sizes["cascade_chunks"],
                                                               sizes["cascade_runs"])
        say("figure 12: the server's memory and the search's recall by quantization and on-disk setting")
        d["memory_recall"] = production.figure_memory_recall(embedder, sizes["memory_points"], sizes["memory_queries"],
                                                             sizes["memory_real"])
        say("figure 13: search at a million chunks (dense, native hybrid, PostgreSQL-fused hybrid)")
        d["search_scale"] = search_scale.figure_search_scale(pg, embedder, sizes["search_sizes"], sizes["search_queries"],
                                                             sizes["search_real"], sizes["search_repeats"])
        say("figure 9: the continuous verifier's cost")
        d["verifier"] = verifier.figure_verifier(pg, target, embedder, info, sizes["verify_chunks"],
                                                 sizes["verify_pipeline_chunks"], sizes["verify_base"])
        if emb.gpu_available():
            say("figure 7: the GPU")
            d["gpu"] = emb.figure_gpu(pg, target, sizes["pipeline_chunks"], "cuda")
        elif quick:
            say("figure 7: no GPU; its code path on the CPU (quick mode)")
            d["gpu"] = emb.figure_gpu(pg, target, sizes["pipeline_chunks"], "cpu")
        else:
            d["gpu"] = NO_GPU
    finally:
        asyncio.run(embedder.close())
    return d


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness in a few minutes")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where the model runs for the embedding figures (default: cuda where available)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if emb.gpu_available() else "cpu")
    if device == "cuda" and not emb.gpu_available():
        parser.error("--device cuda: no GPU here")
    sizes = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    started = time.perf_counter()
    load_before = load_average()
    with ExitStack() as stack:
        target = QdrantTarget.from_env(stack)
        say(f"Qdrant: {target.label}; embedding device: {device}")
        pg = Postgres()
        try:
            d = run_figures(sizes, device, args.quick, pg, target)
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            pg.close()
            removed = target.cleanup()
            if removed:
                say(f"deleted {len(removed)} benchmark collections from {target.url}")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {'GPU' if emb.gpu_available() else 'no GPU'}, "
                   f"Python {platform.python_version()}",
        "cores": os.cpu_count() or 1,
        "gpu": emb.gpu_available(),
        "device": device,
        "qdrant": target.label,
        "mode": "quick (tiny sizes: checks the harness, not a measurement)" if args.quick else "full",
        "sizes": sizes,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    figures, qdrants = collect_figures(d)
    result = {"meta": meta, "figures": figures, "qdrant_of_figure": qdrants, "details": d}
    (args.out / "results.json").write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
    table = markdown(figures, qdrants, meta)
    (args.out / "results.md").write_text(table)
    plots(d, args.out)
    say(f"done in {meta['seconds']}s: {args.out}")
    print(table)
    return result
