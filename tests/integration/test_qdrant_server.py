"""What users meet on a real Qdrant server, each against a server started for
the test from its binary (tests/qdrant_server.py): API keys (missing, wrong,
read-only, from a file), TLS with a private CA (and one that does not verify),
gRPC, several daemon processes starting at once on one collection, the server
SIGKILLed under load and restarted on its storage, and a collection restored
from a snapshot and brought back to PostgreSQL's truth by reconcile.

The tests skip where no server binary is at hand (a session in local mode).
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import orjson
import pytest

from daemon import cli
from tests.processes import (
    MODEL_LOAD_S,
    base_env,
    health_port,
    insert_backlog,
    long_texts,
    outbox_counts,
    run_drain,
    sample,
)
from tests.qdrant_server import QdrantServer, Tls, find_binary
from tests.support import (
    NO_SPARSE_DRIFT,
    add_document,
    assert_converged,
    delete_collections,
    drain,
    open_qdrant,
    outbox_rows,
    physical_collection,
    require_server,
    server_settings,
)

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.slow]

EXIT_CONFIG = 78
RW_KEY = "rw-7d1f0c3a9b"
RO_KEY = "ro-52e8a4d1c6"


def binary():
    found = find_binary()
    if found is None:
        pytest.skip("needs a Qdrant server binary (OUTBOXD_TEST_QDRANT_BIN)")
    return found


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A server that wants an API key (and takes a read-only one), over TLS with a private CA."""
    folder = tmp_path_factory.mktemp("secured-qdrant")
    with QdrantServer(binary(), folder / "data", api_key=RW_KEY, read_only_api_key=RO_KEY,
                      tls=Tls.make(folder / "tls")) as server:
        yield server


@pytest.fixture
def own_server(tmp_path):
    """A plain server of this test's own, to crash and restart."""
    server = QdrantServer(binary(), tmp_path / "own-qdrant")
    yield server.start()
    server.close()


def secured_env(dsn, collection, server: QdrantServer, **settings) -> dict[str, str]:
    """An outboxd process on the secured server: its URL and gRPC port; key and CA as the test says."""
    return base_env(DATABASE_URL=dsn, QDRANT_URL=server.url, OUTBOXD_QDRANT__GRPC_PORT=server.grpc_port,
                    OUTBOXD_COLLECTION=collection, OUTBOXD_POLL_INTERVAL=0.5, OUTBOXD_STARTUP_TIMEOUT=30, **settings)


def refused_before_the_model(proc, says: list[str]) -> dict:
    """The process exited 78 with one error line saying `says`, without treating the refusal
    as an outage (no retries) and before loading the model (nothing slow came first)."""
    assert proc.popen.returncode == EXIT_CONFIG, proc.describe()
    errors = [d for d in proc.logs() if d.get("level") == "error"]
    assert errors and errors[-1].get("exit_code") == EXIT_CONFIG, proc.describe()
    for word in says:
        assert word in errors[-1]["msg"], proc.describe()
    assert "Traceback" not in proc.stderr, proc.describe()
    assert not [d for d in proc.logs() if "retrying" in d.get("msg", "")], "a refusal was retried as an outage"
    assert proc.log("model loaded") is None, "the refusal should end the start before the model loads"
    return errors[-1]


# --- API keys ----------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["rest", "grpc"])
@pytest.mark.parametrize("key", [None, "not-the-key"], ids=["missing", "wrong"])
def test_a_missing_or_wrong_api_key_exits_78_naming_the_setting(spawn, dsn, collection, secured, transport, key):
    env = secured_env(dsn, collection, secured, OUTBOXD_QDRANT__CA_FILE=secured.tls.ca,
                      OUTBOXD_QDRANT__PREFER_GRPC=transport == "grpc", **({"QDRANT_API_KEY": key} if key else {}))
    proc = run_drain(spawn, env, timeout=120)
    refused_before_the_model(proc, ["refused the API key", "QDRANT_API_KEY"])
    assert "not-the-key" not in proc.stderr and RW_KEY not in proc.stderr


