"""Figures 6 and 8: a collection of N chunks on a Qdrant server, N growing
(50,000, 100,000, 200,000 in a full run), encoding made free.

8. Backfill as an operator adopts outboxd on a database that already holds
   chunks: N chunks written with the capture triggers off, `outboxd backfill`
   (its own process) enqueues them, then a daemon process applies them to the
   server with random vectors (this module's `drain` entry point: the real
   NotifyDaemon under run_service, a RandomBackend through the Embedder seam).
6. Reconcile of the result: `outboxd reconcile --check --json`, a process.

Each process's rate is its own work over its own time, and its peak RSS is
its own (VmHWM, through tests.benchmarks.peak_rss), so growth from the
smallest N to the largest is the figure: flat memory means the scans stream.
Each size starts once the server's optimizers are idle, so one size's index
builds do not slow the next one's work.

    python -m tests.benchmarks.large_collection drain     # the child, environment as `outboxd run`
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson

from tests.benchmarks import reconcile_scale
from tests.benchmarks.services import NEEDS_SERVER, Postgres, QdrantTarget, load_average

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 1800


def _child(args: list[str], env: dict[str, str]) -> tuple[dict, float, float]:
    """Run `python -m ARGS` under tests.benchmarks.peak_rss; (its JSON document on
    stdout, wall seconds, its own peak RSS in MiB)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tests.benchmarks.peak_rss", *args], env=env, cwd=REPO,
                          capture_output=True, timeout=TIMEOUT)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 3):
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}:\n{done.stderr.decode(errors='replace')[-3000:]}")
    peak = next((orjson.loads(line)["peak_rss_kib"] for line in reversed(done.stderr.splitlines())
                 if line.startswith(b'{"peak_rss_kib"')), 0)
    out = done.stdout
    doc = orjson.loads(out[out.index(b"{"):]) if b"{" in out else {}
    return doc, seconds, peak / 1024


def _env(dsn: str, target: QdrantTarget, collection: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOXD_", "QDRANT_"))}
    env.update(DATABASE_URL=dsn, OUTBOXD_COLLECTION=collection, OUTBOXD_LOG_FORMAT="json", OUTBOXD_LOG_LEVEL="WARNING",
               HF_HUB_OFFLINE="1", **target.env())
    return env


def measure(pg: Postgres, target: QdrantTarget, n: int, previous: str | None = None) -> dict:
    if previous is not None:
        asyncio.run(target.settle(previous))
    dsn = pg.fresh()
    collection = target.name(f"large_{n}")
    reconcile_scale.populate(dsn, n)  # written before capture: nothing in the outbox
    env = _env(dsn, target, collection)
    enqueued, backfill_s, backfill_rss = _child(["daemon.cli", "backfill", "--json"], env)
    assert enqueued["enqueued"] == n, enqueued
    drained, drain_s, drain_rss = _child(["tests.benchmarks.large_collection", "drain"], env)
    assert drained["events_acked"] == n and drained["upserted"] == n, drained
    settled = asyncio.run(target.settle(collection))
    report, _, reconcile_rss = _child(["daemon.cli", "reconcile", "--check", "--json"], env)
    assert report["drift"] == 0 and report["chunks"] == n == report["points"], report
    return {
        "chunks": n,
        "collection": collection,
        "backfill_enqueue_chunks_per_s": round(n / backfill_s),
        "backfill_enqueue_peak_rss_mib": round(backfill_rss, 1),
        "drain_chunks_per_s": round(n / drained["seconds"]),
        "drain_process_seconds": round(drain_s, 1),
        "drain_peak_rss_mib": round(drain_rss, 1),
        "drain_cpu_seconds": drained["cpu_seconds"],
        "seconds_until_optimizers_idle": settled,
        "reconcile_chunks_per_s": round(report["chunks_per_second"]),
        "reconcile_peak_rss_mib": round(reconcile_rss, 1),
    }


def figure_large_collection(pg: Postgres, target: QdrantTarget, sizes: list[int]) -> dict | str:
    if not target.is_server:
        return NEEDS_SERVER
    runs: list[dict] = []
    for n in sorted(sizes):
        runs.append(measure(pg, target, n, previous=runs[-1]["collection"] if runs else None))
    first, last = runs[0], runs[-1]
    growth = {key: round(last[key] / first[key], 3) for key in
              ("drain_chunks_per_s", "drain_peak_rss_mib", "reconcile_chunks_per_s", "reconcile_peak_rss_mib")}
    return {"qdrant": target.label, "encoder": "RandomBackend: random unit vectors", "runs": runs,
            "growth_largest_over_smallest": growth, "load_average": load_average(),
            "what": "N chunks written with the capture triggers off; `outboxd backfill --json`, then a daemon "
                    "process with encoding made free (python -m tests.benchmarks.large_collection drain), then "
                    "`outboxd reconcile --check --json`, each its own process, run one after the other"}


def local_reconcile(pg: Postgres, n: int) -> dict:
    """Reconcile in local mode, in this process (a labelled second row: local mode
    admits no second process, so its memory cannot be told apart from the harness's)."""
    from daemon.admin.reconcile import LOCAL_QDRANT_PAGE

    r = asyncio.run(reconcile_scale.measure(pg.fresh(), n, LOCAL_QDRANT_PAGE, trace_memory=False))
    return {**r, "qdrant": QdrantTarget.local().label}


# --- the child: a daemon with encoding made free --------------------------------------------------
async def _drain() -> dict:
    from daemon.commands.common import resolve_dsn
    from daemon.config import Settings
    from daemon.outbox.notify_daemon import NotifyDaemon
    from daemon.runtime.service import run_service
    from tests.benchmarks.services import free_embedder

    class Timed(NotifyDaemon):
        async def run(self, **kwargs) -> int:
            self.run_started, self.cpu_started = time.perf_counter(), time.process_time()
            return await super().run(**kwargs)

    settings = Settings()
    daemon = Timed(settings, resolve_dsn(settings), embedder=free_embedder(settings))
    code = await run_service(daemon, exit_deadline=False, drain=True)
    assert code == 0, code
    return {**daemon.stats.as_dict(), "seconds": time.perf_counter() - daemon.run_started,
            "cpu_seconds": round(time.process_time() - daemon.cpu_started, 3)}


if __name__ == "__main__" and sys.argv[1:] == ["drain"]:
    print(orjson.dumps(asyncio.run(_drain())).decode())
