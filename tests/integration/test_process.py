"""The real `outboxd run` as a separate process: crashes, signals, startup
refusals, the embedded default, and secrets kept out of the output
(invariants 4, 5 and 8, and the operator-facing contract of the CLI).

Qdrant is the session's (tests/qdrant_server.py). In local mode it is a
folder, which one process at a time may open: the test opens it only after the
daemon process has exited, and closes it before starting the next one.
"""
from __future__ import annotations

import os
import re
import signal
import time
from urllib.parse import quote

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from qdrant_client import AsyncQdrantClient

from daemon.core.qdrant_store import FINGERPRINT_KEY, dense
from tests.processes import (
    MODEL_LOAD_S,
    DaemonProcess,
    base_env,
    daemon_env,
    insert_backlog,
    long_texts,
    outbox_counts,
    run_drain,
)
from tests.support import (
    add_document,
    all_points,
    assert_converged,
    open_qdrant,
    outbox_rows,
    physical_collection,
)

pytestmark = [pytest.mark.slow]

EXIT_CONFIG = 78
EXIT_UNAVAILABLE = 69
PASSWORD = "S3cretPassw0rd"
API_KEY = "Sup3rSecretKey"


# --- 1. SIGKILL mid-batch ------------------------------------------------------------
async def test_sigkill_mid_batch_then_restart_converges(spawn, conn, dsn, collection, embedder, tmp_path):
    """Invariant 5: a daemon killed with SIGKILL mid-batch loses nothing; a restart converges with no manual step."""
    texts = long_texts(160, words=40, seed=1)
    insert_backlog(conn, texts)
    total = len(texts)
    qpath = tmp_path / "qdrant"
    env = daemon_env(dsn, qpath, collection, OUTBOXD_BATCH_SIZE=32)

    daemon = spawn("run", env=env, name="killed")
    daemon.wait_running()

    def acked_and_claimed():
        remaining, claimed = outbox_counts(dsn)
        return (remaining, claimed) if 0 < remaining < total and claimed > 0 else None

    # some batches are acknowledged, more are claimed and in flight, the rest wait
    daemon.wait_for(acked_and_claimed, "a first acknowledged batch with another in flight", 120, 0.02)
    os.kill(daemon.pid, signal.SIGKILL)
    assert daemon.popen.wait(10) == -signal.SIGKILL

    rows = outbox_rows(conn)
    assert 0 < len(rows) < total, "the kill should land mid-backlog"
    assert any(r["locked_by"] is not None for r in rows), "a claimed batch should be left behind by the crash"
    assert all(r["status"] == "pending" for r in rows)
    left = len(rows)

    restart = run_drain(spawn, env, name="restart")
    assert restart.popen.returncode == 0, restart.describe()
    assert outbox_rows(conn) == []
    stopped = restart.log("outboxd stopped")
    assert stopped is not None, restart.describe()
    # every event the crash left behind, claimed ones included (after their lease), was applied and acked once
    assert stopped["events_acked"] == left
    assert stopped["dead_letters"] == 0

    client = open_qdrant(qpath)
    try:
        assert await assert_converged(dsn, client, collection, embedder) == total
    finally:
        await client.close()


# --- 2. SIGTERM drains -------------------------------------------------------------------
def start_and_signal_mid_backlog(spawn, dsn: str, env: dict[str, str], total: int, drain_timeout: float):
    """Start `run`, SIGTERM it once a batch is acknowledged and another is in flight;
    return (process, outbox rows left when signalled)."""
    daemon = spawn("run", env=env, name="terminated")
    daemon.wait_running()

    def acked_and_claimed():
        remaining, claimed = outbox_counts(dsn)
        return remaining if 0 < remaining < total and claimed > 0 else None

    remaining_at_signal = daemon.wait_for(acked_and_claimed, "a first acknowledged batch with another in flight", 120, 0.02)
    signalled = time.monotonic()
    daemon.popen.send_signal(signal.SIGTERM)
    code = daemon.wait(drain_timeout + 20)
    assert code == 0, daemon.describe()
    assert time.monotonic() - signalled < drain_timeout + 20
    assert any(d.get("signal") == "SIGTERM" for d in daemon.logs()), "the signal was not logged\n" + daemon.describe()
    stopped = daemon.log("outboxd stopped")
    assert stopped is not None, daemon.describe()
    for key in ("upserted", "embedded", "events_acked", "batches"):
        assert isinstance(stopped[key], int)
    return daemon, remaining_at_signal


def released_on_timeout(daemon: DaemonProcess) -> bool:
    return any("drain timeout" in d.get("msg", "") for d in daemon.logs())


