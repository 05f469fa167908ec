"""The benchmark harness works: `--quick` at tiny sizes writes every file and
every figure. It checks the harness only; no time is asserted."""
from __future__ import annotations

import orjson

from tests.benchmarks import harness

TINY = dict(pipeline_chunks=8, claim_batches=[4, 16], write_rows=200, freshness_seconds=1.0,
            freshness_rate=10.0, wasted_chunks=4, transport_chunks=40, reconcile_sizes=[100, 200])


def test_quick_run_writes_every_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "QUICK", TINY)
    harness.main(["--quick", "--out", str(tmp_path)])

    for name in ("results.json", "results.md", "pipeline_throughput.png", "reconcile_scale.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    figures = orjson.loads((tmp_path / "results.json").read_bytes())["figures"]
    assert set(figures) == set(harness.FIGURES)
    for key, value in figures.items():
        assert isinstance(value, (int, float)) or (isinstance(value, str) and value.startswith("not measured: ")), (key, value)
    assert figures["5_transport_events_per_s_kafka"] > 0 and figures["5_relay_events_per_s"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| figure | value | target | met? |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == len(harness.FIGURES) + 1  # the header, then one row per figure
