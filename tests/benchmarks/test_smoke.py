"""The benchmark harness works: `--quick` at tiny sizes writes every file and
every figure, and says which Qdrant each measured. It checks the harness
only; no time is asserted."""
from __future__ import annotations

import orjson

from tests.benchmarks import harness, report

TINY = dict(harness.QUICK, pipeline_chunks=8, claim_batches=[4, 16], backend_chunks=8, ceiling_chunks=100,
            write_rows=200, freshness_seconds=1.0, wasted_chunks=4, transport_chunks=40, cpu_events=100,
            scale_events=300, scale_repeats=1, grpc_points=100, large_sizes=[100, 200], local_reconcile=100,
            verify_chunks=100, verify_pipeline_chunks=8, verify_base=50, cascade_chunks=50, cascade_runs=2,
            memory_points=600, memory_queries=10, memory_real=120, cluster_counts=[1, 2], search_sizes=[300, 600],
            search_queries=8, search_real=100)


def test_quick_run_writes_every_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "QUICK", TINY)
    harness.main(["--quick", "--out", str(tmp_path)])

    result = orjson.loads((tmp_path / "results.json").read_bytes())
    server = result["meta"]["qdrant"] != "qdrant-client local mode, in memory"
    plots = ["pipeline_throughput.png"] + (["large_collection.png", "scale_out.png"] if server else [])
    for name in ("results.json", "results.md", *plots):
        assert (tmp_path / name).stat().st_size > 0, name
    figures = result["figures"]
    assert set(figures) == set(harness.FIGURES)
    for key, value in figures.items():
        assert isinstance(value, (int, float)) or (isinstance(value, str) and value.startswith("not measured: ")), (key, value)
    assert figures["5_transport_events_per_s_kafka"] > 0 and figures["5_relay_events_per_s"] > 0
    assert set(result["qdrant_of_figure"]) == set(harness.FIGURES)
    assert all(result["qdrant_of_figure"].values())
    if server:  # the figures of several processes ran on it, scaled to 4, and a growing collection was measured
        assert "server" in result["qdrant_of_figure"]["5d_two_daemons_vs_one"]
        assert figures["5d_four_daemons_vs_one"] > 0 and figures["5e_four_consumers_vs_one"] > 0
        assert figures["6_reconcile_chunks_per_s"] > 0 and figures["8_backfill_chunks_per_s"] > 0
        assert figures["5f_grpc_vs_rest_upserts"] > 0
        assert figures["9_verifier_cpu_per_10k"] > 0 and figures["9_verifier_throughput_ratio"] > 0
        assert figures["11_cascade_delete_p50_ms"] > 0 and figures["11_cascade_delete_p99_ms"] > 0
        for k in report.MEMORY_SETTINGS:  # a fresh server per setting, each measured
            assert figures[f"12_rss_mib_{k}"] > 0 and 0 < figures[f"12_recall_at_10_{k}"] <= 1, k
        # the 3-node cluster beside the single server, its collection replicated as asked
        assert "3-node" in result["qdrant_of_figure"]["5d_two_daemons_vs_one_cluster"]
        assert result["details"]["daemons_cluster"]["collection"]["replication_factor"] == 2
        assert figures["5d_two_daemons_vs_one_cluster"] > 0 and figures["5e_two_consumers_vs_one_cluster"] > 0
        # search at scale: grown to the last size, each search measured in each quantization, through the library
        assert figures["13_chunks"] == TINY["search_sizes"][-1] and figures["1e_pipeline_sparse_vs_dense"] > 0
        for q in report.SEARCH_QUANTIZATIONS:
            for mode in report.SEARCHES:
                assert figures[f"13_{mode}_p99_ms_{q}"] > 0, (mode, q)
            assert 0 < figures[f"13_recall_at_10_{q}"] <= 1 and figures[f"13_rss_mib_{q}"] > 0, q
        checked = result["details"]["search_scale"]["runs"][-1]["sample_check"]
        assert checked["plans"] == {"nothing": checked["sampled"]}  # outboxd's own plan() finds every point right
    else:  # local mode admits one process: they say so instead
        assert figures["5d_two_daemons_vs_one"].startswith("not measured: several processes need a Qdrant server")
        assert figures["9_verifier_cpu_per_10k"].startswith("not measured: ")
        assert figures["11_cascade_delete_p99_ms"].startswith("not measured: ")
        assert figures["13_chunks"].startswith("not measured: ")
    table = (tmp_path / "results.md").read_text()
    assert "| figure | value | target | met? | Qdrant measured |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == len(harness.FIGURES) + 1  # the header, then one row per figure