async def test_sigterm_finishes_batch_in_flight_and_exits_0(spawn, conn, dsn, collection, embedder, tmp_path):
    """SIGTERM: stop claiming, finish the batches in flight, exit 0 with final stats, leave no claim; a restart converges."""
    batch, drain_timeout = 32, 20
    texts = long_texts(256, words=40, seed=2)  # 8 batches: a late signal still leaves work unclaimed
    insert_backlog(conn, texts)
    total = len(texts)
    qpath = tmp_path / "qdrant"
    env = daemon_env(dsn, qpath, collection, OUTBOXD_BATCH_SIZE=batch, OUTBOXD_DRAIN_TIMEOUT=drain_timeout)

    daemon, remaining_at_signal = start_and_signal_mid_backlog(spawn, dsn, env, total, drain_timeout)
    stopped = daemon.log("outboxd stopped")
    rows = outbox_rows(conn)
    assert [r["id"] for r in rows if r["locked_by"] is not None] == [], "a claim survived a clean stop"
    assert all(r["status"] == "pending" for r in rows)
    # it stopped claiming: at most the batches in flight (one per worker) were finished after the signal,
    # plus one a worker may have claimed between our count and the signal's delivery
    assert len(rows) >= remaining_at_signal - 3 * batch, "kept claiming new batches after SIGTERM"
    assert len(rows) > 0
    # the in-flight batches were finished (acknowledged), not released
    assert len(rows) < remaining_at_signal
    assert stopped["events_acked"] == total - len(rows)
    assert not released_on_timeout(daemon)

    follow = run_drain(spawn, env, name="follow-up")
    assert follow.popen.returncode == 0, follow.describe()
    assert outbox_rows(conn) == []
    client = open_qdrant(qpath)
    try:
        assert await assert_converged(dsn, client, collection, embedder) == total
    finally:
        await client.close()


def test_sigterm_past_drain_timeout_releases_claims(spawn, conn, dsn, collection, tmp_path):
    """SIGTERM with a batch that cannot finish within drain_timeout: the claims are released at once, exit 0."""
    batch, drain_timeout = 32, 0.05
    texts = long_texts(160, words=40, seed=4)
    insert_backlog(conn, texts)
    env = daemon_env(
        dsn, tmp_path / "qdrant", collection, OUTBOXD_BATCH_SIZE=batch, OUTBOXD_DRAIN_TIMEOUT=drain_timeout,
        OUTBOXD_LEASE_SECONDS=60,  # a claim left behind would stay visible for a minute
    )
    daemon, remaining_at_signal = start_and_signal_mid_backlog(spawn, dsn, env, len(texts), drain_timeout)
    assert released_on_timeout(daemon), daemon.describe()
    rows = outbox_rows(conn)
    assert [r["id"] for r in rows if r["locked_by"] is not None] == [], "a claim survived the drain timeout"
    assert all(r["status"] == "pending" and r["attempts"] == 0 for r in rows)
    assert len(rows) >= remaining_at_signal - 3 * batch  # as above


# --- 3. run --drain ------------------------------------------------------------------------
async def test_run_drain_empties_backlog_and_embeds_each_text_once(spawn, conn, dsn, collection, embedder, tmp_path):
    """`run --drain` exits 0 once the backlog is applied; identical text is embedded once (invariant 7)."""
    distinct = long_texts(24, words=20, seed=3)
    texts = distinct + distinct[:10] + distinct[5:11]  # 40 chunks, 24 distinct texts, spread over batches
    insert_backlog(conn, texts, per_document=8)
    qpath = tmp_path / "qdrant"
    env = daemon_env(dsn, qpath, collection, OUTBOXD_BATCH_SIZE=8)

    proc = run_drain(spawn, env)
    assert proc.popen.returncode == 0, proc.describe()
    # a quiet exit: no teardown of the interpreter, where native libraries report leaks
    # (nanobind's dozens of lines, from the triton that PyPI's torch brings)
    assert not re.search(r"nanobind|leaked", proc.stderr), proc.describe()
    assert outbox_rows(conn) == []
    running = proc.log("outboxd running")
    assert running is not None and running["mode"] == "drain"
    stopped = proc.log("outboxd stopped")
    assert stopped is not None, proc.describe()
    assert stopped["embedded"] == len(set(texts)) == 24
    assert stopped["upserted"] == len(texts)
    assert stopped["events_acked"] == len(texts)
    assert stopped["dead_letters"] == 0
    # at INFO, the first of its 5+ batches says so once (a new user sees it work at once);
    # the others stay at DEBUG, below the default level
    firsts = [d for d in proc.logs() if d.get("msg") == "first batch applied"]
    assert len(firsts) == 1 and firsts[0]["level"] == "info" and firsts[0]["acked"] > 0, proc.describe()
    assert stopped["batches"] >= 5 and proc.log("batch applied") is None, proc.describe()

    client = open_qdrant(qpath)
    try:
        assert await assert_converged(dsn, client, collection, embedder) == len(texts)
    finally:
        await client.close()


