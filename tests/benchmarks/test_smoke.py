"""The benchmark harness works: `--quick` at tiny sizes writes every file and
every figure, and says which Qdrant each measured. It checks the harness
only; no time is asserted."""
from __future__ import annotations

import orjson

from tests.benchmarks import harness

TINY = dict(harness.QUICK, pipeline_chunks=8, claim_batches=[4, 16], backend_chunks=8, ceiling_chunks=100,
            write_rows=200, freshness_seconds=1.0, wasted_chunks=4, transport_chunks=40, cpu_events=100,
            scale_events=300, grpc_points=100, reconcile_sizes=[100, 200])


def test_quick_run_writes_every_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "QUICK", TINY)
    harness.main(["--quick", "--out", str(tmp_path)])

    for name in ("results.json", "results.md", "pipeline_throughput.png", "reconcile_scale.png", "scale_out.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    result = orjson.loads((tmp_path / "results.json").read_bytes())
    figures = result["figures"]
    assert set(figures) == set(harness.FIGURES)
    for key, value in figures.items():
        assert isinstance(value, (int, float)) or (isinstance(value, str) and value.startswith("not measured: ")), (key, value)
    assert figures["5_transport_events_per_s_kafka"] > 0 and figures["5_relay_events_per_s"] > 0
    assert set(result["qdrant_of_figure"]) == set(harness.FIGURES)
    assert all(result["qdrant_of_figure"].values())
    # the multi-process figures ran against a Qdrant of several processes, said so, and scaled to 4
    assert "not a Qdrant server" in result["qdrant_of_figure"]["5d_two_daemons_vs_one"] or "server" in result["meta"]["qdrant"]
    assert figures["5d_four_daemons_vs_one"] > 0 and figures["5e_four_consumers_vs_one"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| figure | value | target | met? | Qdrant measured |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == len(harness.FIGURES) + 1  # the header, then one row per figure
