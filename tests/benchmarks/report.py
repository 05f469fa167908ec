"""What the harness writes: the figures table (FIGURES: label, target, check,
where the figure's Qdrant is said), results.md and the plots."""
from __future__ import annotations

import os
from pathlib import Path

from tests.benchmarks.services import NO_QDRANT

NO_GPU = "not measured: no GPU"


def _cpu_target(v, _f, _m):
    return v <= 0.6


def _scale_target(v, _f, m):
    return v >= (1.8 if m["cores"] > 4 else 0.9)


def _on(device: str, threshold: float):
    return lambda v, _f, m: (v >= threshold) if m["device"] == device else None


SCALE = "≥ 0.9× here (2 cores), every run; ≥ 1.8× where cores are free"
# figure 13's searches and quantizations (search_scale.MODES, QUANTIZATIONS), as the table names them
SEARCHES = {"dense": "dense only", "native_hybrid": "native hybrid (BM25 and RRF in Qdrant)",
            "postgres_hybrid": "hybrid fused with PostgreSQL's full text"}
SEARCH_QUANTIZATIONS = {"none": "no quantization", "scalar": "scalar (int8), rescored"}


def _search_target(mode: str):
    return (lambda v, _f, _m: v <= 50) if mode == "native_hybrid" else None
# figure 12's settings (figures_qdrant.SETTINGS), as the table names them
MEMORY_SETTINGS = {"none": "no quantization", "scalar": "scalar (int8)", "binary": "binary",
                   "scalar_on_disk": "scalar, originals on disk", "none_on_disk": "no quantization, on disk"}