# --- 4. model mismatch -----------------------------------------------------------------------
async def test_model_mismatch_refuses_to_start(spawn, conn, dsn, collection, tmp_path):
    """Invariant 8: a collection recorded for another model makes outboxd refuse to start (exit 78), writing nothing."""
    _, ids = add_document(conn, ["Vectors of one model only.", "Never mixed with another model."])
    qpath = tmp_path / "qdrant"
    env = daemon_env(dsn, qpath, collection)
    first = run_drain(spawn, env, name="first")  # creates the collection with MiniLM's fingerprint
    assert first.popen.returncode == 0, first.describe()

    # the collection now says another model made its vectors
    other = {"name": "other/model", "dimension": 768, "normalized": True, "id": "x"}
    client = open_qdrant(qpath)
    try:
        physical = await physical_collection(client, collection)
        recorded = (await client.get_collection(physical)).config.metadata[FINGERPRINT_KEY]
        assert recorded["name"] == "sentence-transformers/all-MiniLM-L6-v2"
        await client.update_collection(physical, metadata={FINGERPRINT_KEY: other})
        before = await all_points(client, collection)
    finally:
        await client.close()
    assert set(before) == {str(i) for i in ids}

    # work that a started daemon would write: a new chunk, a changed text, a deleted chunk
    _, new_ids = add_document(conn, ["A chunk written after the model changed."])
    conn.execute("UPDATE chunks SET text = 'changed text' WHERE id = %s", (ids[0],))
    conn.execute("DELETE FROM chunks WHERE id = %s", (ids[1],))
    pending = len(outbox_rows(conn))
    assert pending >= 3

    refused = run_drain(spawn, env, name="refused")
    assert refused.popen.returncode == EXIT_CONFIG, refused.describe()
    assert "other/model" in refused.stderr
    assert "OUTBOXD_COLLECTION" in refused.stderr
    errors = [d for d in refused.logs() if d.get("level") == "error"]
    assert errors and errors[-1].get("exit_code") == EXIT_CONFIG, refused.describe()
    assert "other/model" in errors[-1]["msg"] and "all-MiniLM-L6-v2" in errors[-1]["msg"]
    assert refused.log("outboxd running") is None

    assert len(outbox_rows(conn)) == pending, "events were consumed although the daemon refused to start"
    client = open_qdrant(qpath)
    try:
        after = await all_points(client, collection)
        info = await client.get_collection(await physical_collection(client, collection))
    finally:
        await client.close()
    assert set(after) == set(before)
    for pid, point in before.items():
        assert after[pid].payload == point.payload, f"payload of {pid} changed"
        assert np.allclose(dense(after[pid].vector), dense(point.vector), atol=1e-6), f"vector of {pid} changed"
    assert info.config.metadata[FINGERPRINT_KEY]["name"] == "other/model", "the recorded fingerprint was overwritten"


# --- 5. schema not migrated ----------------------------------------------------------------------
def test_unmigrated_database_refuses_to_start(spawn, empty_dsn, collection, tmp_path):
    """An unmigrated database makes `run` exit 78 and tell the operator to run `outboxd migrate`."""
    env = daemon_env(empty_dsn, tmp_path / "qdrant", collection)
    proc = run_drain(spawn, env)
    assert proc.popen.returncode == EXIT_CONFIG, proc.describe()
    errors = [d for d in proc.logs() if d.get("level") == "error"]
    assert errors, proc.describe()
    assert "outboxd migrate" in errors[-1]["msg"]
    assert errors[-1].get("exit_code") == EXIT_CONFIG
    assert "Traceback" not in proc.stderr
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert c.execute("SELECT to_regnamespace('outboxd')").fetchone()[0] is None, "run must not migrate by itself"