@pytest.mark.parametrize("transport", ["rest", "grpc"])
async def test_an_api_key_file_and_a_ca_file_converge(spawn, conn, dsn, collection, embedder, secured, tmp_path, transport):
    """QDRANT_API_KEY_FILE and OUTBOXD_QDRANT__CA_FILE, over REST and over gRPC (both use the CA)."""
    key_file = tmp_path / "qdrant-key"
    key_file.write_text(RW_KEY + "\n")
    _, ids = add_document(conn, ["Keys come from files mounted as secrets.", "The CA is private."])
    env = secured_env(dsn, collection, secured, QDRANT_API_KEY_FILE=key_file, OUTBOXD_QDRANT__CA_FILE=secured.tls.ca,
                      OUTBOXD_QDRANT__PREFER_GRPC=transport == "grpc")
    proc = run_drain(spawn, env)
    assert proc.popen.returncode == 0, proc.describe()
    assert outbox_rows(conn) == []
    assert RW_KEY not in proc.stderr + proc.stdout
    client = secured.client()
    try:
        assert await assert_converged(dsn, client, collection, embedder) == len(ids)
    finally:
        await client.close()


async def test_ssl_cert_file_verifies_the_server_when_no_ca_file_is_set(spawn, conn, dsn, collection, embedder, secured):
    add_document(conn, ["SSL_CERT_FILE is the convention many tools share."])
    env = secured_env(dsn, collection, secured, QDRANT_API_KEY=RW_KEY, SSL_CERT_FILE=secured.tls.ca)
    proc = run_drain(spawn, env)
    assert proc.popen.returncode == 0, proc.describe()
    client = secured.client()
    try:
        assert await assert_converged(dsn, client, collection, embedder) == 1
    finally:
        await client.close()


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_a_certificate_that_does_not_verify_exits_78_at_once(spawn, dsn, collection, secured, transport):
    """Without the private CA the certificate cannot verify, which no waiting heals: 78, naming the setting."""
    env = secured_env(dsn, collection, secured, QDRANT_API_KEY=RW_KEY, OUTBOXD_QDRANT__PREFER_GRPC=transport == "grpc")
    proc = run_drain(spawn, env, timeout=120)
    refused_before_the_model(proc, ["certificate does not verify", "OUTBOXD_QDRANT__CA_FILE", "SSL_CERT_FILE"])


async def test_a_read_only_key_serves_search_and_status_and_run_refuses_it(
    spawn, conn, dsn, collection, embedder, secured, make_settings, capsys, monkeypatch
):
    """The read-only key reads: `status`, `search` and `reconcile --check` answer with it.
    `run` would fail every write: it exits 78 at start saying so, and claims nothing."""
    add_document(conn, ["A read-only key may search.", "It may not write points."], title="Keys")
    client = secured.client()
    try:
        settings = make_settings(qdrant={"url": secured.url, "api_key": RW_KEY, "ca_file": secured.tls.ca})
        await drain(settings, dsn, embedder, client)
    finally:
        await client.close()

    for name, value in {"DATABASE_URL": dsn, "OUTBOXD_COLLECTION": collection, "QDRANT_URL": secured.url,
                        "QDRANT_API_KEY": RO_KEY, "OUTBOXD_QDRANT__CA_FILE": str(secured.tls.ca)}.items():
        monkeypatch.setenv(name, value)

    def run(*argv) -> tuple[int, str]:
        capsys.readouterr()
        code = cli.main(list(argv))
        return code, capsys.readouterr().out

    code, out = await asyncio.to_thread(run, "status", "--json")
    assert code == 0
    q = orjson.loads(out)["qdrant"]
    assert q["available"] is True and q["points"] == 2 and q["server_version"] == secured.version, q
    code, out = await asyncio.to_thread(run, "search", "--json", "may it search")
    assert code == 0 and len(orjson.loads(out)["hits"]) == 2
    code, out = await asyncio.to_thread(run, "reconcile", "--check", "--json")
    assert code == 0 and orjson.loads(out)["drift"] == 0

    # a key the server refuses: status still prints what it read, then exits 78 naming the setting
    monkeypatch.setenv("QDRANT_API_KEY", "not-the-key")
    code, out = await asyncio.to_thread(run, "status", "--json")
    report = orjson.loads(out)
    assert code == EXIT_CONFIG, report["qdrant"]
    assert report["qdrant"]["config_error"] is True and "QDRANT_API_KEY" in report["qdrant"]["reason"]
    assert report["outbox"]["backlog"] == 0
    monkeypatch.setenv("QDRANT_API_KEY", RO_KEY)

    add_document(conn, ["Written while only a read-only key is configured."])
    pending = outbox_rows(conn)
    env = secured_env(dsn, collection, secured, QDRANT_API_KEY=RO_KEY, OUTBOXD_QDRANT__CA_FILE=secured.tls.ca)
    proc = run_drain(spawn, env)
    assert proc.popen.returncode == EXIT_CONFIG, proc.describe()
    error = [d for d in proc.logs() if d.get("level") == "error"][-1]
    assert "403" in error["msg"] and "read-only key" in error["msg"] and "QDRANT_API_KEY" in error["msg"]
    assert proc.log("outboxd running") is None
    assert outbox_rows(conn) == pending, "events were claimed or consumed with a key that cannot write"