# key -> (label, target, check(value, figures, meta) -> True/False/None/text, details section naming the Qdrant)
FIGURES: dict[str, tuple] = {
    "1_pipeline_efficiency": ("1. pipeline efficiency (pipeline ÷ sentence-transformers' raw encode, default claim batch)", "≥ 0.90", lambda v, f, m: v >= 0.90, "pipeline"),
    "1b_onnx_vs_torch": ("1b. encode: onnx fp32 ÷ torch backend (texts/s)", "≥ 1.5", lambda v, f, m: v >= 1.5, "backends"),
    "1b_onnx_int8_vs_torch": ("1b. encode: onnx int8 ÷ torch backend (other vectors, own fingerprint)", "≥ 1.5", lambda v, f, m: v >= 1.5, "backends"),
    "1b_torch_vs_st_encode": ("1b. encode: torch backend ÷ sentence-transformers `encode`", "", None, "backends"),
    "1c_limit_texts_per_s": ("1c. the limit: the fastest encoder built here (texts/s)", "", None, "limit"),
    "1c_pipeline_vs_encode": ("1c. pipeline ÷ the configured backend's own encode of the same texts (default settings)", "≥ 0.95 on CPU", _on("cpu", 0.95), "pipeline"),
    "1c_pipeline_vs_limit": ("1c. pipeline ÷ limit (default settings)", "≥ 0.9 on a GPU", _on("cuda", 0.9), "pipeline"),
    "1e_pipeline_sparse_vs_dense": ("1e. pipeline with the sparse BM25 vector ÷ dense only (real model, default claim batch)", "≥ 0.9", lambda v, f, m: v >= 0.9, "sparse_pipeline"),
    "1d_ceiling_claim_256": ("1d. ceiling: pipeline, encoding made free, claim 256 (chunks/s)", "", None, "ceiling"),
    "1d_ceiling_claim_1024": ("1d. ceiling: pipeline, encoding made free, claim 1024 (chunks/s)", "", None, "ceiling"),
    "1d_ceiling_claim_256_local": ("1d. the same, claim 256, local mode (second row)", "", None, "ceiling_local"),
    "2_write_cost_ratio_executemany": ("2. write path: with ÷ without capture triggers, executemany", "≥ 0.75", lambda v, f, m: v >= 0.75, "write_path"),
    "2_write_cost_ratio_copy": ("2. write path: with ÷ without capture triggers, COPY", "≥ 0.75", lambda v, f, m: v >= 0.75, "write_path"),
    "2_write_chunks_per_s_executemany": ("2. chunks/s inserted with triggers, executemany", "≥ 10,000", lambda v, f, m: v >= 10_000, "write_path"),
    "2_write_chunks_per_s_copy": ("2. chunks/s inserted with triggers, COPY", "≥ 10,000", lambda v, f, m: v >= 10_000, "write_path"),
    "3_freshness_p50_ms_notify": ("3. freshness p50 (ms, commit → visible), NOTIFY", "", None, "freshness"),
    "3_freshness_p99_ms_notify": ("3. freshness p99 (ms, commit → visible), NOTIFY", "", None, "freshness"),
    "3_freshness_p50_overhead_ms_notify": ("3. freshness p50 minus encode of its batch (ms), NOTIFY", "", None, "freshness"),
    "3_freshness_p99_overhead_ms_notify": ("3. freshness p99 minus encode of its batch (ms), NOTIFY", "≤ 50", lambda v, f, m: v <= 50, "freshness"),
    "3_freshness_p50_ms_polling": ("3. freshness p50 (ms), polling only", "", None, "freshness"),
    "3_freshness_p99_ms_polling": ("3. freshness p99 (ms), polling only", "", None, "freshness"),
    "3_freshness_p99_overhead_ms_polling": ("3. freshness p99 minus encode (ms), polling only", "", None, "freshness"),
    "4_encodes_per_metadata_update": ("4. encodes per payload-only update (chunk metadata)", "0", lambda v, f, m: v == 0, "wasted_work"),
    "4_encodes_per_title_update": ("4. encodes per payload-only update (document title)", "0", lambda v, f, m: v == 0, "wasted_work"),
    "4_encodes_per_duplicate_text": ("4. encodes per chunk with a duplicate text (daemon running)", "0", lambda v, f, m: v == 0, "wasted_work"),
    "4_encodes_per_duplicate_text_after_restart": ("4. the same after a restart (embedding cache cold)", "0", lambda v, f, m: v == 0, "wasted_work"),
    "5_transport_events_per_s_notify": ("5. transport ceiling, notify path (events/s, no encoding)", "≥ 5,000", lambda v, f, m: v >= 5_000, "transport"),
    "5_transport_events_per_s_notify_local": ("5. the same, local mode (second row)", "", None, "transport_local"),
    "5_transport_events_per_s_kafka": ("5. transport ceiling, relay + consume through Kafka (events/s)", "≥ notify",
                                       lambda v, f, m: v >= f["5_transport_events_per_s_notify"], "transport_kafka"),
    "5_relay_events_per_s": ("5. Kafka: relay alone, outbox → topic (events/s)", "", None, "transport_kafka"),
    "5_consume_events_per_s": ("5. Kafka: one consumer alone, topic → Qdrant (events/s, no encoding)", "", None, "transport_kafka"),
    "5b_requests_per_event": ("5b. Qdrant requests per payload-only event (claim 256)", "", None, "traffic"),
    "5b_write_operations_per_event": ("5b. Qdrant write operations per payload-only event", "", None, "traffic"),
    "5b_points_read_per_event": ("5b. points read per payload-only event", "", None, "traffic"),
    "5b_rest_bytes_per_event": ("5b. REST body bytes per payload-only event, sent + received, measured", "", None, "traffic"),
    "5c_daemon_cpu_per_10k_claim_64": ("5c. daemon's own CPU per 10,000 payload-only events (CPU-s, least of the runs), claim 64", "", None, "cpu_64"),
    "5c_daemon_cpu_per_10k_claim_256": ("5c. the same, claim 256 (the default)", "≤ 0.6", _cpu_target, "cpu_256"),
    "5c_qdrant_cpu_per_10k_during": ("5c. the Qdrant server's CPU per 10,000 payload-only events, during the drain (claim 256)", "≤ 1.2 (half of 2.2–2.6)", lambda v, f, m: v <= 1.2, "cpu_256"),
    "5c_qdrant_cpu_per_10k_after": ("5c. the Qdrant server's CPU after the drain until its optimizers are idle (re-indexing moved points)", "", None, "cpu_256"),
    "5c_postgresql_cpu_per_10k": ("5c. PostgreSQL's CPU per 10,000 payload-only events (claim 256)", "", None, "cpu_256"),
    "5c_local_cpu_per_10k_claim_256": ("5c. daemon's own CPU, local mode minus its engine, claim 256 (second row)", "", None, "cpu_local_256"),
    "5d_one_daemon_events_per_s": ("5d. one daemon process, payload-only (events/s, mean of its runs)", "", None, "daemons"),
    "5d_two_daemons_vs_one": ("5d. 2 daemon processes ÷ 1 (events/s), least of the runs", SCALE, _scale_target, "daemons"),
    "5d_four_daemons_vs_one": ("5d. 4 daemon processes ÷ 1 (events/s), least of the runs", SCALE, _scale_target, "daemons"),
    "5d_two_daemons_vs_one_drained": ("5d. 2 ÷ 1, to the last 'stopped' log line (interpreter exit left out)", SCALE, _scale_target, "daemons"),
    "5d_four_daemons_vs_one_drained": ("5d. 4 ÷ 1, to the last 'stopped' log line (interpreter exit left out)", SCALE, _scale_target, "daemons"),
    "5e_one_consumer_events_per_s": ("5e. one consumer process, payload-only (events/s)", "", None, "consumers"),
    "5e_two_consumers_vs_one": ("5e. 2 consumer processes ÷ 1, one group (events/s)", SCALE, _scale_target, "consumers"),
    "5e_four_consumers_vs_one": ("5e. 4 consumer processes ÷ 1, one group (events/s)", SCALE, _scale_target, "consumers"),
    "5d_one_daemon_events_per_s_cluster": ("5d on a 3-node cluster (replication 2, write consistency 1): one daemon (events/s, mean of its runs)", "", None, "daemons_cluster"),
    "5d_one_daemon_cluster_vs_server": ("5d. one daemon: the cluster ÷ the single server (events/s)", "", None, "daemons_cluster"),
    "5d_two_daemons_vs_one_cluster": ("5d on the cluster: 2 daemon processes ÷ 1, least of the runs", SCALE, _scale_target, "daemons_cluster"),
    "5d_four_daemons_vs_one_cluster": ("5d on the cluster: 4 daemon processes ÷ 1, least of the runs", SCALE, _scale_target, "daemons_cluster"),
    "5e_one_consumer_events_per_s_cluster": ("5e on the cluster: one consumer process (events/s)", "", None, "consumers_cluster"),
    "5e_two_consumers_vs_one_cluster": ("5e on the cluster: 2 consumer processes ÷ 1, one group", SCALE, _scale_target, "consumers_cluster"),
    "5e_four_consumers_vs_one_cluster": ("5e on the cluster: 4 consumer processes ÷ 1, one group", SCALE, _scale_target, "consumers_cluster"),
    "5f_grpc_vs_rest_upserts": ("5f. gRPC ÷ REST upserts, same server (points/s)", "≥ 1.3", lambda v, f, m: v >= 1.3, "grpc"),
    "6_reconcile_chunks_per_s": ("6. reconcile chunks/s at the largest N (`outboxd reconcile`, its own process)", "≥ 20,000", lambda v, f, m: v >= 20_000, "large"),
    "6_reconcile_rss_growth": ("6. reconcile peak RSS, largest N ÷ smallest N", "flat (≤ 1.2)", lambda v, f, m: v <= 1.2, "large"),
    "6_reconcile_chunks_per_s_local": ("6. reconcile chunks/s, local mode, in process (second row)", "", None, "reconcile_local"),
    "8_backfill_chunks_per_s": ("8. backfill at the largest N: the daemon's apply rate, encoding made free (chunks/s)", "", None, "large"),
    "8_backfill_rate_growth": ("8. backfill apply rate, largest N ÷ smallest N", "flat (≥ 0.8)", lambda v, f, m: v >= 0.8, "large"),
    "8_backfill_rss_growth": ("8. backfill daemon peak RSS, largest N ÷ smallest N", "flat (≤ 1.2)", lambda v, f, m: v <= 1.2, "large"),
    "8_backfill_enqueue_chunks_per_s": ("8. `outboxd backfill` enqueue rate at the largest N (chunks/s)", "", None, "large"),
    "9_verifier_cpu_per_10k": ("9. continuous verifier: its CPU per 10,000 chunks checked (CPU-s, one full pass, unthrottled)", "", None, "verifier"),
    "9_verifier_core_share_default_rate": ("9. continuous verifier at its default rate (50 chunks/s): share of one core", "< 0.02", lambda v, f, m: v < 0.02, "verifier"),
    "9_verifier_throughput_ratio": ("9. pipeline throughput with the verifier at its defaults ÷ without (real model)", "> 0.97", lambda v, f, m: v > 0.97, "verifier"),
    "10_budget_requests_shared": ("10. fleet budget: requests 3 daemons sent, budget shared through PostgreSQL", "", None, "fleet_budget"),
    "10_budget_over_shared": ("10. requests sent over the budget, shared", "0", lambda v, f, m: v == 0, "fleet_budget"),
    "10_budget_429_shared": ("10. 429s, shared", "≤ 1% of requests after the first",
                             lambda v, f, m: v <= 1 + 0.01 * f["10_budget_requests_shared"], "fleet_budget"),
    "10_budget_throughput_shared": ("10. fleet throughput ÷ budget, shared", "≥ 0.9", lambda v, f, m: v >= 0.9, "fleet_budget"),
    "10_budget_requests_per_process": ("10. requests sent, each daemon keeping the budget for itself (per-process limits only)", "", None, "fleet_budget"),
    "10_budget_over_per_process": ("10. requests sent over the budget, per process", "", None, "fleet_budget"),
    "10_budget_429_per_process": ("10. 429s, per process", "", None, "fleet_budget"),
    "10_budget_throughput_per_process": ("10. fleet throughput ÷ budget, per process (the endpoint's limit caps it)", "", None, "fleet_budget"),
    "11_cascade_delete_p50_ms": ("11. a source deleted with its chunks: DELETE's commit → its last point gone from Qdrant, p50 (ms)", "", None, "cascade_delete"),
    "11_cascade_delete_p99_ms": ("11. the same, p99 (ms)", "≤ 250", lambda v, f, m: v <= 250, "cascade_delete"),
    **{f"12_rss_mib_{k}": (f"12. Qdrant server RSS with the collection, restarted and searched: {label} (MiB)", "", None, "memory_recall")
       for k, label in MEMORY_SETTINGS.items()},
    **{f"12_recall_at_10_{k}": (f"12. recall@10 of outboxd's search ÷ exact, {label}", "≥ 0.97", lambda v, f, m: v >= 0.97, "memory_recall")
       for k, label in MEMORY_SETTINGS.items()},
    "13_chunks": ("13. search at scale: chunks in the collection and in PostgreSQL (the largest size built)", "1,000,000", lambda v, f, m: v >= 1_000_000, "search_scale"),
    **{f"13_{mode}_{p}_ms_{q}": (f"13. search through the library, {label}, {p} (ms), {qlabel}",
                                 "≤ 50" if mode == "native_hybrid" and p == "p99" else "",
                                 _search_target(mode) if p == "p99" else None, "search_scale")
       for q, qlabel in SEARCH_QUANTIZATIONS.items() for mode, label in SEARCHES.items() for p in ("p50", "p99")},
    **{f"13_recall_at_10_{q}": (f"13. recall@10 of the dense search ÷ exact, {label}", "≥ 0.97", lambda v, f, m: v >= 0.97, "search_scale")
       for q, label in SEARCH_QUANTIZATIONS.items()},
    **{f"13_rss_mib_{q}": (f"13. Qdrant server RSS, restarted and searched, {label} (MiB)", "", None, "search_scale")
       for q, label in SEARCH_QUANTIZATIONS.items()},
    "13_native_hybrid_p99_growth": ("13. native hybrid p99, largest size ÷ smallest, no quantization", "", None, "search_scale"),
    "7_gpu_pipeline_efficiency": ("7. pipeline efficiency with the model on the GPU", "≥ 0.90", lambda v, f, m: v >= 0.90, "gpu"),
    "7_gpu_pipeline_vs_limit": ("7. pipeline ÷ limit on the GPU (fp16 recipe)", "≥ 0.9", lambda v, f, m: v >= 0.9, "gpu"),
}