# --- 6. the embedded default ------------------------------------------------------------------------
async def test_embedded_default_without_database_url(spawn, tmp_path, embedder, reference):
    """Without DATABASE_URL, `run` starts a real embedded PostgreSQL, prints its URL, and syncs to <cwd>/.outboxd/qdrant."""
    cwd = tmp_path / "app"
    cwd.mkdir()
    env = base_env(OUTBOXD_POLL_INTERVAL=0.5, OUTBOXD_LEASE_SECONDS=3)
    assert "DATABASE_URL" not in env and "QDRANT_URL" not in env
    pgdata = cwd / ".outboxd" / "postgres"
    daemon = spawn("run", env=env, cwd=cwd, name="embedded")
    try:
        line = daemon.wait_for(
            lambda: re.search(r"DATABASE_URL=(postgresql://\S+)", daemon.stdout), "the printed DATABASE_URL", MODEL_LOAD_S
        )
        url = line.group(1)
        daemon.wait_running()

        text = "The embedded default needs no configuration at all."
        with psycopg.connect(url, autocommit=True) as c:
            _, (chunk_id,) = add_document(c, [text])

            def outbox_empty():
                return c.execute("SELECT count(*) FROM outboxd.outbox").fetchone()[0] == 0

            daemon.wait_for(outbox_empty, "the outbox to drain", 60, 0.1)

        daemon.popen.send_signal(signal.SIGTERM)
        assert daemon.wait(40) == 0, daemon.describe()
        assert daemon.log("outboxd stopped") is not None
        # the embedded server goes with the daemon: no stray PostgreSQL after a clean stop
        deadline = time.monotonic() + 15
        while (pgdata / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not (pgdata / "postmaster.pid").exists(), "the embedded PostgreSQL outlived the daemon"
    finally:
        daemon.kill()
        if (pgdata / "postmaster.pid").exists():  # a crashed run left the embedded server up: stop it
            time.sleep(2)
            if (pgdata / "postmaster.pid").exists():
                import pgserver

                pgserver.get_server(pgdata, cleanup_mode="stop").cleanup()

    qpath = cwd / ".outboxd" / "qdrant"
    assert qpath.is_dir()
    client = AsyncQdrantClient(path=str(qpath))  # the embedded default is local mode, whatever the session uses
    try:
        points = await client.retrieve("chunks", [str(chunk_id)], with_payload=True, with_vectors=True)
    finally:
        await client.close()
    assert len(points) == 1
    assert points[0].payload["text"] == text
    assert points[0].payload["outboxd"]["embedding_model"] == embedder.fingerprint.id

    truth = reference.encode([text], normalize_embeddings=True, convert_to_numpy=True)[0]
    assert float(np.dot(np.asarray(dense(points[0].vector)), truth)) > 0.999


# --- 7. secrets ---------------------------------------------------------------------------------------
def _with_password_url(dsn: str) -> str:
    params = conninfo_to_dict(dsn)
    user = params.get("user", "postgres")
    query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items() if k not in ("user", "dbname"))
    return f"postgresql://{user}:{PASSWORD}@/{params['dbname']}?{query}"


def test_secrets_never_logged_on_success(spawn, conn, dsn, collection, tmp_path):
    """Neither the database password nor the Qdrant API key appears in the output of a full run, even at DEBUG."""
    add_document(conn, ["Secrets stay secret.", "Logs are read by many people."])
    url = _with_password_url(dsn)
    assert PASSWORD in url
    with psycopg.connect(url) as c:  # the server accepts (ignores) the password
        c.execute("SELECT 1")
    env = daemon_env(url, tmp_path / "qdrant", collection, QDRANT_API_KEY=API_KEY, OUTBOXD_LOG_LEVEL="DEBUG")
    proc = run_drain(spawn, env)
    assert proc.popen.returncode == 0, proc.describe()
    assert proc.log("outboxd stopped") is not None
    assert outbox_rows(conn) == []
    for secret in (PASSWORD, API_KEY):
        assert secret not in proc.stdout
        assert secret not in proc.stderr


@pytest.mark.parametrize("form", ["conninfo", "url"])
def test_secrets_never_logged_on_failed_start(spawn, collection, tmp_path, form):
    """An unreachable PostgreSQL ends in exit 69 with an actionable message that does not contain the password."""
    if form == "conninfo":
        url = make_conninfo(host="127.0.0.1", port=1, dbname="outboxd", user="postgres", password=PASSWORD)
    else:
        url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/outboxd"
    env = daemon_env(
        url, tmp_path / "qdrant", collection, QDRANT_API_KEY=API_KEY, OUTBOXD_STARTUP_TIMEOUT=2, OUTBOXD_LOG_LEVEL="DEBUG"
    )
    proc = run_drain(spawn, env, timeout=60)
    assert proc.popen.returncode == EXIT_UNAVAILABLE, proc.describe()
    errors = [d for d in proc.logs() if d.get("level") == "error"]
    assert errors and "PostgreSQL" in errors[-1]["msg"], proc.describe()
    assert errors[-1].get("exit_code") == EXIT_UNAVAILABLE
    for secret in (PASSWORD, API_KEY):
        assert secret not in proc.stdout
        assert secret not in proc.stderr