# --- several processes on one collection -------------------------------------------------------------
async def test_daemon_processes_starting_together_share_one_collection(spawn, conn, dsn, collection, embedder):
    """Three `outboxd run` processes started at once on an empty server: all come up on one
    collection (the losers of the creation race take the server's 409 as success), share the
    backlog, and converge."""
    server = require_server()
    insert_backlog(conn, long_texts(96, words=20, seed=11), per_document=24)
    env = base_env(DATABASE_URL=dsn, OUTBOXD_COLLECTION=collection, OUTBOXD_BATCH_SIZE=8, OUTBOXD_POLL_INTERVAL=0.5,
                   OUTBOXD_LEASE_SECONDS=5, OUTBOXD_STARTUP_TIMEOUT=30,
                   **{k: os.environ[k] for k in ("QDRANT_URL", "QDRANT_API_KEY", "OUTBOXD_QDRANT__CA_FILE") if os.environ.get(k)})
    procs = [spawn("run", "--drain", env=env, name=f"starter-{i}") for i in range(3)]
    for proc in procs:
        assert proc.wait(MODEL_LOAD_S + 120) == 0, proc.describe()
    assert outbox_rows(conn) == []
    assert sum(p.log("outboxd stopped")["events_acked"] for p in procs) == 96
    client = open_qdrant(":memory:")
    try:
        physical = [c.name for c in (await client.get_collections()).collections if c.name.startswith(collection)]
        assert len(physical) == 1, physical
        assert await assert_converged(dsn, client, collection, embedder) == 96
    finally:
        await client.close()
    assert server["url"]


# --- the server crashing under load -------------------------------------------------------------------
async def test_server_killed_mid_batch_and_restarted_converges(spawn, conn, dsn, collection, embedder, own_server):
    """SIGKILL of the Qdrant server while batches are in flight: the daemon waits (readiness
    down, retries counted against qdrant, no dead letter), and once the server is back on its
    storage it converges with zero drift, every event acknowledged exactly once."""
    texts = long_texts(192, words=40, seed=5)
    insert_backlog(conn, texts, per_document=48)
    env = base_env(DATABASE_URL=dsn, OUTBOXD_COLLECTION=collection, OUTBOXD_BATCH_SIZE=16, OUTBOXD_LEASE_SECONDS=5,
                   OUTBOXD_POLL_INTERVAL=0.5, OUTBOXD_HEALTH__PORT=0, OUTBOXD_HEALTH__HOST="127.0.0.1",
                   OUTBOXD_RETRY_BACKOFF_MAX=2, **own_server.env())
    daemon = spawn("run", env=env, name="through-a-crash")
    port = health_port(daemon)
    daemon.wait_running()

    def acked_and_claimed():
        remaining, claimed = outbox_counts(dsn)
        return remaining if 0 < remaining < len(texts) and claimed > 0 else None

    daemon.wait_for(acked_and_claimed, "a first acknowledged batch with another in flight", 120, 0.02)
    own_server.kill()

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        def qdrant_down():
            ready, metrics = http.get("/readyz"), http.get("/metrics").text
            up = sample(metrics, "outboxd_dependency_up", dependency="qdrant")
            retries = sample(metrics, "outboxd_retries_total", dependency="qdrant", stage="batch") or 0
            return (ready, metrics) if ready.status_code == 503 and up == 0 and retries > 0 else None

        ready, metrics = daemon.wait_for(qdrant_down, "readiness down and retries counted against qdrant", 60, 0.2)
        assert ready.json()["checks"]["qdrant"]["status"] == "fail"
        assert (sample(metrics, "outboxd_dead_letters_total") or 0) == 0
        waiting = outbox_counts(dsn)[0]
        assert waiting > 0, "the backlog drained without Qdrant"

        own_server.start()  # the same folder and ports: it recovers from its write-ahead log
        daemon.wait_for(lambda: outbox_counts(dsn)[0] == 0, "the backlog to drain after the restart", 180, 0.2)
        daemon.wait_for(lambda: http.get("/readyz").status_code == 200, "readiness back", 30, 0.2)

    daemon.popen.send_signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.describe()
    stopped = daemon.log("outboxd stopped")
    assert stopped["events_acked"] == len(texts), stopped  # each event acknowledged once, none lost
    assert stopped["dead_letters"] == 0 and stopped["events_failed"] == 0 and stopped["transient_retries"] > 0
    assert outbox_rows(conn) == []
    client = own_server.client()
    try:
        assert await assert_converged(dsn, client, collection, embedder) == len(texts)
    finally:
        await client.close()