def _get(d: dict, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _or(value, reason: str):
    return value if value is not None else f"not measured: {reason}"


def collect_figures(d: dict) -> tuple[dict, dict]:
    """(figures by key, which Qdrant each measured)."""
    f: dict = {}
    p = d["pipeline"]
    f["1_pipeline_efficiency"] = p["efficiency"]
    b = d["backends"]
    ratios = b.get("ratios", {}) if isinstance(b, dict) else {}
    skipped = b.get("not_measured", {}) if isinstance(b, dict) else {}
    f["1b_onnx_vs_torch"] = _or(ratios.get("onnx_fp32/torch"), skipped.get("onnx_fp32", "see details"))
    f["1b_onnx_int8_vs_torch"] = _or(ratios.get("onnx_int8/torch"), skipped.get("onnx_int8", "see details"))
    f["1b_torch_vs_st_encode"] = _or(ratios.get("torch/sentence_transformers_encode"), "see details")
    lim = d["limit"]
    f["1c_limit_texts_per_s"] = lim["limit_texts_per_s"]
    f["1c_pipeline_vs_encode"] = lim["pipeline_vs_backend_encode"]
    f["1c_pipeline_vs_limit"] = lim["pipeline_vs_limit"]
    for claim in (256, 1024):
        f[f"1d_ceiling_claim_{claim}"] = d["ceiling"][f"claim_{claim}"]["chunks_per_s"]
    f["1d_ceiling_claim_256_local"] = _section(d, "ceiling_local", "claim_256", "chunks_per_s")
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
    f["5_transport_events_per_s_notify_local"] = _section(d, "transport_local", "events_per_s")
    f["5_transport_events_per_s_kafka"] = d["transport_kafka"]["events_per_s"]
    f["5_relay_events_per_s"] = d["transport_kafka"]["relay_events_per_s"]
    f["5_consume_events_per_s"] = d["transport_kafka"]["consume_events_per_s"]
    tc = d["traffic_cpu"]
    t = tc["traffic"]["traffic_per_event"]
    f["5b_requests_per_event"] = t["requests"]
    f["5b_write_operations_per_event"] = t["write_operations"]
    f["5b_points_read_per_event"] = t["points_read"]
    rb = tc["traffic"].get("rest_body_bytes_per_event")
    f["5b_rest_bytes_per_event"] = round(rb["sent"] + rb["received"], 1) if rb else "not measured: needs a Qdrant server over REST"
    primary = tc["primary"]
    for claim in (64, 256):
        f[f"5c_daemon_cpu_per_10k_claim_{claim}"] = tc["cpu"][f"{primary}_claim_{claim}"]["daemon_cpu_s_per_10k"]
    best = tc["cpu"][f"{primary}_claim_256"]
    why = "not measured: the Qdrant server is not this run's own process"
    f["5c_qdrant_cpu_per_10k_during"] = _or(best.get("qdrant_cpu_s_per_10k_during"), why)
    f["5c_qdrant_cpu_per_10k_after"] = _or(best.get("qdrant_cpu_s_per_10k_after"), why)
    f["5c_postgresql_cpu_per_10k"] = _or(best.get("postgresql_cpu_s_per_10k"), "not measured: DATABASE_URL is not this run's own server")
    local = tc["cpu"].get("local_claim_256")
    f["5c_local_cpu_per_10k_claim_256"] = local["daemon_cpu_s_per_10k"] if local else "not measured"
    daemons = d["daemons"]
    if isinstance(daemons, dict):
        f["5d_one_daemon_events_per_s"] = daemons["one_events_per_s"]
        for k, word in ((2, "two"), (4, "four")):
            f[f"5d_{word}_daemons_vs_one"] = daemons["least_ratio"].get(k, "not measured: see details")
            f[f"5d_{word}_daemons_vs_one_drained"] = daemons["least_drained_ratio"].get(k, "not measured: see details")
    else:
        for key in ("5d_one_daemon_events_per_s", "5d_two_daemons_vs_one", "5d_four_daemons_vs_one",
                    "5d_two_daemons_vs_one_drained", "5d_four_daemons_vs_one_drained"):
            f[key] = daemons
    consumers = d["consumers"]
    if isinstance(consumers, dict):
        runs = {r["consumers"]: r for r in consumers["runs"]}
        f["5e_one_consumer_events_per_s"] = runs[1]["events_per_s"]
        f["5e_two_consumers_vs_one"] = runs[2]["ratio_to_one"] if 2 in runs else "not measured: see details"
        f["5e_four_consumers_vs_one"] = runs[4]["ratio_to_one"] if 4 in runs else "not measured: see details"
    else:
        f["5e_one_consumer_events_per_s"] = f["5e_two_consumers_vs_one"] = f["5e_four_consumers_vs_one"] = consumers
    run = d["daemons_cluster"]
    keys = ["5d_one_daemon_events_per_s_cluster", "5d_two_daemons_vs_one_cluster", "5d_four_daemons_vs_one_cluster",
            "5d_one_daemon_cluster_vs_server"]
    if isinstance(run, dict):
        f[keys[0]] = run["one_events_per_s"]
        f[keys[1]] = run["least_ratio"].get(2, "not measured: see details")
        f[keys[2]] = run["least_ratio"].get(4, "not measured: see details")
        f[keys[3]] = (round(run["one_events_per_s"] / daemons["one_events_per_s"], 3) if isinstance(daemons, dict)
                      else daemons)
    else:
        for key in keys:
            f[key] = run
    run = d["consumers_cluster"]
    keys = ["5e_one_consumer_events_per_s_cluster", "5e_two_consumers_vs_one_cluster", "5e_four_consumers_vs_one_cluster"]
    if isinstance(run, dict):
        runs = {r["consumers"]: r for r in run["runs"]}
        f[keys[0]] = runs[1]["events_per_s"]
        f[keys[1]] = runs[2]["ratio_to_one"] if 2 in runs else "not measured: see details"
        f[keys[2]] = runs[4]["ratio_to_one"] if 4 in runs else "not measured: see details"
    else:
        for key in keys:
            f[key] = run
    cascade = d["cascade_delete"]
    f["11_cascade_delete_p50_ms"] = cascade["p50_ms"] if isinstance(cascade, dict) else cascade
    f["11_cascade_delete_p99_ms"] = cascade["p99_ms"] if isinstance(cascade, dict) else cascade
    memory = d["memory_recall"]
    for k in MEMORY_SETTINGS:
        one = memory["settings"][k] if isinstance(memory, dict) else None
        f[f"12_rss_mib_{k}"] = one["after_queries"]["rss_mib"] if one else memory
        f[f"12_recall_at_10_{k}"] = one["recall_at_10"] if one else memory
    g = d["grpc"]
    f["5f_grpc_vs_rest_upserts"] = g["ratio"] if isinstance(g, dict) else g
    large = d["large"]
    if isinstance(large, dict):
        last, growth = large["runs"][-1], large["growth_largest_over_smallest"]
        f["6_reconcile_chunks_per_s"] = last["reconcile_chunks_per_s"]
        f["6_reconcile_rss_growth"] = growth["reconcile_peak_rss_mib"]
        f["8_backfill_chunks_per_s"] = last["drain_chunks_per_s"]
        f["8_backfill_rate_growth"] = growth["drain_chunks_per_s"]
        f["8_backfill_rss_growth"] = growth["drain_peak_rss_mib"]
        f["8_backfill_enqueue_chunks_per_s"] = last["backfill_enqueue_chunks_per_s"]
    else:
        for key in ("6_reconcile_chunks_per_s", "6_reconcile_rss_growth", "8_backfill_chunks_per_s",
                    "8_backfill_rate_growth", "8_backfill_rss_growth", "8_backfill_enqueue_chunks_per_s"):
            f[key] = large
    f["6_reconcile_chunks_per_s_local"] = d["reconcile_local"]["chunks_per_s"]
    fleet = d["fleet_budget"]
    for scope in ("shared", "per_process"):
        run = fleet.get(scope) if isinstance(fleet, dict) else None
        for key, field in (("requests", "requests"), ("over", "requests_over_budget"), ("429", "refused_429"),
                           ("throughput", "throughput_vs_budget")):
            f[f"10_budget_{key}_{scope}"] = run[field] if run else fleet
    v = d["verifier"]
    f["9_verifier_cpu_per_10k"] = v["pass"]["cpu_s_per_10k"] if isinstance(v, dict) else v
    f["9_verifier_core_share_default_rate"] = v["pass"]["core_share_at_default_rate"] if isinstance(v, dict) else v
    f["9_verifier_throughput_ratio"] = v["throughput"]["ratio"] if isinstance(v, dict) else v
    sparse = d["sparse_pipeline"]
    f["1e_pipeline_sparse_vs_dense"] = sparse["ratio"] if isinstance(sparse, dict) else sparse
    search = d["search_scale"]
    last = search["runs"][-1] if isinstance(search, dict) else None
    f["13_chunks"] = last["chunks"] if last else search
    for q in SEARCH_QUANTIZATIONS:
        one = last["configurations"][q] if last else None
        for mode in SEARCHES:
            for p in ("p50", "p99"):
                f[f"13_{mode}_{p}_ms_{q}"] = one["latency"][mode].get(
                    f"{p}_ms", "not measured: its warm-up took its whole time budget (see details)") if one else search
        f[f"13_recall_at_10_{q}"] = one["recall_at_10_dense"] if one else search
        f[f"13_rss_mib_{q}"] = one["after_queries"]["rss_mib"] if one else search
    growth = search.get("growth_largest_over_smallest") if last else None
    f["13_native_hybrid_p99_growth"] = (growth["none"]["native_hybrid_p99"] if growth
                                        else "not measured: one size only" if last else search)
    gpu = d["gpu"]
    if isinstance(gpu, dict) and gpu.get("ran_on") == "cuda":
        f["7_gpu_pipeline_efficiency"] = gpu["efficiency"]
        f["7_gpu_pipeline_vs_limit"] = gpu["pipeline_vs_limit"]
    else:
        f["7_gpu_pipeline_efficiency"] = f["7_gpu_pipeline_vs_limit"] = NO_GPU + (
            " (the GPU code path ran on the CPU: see details)" if isinstance(gpu, dict) else "")
    figures = {k: f[k] for k in FIGURES}
    return figures, {k: qdrant_of(d, FIGURES[k][3]) for k in FIGURES}


def qdrant_of(d: dict, section: str) -> str:
    tc = d.get("traffic_cpu", {})
    cpu = tc.get("cpu", {})
    special = {
        "traffic": _get(tc, "traffic", "qdrant"),
        "cpu_64": _get(cpu, f"{tc.get('primary')}_claim_64", "qdrant"),
        "cpu_256": _get(cpu, f"{tc.get('primary')}_claim_256", "qdrant"),
        "cpu_local_256": _get(cpu, "local_claim_256", "qdrant"),
        "grpc": _get(d, "grpc", "qdrant", default="a Qdrant server with gRPC (none here)"),
    }
    if section in special:
        return special[section] or "—"
    value = d.get(section)
    return (value.get("qdrant") or NO_QDRANT) if isinstance(value, dict) else "—"


def _section(d: dict, *path):
    value = _get(d, *path)
    return value if value is not None else "not measured: the harness's Qdrant is local mode itself"


def met_of(key: str, value, figures: dict, meta: dict) -> str:
    check = FIGURES[key][2]
    if isinstance(value, str) or check is None:
        return "—"
    got = check(value, figures, meta)
    if got is None:
        return "—"
    if isinstance(got, str):
        return got
    return "yes" if got else "**no**"


def markdown(figures: dict, qdrants: dict, meta: dict) -> str:
    lines = [f"Run {meta['date']} on {meta['machine']}, mode: **{meta['mode']}**, embedding device: {meta['device']}; "
             f"load average {meta['load_average_before']} before, {meta['load_average_after']} after.", "",
             "| figure | value | target | met? | Qdrant measured |", "|---|---|---|---|---|"]
    for key, (label, target, _check, _section) in FIGURES.items():
        v = figures[key]
        shown = f"{v:,}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
        lines.append(f"| {label} | {shown} | {target or '—'} | {met_of(key, v, figures, meta)} | {qdrants[key]} |")
    return "\n".join(lines) + "\n"


def plots(d: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    p = d["pipeline"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["claim_batch_size"] for r in p["sweep"]]
    ax.plot(xs, [r["pipeline_chunks_per_s"] for r in p["sweep"]], "o-", label="outboxd, commit → visible in Qdrant")
    ax.axhline(p["raw_encode_chunks_per_s"], color="grey", ls="--", label=f"raw model.encode (batch {p['embed_batch_size']})")
    ax.axhline(d["limit"]["limit_texts_per_s"], color="tab:red", ls=":", label="the limit (fastest encoder built here)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("claim batch size (events)")
    ax.set_ylabel("chunks/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Figure 1: pipeline throughput, {p['chunks']} mixed-length chunks ({p['device']})", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pipeline_throughput.png", dpi=100)
    plt.close(fig)
    made.append("pipeline_throughput.png")

    large = d["large"]
    if isinstance(large, dict):
        runs = large["runs"]
        ns = [r["chunks"] for r in runs]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
        a1.plot(ns, [r["reconcile_chunks_per_s"] for r in runs], "o-", label="reconcile (6)")
        a1.plot(ns, [r["drain_chunks_per_s"] for r in runs], "s-", label="backfill apply, encoding free (8)")
        a1.set(xlabel="chunks (N)", ylabel="chunks/s", title="rate")
        a1.set_ylim(bottom=0)
        a1.legend(fontsize=8)
        a2.plot(ns, [r["reconcile_peak_rss_mib"] for r in runs], "o-", label="reconcile process")
        a2.plot(ns, [r["drain_peak_rss_mib"] for r in runs], "s-", label="daemon process")
        a2.set(xlabel="chunks (N)", ylabel="peak RSS (MiB)", title="memory")
        a2.set_ylim(bottom=0)
        a2.legend(fontsize=8)
        fig.suptitle(f"Figures 6 and 8: a growing collection ({large['qdrant']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "large_collection.png", dpi=100)
        plt.close(fig)
        made.append("large_collection.png")

    if isinstance(d["daemons"], dict) or isinstance(d["consumers"], dict):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, label in (("daemons", "notify daemons (5d)"), ("consumers", "Kafka consumers (5e)")):
            if not isinstance(d[name], dict):
                continue
            rs = d[name]["runs"]
            ax.plot([r[name] for r in rs], [r["events_per_s"] for r in rs], "o", label=label)
        ax.set(xlabel="processes (N)", ylabel="payload-only events/s", title=f"Figure 5d/5e: scale-out on {os.cpu_count()} cores")
        ax.set_xticks([1, 2, 4])
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "scale_out.png", dpi=100)
        plt.close(fig)
        made.append("scale_out.png")
    return made
