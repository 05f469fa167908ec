"""What an operator sees of a real `outboxd run` process: how long SIGTERM
takes with a slow encode in flight (the drain timeout plus a few seconds, not
"stopped" and then half a minute more), a worker that crashes beside a slow
batch (a non-zero exit whatever ends the process), and a PostgreSQL outage
with a batch in flight showing on /metrics (retries per dependency,
dependency and readiness gauges) instead of a quiet wait."""
from __future__ import annotations

import asyncio
import re
import signal
import time

import httpx
import psutil
import psycopg
import pytest

from daemon.runtime.service import SECOND_SIGNAL_GRACE, SHUTDOWN_GRACE
from tests.processes import daemon_env, health_port, insert_backlog, long_texts, outbox_counts

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.slow]

DRAIN_TIMEOUT = 3


def metric(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of `name` whose labels include these (None: no such sample)."""
    total = None
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}(?:\{{(.*)\}})? ([0-9.e+-]+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total = (total or 0.0) + float(m.group(2))
    return total


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used, all its threads together."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def test_sigterm_with_a_slow_encode_in_flight_exits_within_the_drain_timeout(spawn, conn, dsn, collection, tmp_path):
    """One forward pass of 256 long texts takes far longer than the drain
    timeout on this machine: SIGTERM must end the process within
    drain_timeout + the shutdown grace, the claims released (not left to the lease)."""
    insert_backlog(conn, long_texts(256, words=200, seed=5), per_document=64)
    env = daemon_env(dsn, tmp_path / "qdrant", collection, OUTBOXD_BATCH_SIZE=256, OUTBOXD_EMBEDDING__BATCH_SIZE=256,
                     OUTBOXD_CONCURRENCY=1, OUTBOXD_DRAIN_TIMEOUT=DRAIN_TIMEOUT, OUTBOXD_LEASE_SECONDS=60)
    daemon = spawn("run", env=env, name="slow-encode")
    daemon.wait_running()
    daemon.wait_for(lambda: outbox_counts(dsn)[1] == 256, "the batch to be claimed", 30, 0.05)
    # The encode has started once the process has worked a CPU-second past the claim: reading
    # the states and tokenizing take a small part of that, the forward pass tens of seconds.
    claimed_at = cpu_seconds(daemon.pid)
    daemon.wait_for(lambda: cpu_seconds(daemon.pid) - claimed_at >= 1.0 or outbox_counts(dsn)[1] < 256,
                    "the forward pass to start", 120, 0.05)
    daemon.popen.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = daemon.wait(DRAIN_TIMEOUT + SHUTDOWN_GRACE + 20)
    took = time.monotonic() - signalled
    assert code == 0, daemon.describe()
    assert took <= DRAIN_TIMEOUT + SHUTDOWN_GRACE + 3, f"exited {took:.1f}s after SIGTERM\n{daemon.describe()}"
    assert outbox_counts(dsn) == (256, 0), "the claims of the batch in flight were not released"


def test_a_second_ctrl_c_stops_at_once_with_130(spawn, conn, dsn, collection, tmp_path):
    """Ctrl-C (SIGINT) with a forward pass in flight that would take far longer than a user
    waits: the first starts the drain (the daemon keeps running, and says that a second
    Ctrl-C stops at once); the second stops it within the second-signal grace, exit 130
    (interrupted), the claims released."""
    insert_backlog(conn, long_texts(256, words=200, seed=7), per_document=64)
    env = daemon_env(dsn, tmp_path / "qdrant", collection, OUTBOXD_BATCH_SIZE=256, OUTBOXD_EMBEDDING__BATCH_SIZE=256,
                     OUTBOXD_CONCURRENCY=1, OUTBOXD_DRAIN_TIMEOUT=120, OUTBOXD_LEASE_SECONDS=60)
    daemon = spawn("run", env=env, name="ctrl-c")
    daemon.wait_running()
    daemon.wait_for(lambda: outbox_counts(dsn)[1] == 256, "the batch to be claimed", 30, 0.05)

    daemon.popen.send_signal(signal.SIGINT)
    first = daemon.wait_for(lambda: next((d for d in daemon.logs() if d.get("signal") == "SIGINT"), None),
                            "the first Ctrl-C to be logged", 10)
    assert first["level"] == "info" and "a second Ctrl-C stops at once" in first["msg"], daemon.describe()
    assert daemon.popen.poll() is None, "the first Ctrl-C must drain, not stop\n" + daemon.describe()

    daemon.popen.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    code = daemon.wait(SECOND_SIGNAL_GRACE + 20)
    took = time.monotonic() - signalled
    assert code == 130, daemon.describe()
    assert took <= SECOND_SIGNAL_GRACE + 2, f"exited {took:.1f}s after the second Ctrl-C\n{daemon.describe()}"
    assert outbox_counts(dsn) == (256, 0), "the claims of the batch in flight were not released"
    assert "Traceback" not in daemon.stderr, daemon.describe()


def test_a_worker_crash_beside_a_slow_batch_exits_non_zero(spawn, conn, dsn, collection, tmp_path):
    """Worker A is in a forward pass far longer than the drain timeout; worker B's next
    claim fails with an error that is no outage (the outbox table is renamed under it:
    a bug, not a network). The process stops and exits 1, never 0, whichever ends it:
    the drain, or the shutdown deadline while the forward pass still runs."""
    insert_backlog(conn, long_texts(64, words=200, seed=6), per_document=64)
    env = daemon_env(dsn, tmp_path / "qdrant", collection, OUTBOXD_BATCH_SIZE=64, OUTBOXD_EMBEDDING__BATCH_SIZE=64,
                     OUTBOXD_CONCURRENCY=2, OUTBOXD_DRAIN_TIMEOUT=1, OUTBOXD_LEASE_SECONDS=60)
    daemon = spawn("run", env=env, name="worker-crash")
    daemon.wait_running()
    daemon.wait_for(lambda: outbox_counts(dsn)[1] == 64, "worker A's slow batch to be claimed", 30, 0.05)
    conn.execute("ALTER TABLE outboxd.outbox RENAME TO outbox_gone")  # B's next claim: UndefinedTable
    try:
        code = daemon.wait(1 + SHUTDOWN_GRACE + 30)
    finally:
        conn.execute("ALTER TABLE outboxd.outbox_gone RENAME TO outbox")
    assert code == 1, daemon.describe()
    crash = next((d for d in daemon.logs() if "crashed; stopping" in d.get("msg", "")), None)
    assert crash is not None and "UndefinedTable" in crash["error"] and crash["exit_code"] == 1, daemon.describe()


async def test_a_postgresql_outage_shows_in_the_metrics(spawn, conn, dsn, collection, tmp_path):
    """Connections refused for a while with a batch in flight: /metrics counts
    retries for dependency="postgresql", outboxd_dependency_up and outboxd_ready
    drop to 0; afterwards they are back at 1 and the backlog drains."""
    insert_backlog(conn, long_texts(64, words=120, seed=9), per_document=16)
    env = daemon_env(dsn, tmp_path / "qdrant", collection, OUTBOXD_HEALTH__PORT=0, OUTBOXD_HEALTH__HOST="127.0.0.1",
                     OUTBOXD_BATCH_SIZE=16, OUTBOXD_CONCURRENCY=1)
    daemon = spawn("run", env=env, name="outage")
    port = health_port(daemon)
    daemon.wait_running()
    dbname = conn.info.dbname
    admin = psycopg.connect(dsn, autocommit=True, dbname="postgres")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

        async def metrics() -> str:
            return (await http.get("/metrics")).text

        try:
            daemon.wait_for(lambda: outbox_counts(dsn)[1] > 0, "a batch in flight", 30, 0.05)
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))
            seen: dict[str, float | None] = {}
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                text = await metrics()
                seen = {
                    "retries": metric(text, "outboxd_retries_total", dependency="postgresql"),
                    "up": metric(text, "outboxd_dependency_up", dependency="postgresql"),
                    "ready": metric(text, "outboxd_ready"),
                    "waited": metric(text, "outboxd_dependency_wait_seconds_total", dependency="postgresql"),
                }
                if seen["retries"] and seen["up"] == 0 and seen["ready"] == 0 and seen["waited"]:
                    break
                await asyncio.sleep(0.5)
            assert seen["retries"] and seen["retries"] > 0, seen
            assert seen["up"] == 0 and seen["ready"] == 0 and seen["waited"] > 0, seen
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
            admin.close()
        daemon.wait_for(lambda: outbox_counts(dsn) == (0, 0), "the backlog to drain after the outage", 180, 0.2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = await metrics()
            if metric(text, "outboxd_dependency_up", dependency="postgresql") == 1 and metric(text, "outboxd_ready") == 1:
                break
            await asyncio.sleep(0.5)
        assert metric(text, "outboxd_dependency_up", dependency="postgresql") == 1
        assert metric(text, "outboxd_ready") == 1
    daemon.popen.send_signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