# --- snapshots: backup and restore -------------------------------------------------------------------------
async def test_a_collection_restored_from_a_snapshot_is_brought_back_by_reconcile(
    conn, dsn, collection, embedder, make_settings, capsys, monkeypatch
):
    """The backup story: snapshot the live collection, keep writing, lose the collection,
    upload the snapshot again (Qdrant's own API), then `reconcile --repair` and the daemon
    bring it to PostgreSQL's truth, the chunks written after the snapshot included; the
    daemon points the alias at the restored collection again."""
    server = require_server()
    headers = {"api-key": server["api_key"]} if server.get("api_key") else {}
    settings = make_settings()
    _, ids = add_document(conn, ["Before the snapshot, one.", "Before the snapshot, two.", "Before the snapshot, three."])
    client = open_qdrant(":memory:")
    try:
        await drain(settings, dsn, embedder, client)
        physical = await physical_collection(client, collection)
        snapshot = await client.create_snapshot(physical, wait=True)
        async with httpx.AsyncClient(base_url=server["url"], headers=headers, verify=server.get("verify", True),
                                     timeout=60) as http:
            saved = (await http.get(f"/collections/{physical}/snapshots/{snapshot.name}")).raise_for_status().content

            # life goes on after the backup
            _, later = add_document(conn, ["Written after the snapshot."])
            conn.execute("UPDATE chunks SET text = 'Changed after the snapshot.' WHERE id = %s", (ids[0],))
            conn.execute("DELETE FROM chunks WHERE id = %s", (ids[1],))
            await drain(settings, dsn, embedder, client)

            # the collection is lost (its alias with it), then restored from the file
            await client.delete_collection(physical)
            restored = await http.post(f"/collections/{physical}/snapshots/upload", params={"priority": "snapshot", "wait": "true"},
                                       files={"snapshot": (snapshot.name, saved)})
            assert restored.status_code == 200, restored.text
        assert (await client.count(physical, exact=True)).count == 3
    finally:
        await client.close()

    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("OUTBOXD_COLLECTION", collection)

    def reconcile(*flags) -> tuple[int, dict]:
        capsys.readouterr()
        code = cli.main(["reconcile", "--json", *flags])
        return code, orjson.loads(capsys.readouterr().out)

    code, report = await asyncio.to_thread(reconcile, "--check")
    assert code == 3 and report["counts"] == {"missing": 1, "orphaned": 1, "stale": 1, "wrong_model": 0, **NO_SPARSE_DRIFT}, report
    assert report["examples"]["missing"] == [str(later[0])] and report["examples"]["orphaned"] == [str(ids[1])]
    code, report = await asyncio.to_thread(reconcile, "--repair")
    assert code == 0 and report["repaired"] == 3

    client = open_qdrant(":memory:")
    try:
        await drain(settings, dsn, embedder, client)  # applies the repairs; puts the alias back
        assert await assert_converged(dsn, client, collection, embedder) == 3
    finally:
        await client.close()
    code, report = await asyncio.to_thread(reconcile, "--check")
    assert code == 0 and report["drift"] == 0


def test_test_servers_are_gone_once_closed(tmp_path):
    """A server a test starts is stopped by its pid and leaves no process behind."""
    server = QdrantServer(binary(), tmp_path / "short-lived").start()
    pid = server.pid
    server.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"qdrant {pid} still runs after close()")


def test_collections_of_a_test_are_deleted_on_the_session_server():
    """The `collection` fixture's clean-up: what a test (or its processes) made on the server goes."""
    require_server()
    from qdrant_client import QdrantClient, models

    client = QdrantClient(**server_settings())
    try:
        client.create_collection("chunks_cleanup_probe__x", vectors_config=models.VectorParams(size=4, distance="Cosine"))
        assert delete_collections("chunks_cleanup_probe") == ["chunks_cleanup_probe__x"]
        assert not client.collection_exists("chunks_cleanup_probe__x")
    finally:
        client.close()
