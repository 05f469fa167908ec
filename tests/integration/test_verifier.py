"""The continuous verifier on real PostgreSQL, the real Qdrant server and MiniLM.

In process: Qdrant scrolls UUID point ids in PostgreSQL's uuid order (from any
offset, present or not), a pass of bounded ranges finds each drift class
exactly once, and the lease row hands the verifier on with its checkpoint.

As processes (`outboxd run`): writes made with the capture triggers off and
points changed behind outboxd's back are repaired within one pass with no
operator, re-embedding only text that changed; of two daemons only one
verifies, and after `kill -9` of it the other takes over from its checkpoint.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid

import httpx
import orjson
import psycopg
import pytest
from psycopg.rows import dict_row
from qdrant_client import models

from daemon import cli
from daemon.admin.reconcile import KINDS, Reconciler, enqueue_repair
from daemon.errors import CollectionRetiredError
from daemon.outbox.notify_daemon import NotifyDaemon
from daemon.outbox.settings import VerifySettings
from daemon.outbox.verifier import VerifierLease
from tests.processes import daemon_env, health_port, sample
from tests.support import (
    NO_SPARSE_DRIFT,
    add_document,
    assert_converged,
    db_clock_passed,
    drain,
    make_every_drift,
    open_qdrant,
    outbox_rows,
    physical_collection,
    projection_of,
    require_server,
    wait_until,
)


def verifier_row(dsn: str, collection: str) -> dict | None:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
        return c.execute("SELECT * FROM outboxd.verifier WHERE collection = %s", (collection,)).fetchone()


async def until_verifier_lease_ran_out(dsn: str, collection: str) -> None:
    """Until PostgreSQL's clock is past the holder's lease (the lease query compares it with now())."""
    def ran_out() -> bool:
        with psycopg.connect(dsn, autocommit=True) as c:
            return db_clock_passed(c, "SELECT lease_until FROM outboxd.verifier WHERE collection = %s", (collection,))

    await wait_until(ran_out, f"the verifier lease of {collection!r} to run out", interval=0.1)


# --- Qdrant's order is PostgreSQL's ---------------------------------------------------------------
async def test_qdrant_scrolls_uuid_ids_in_postgresql_uuid_order(qdrant, conn, collection):
    """On the real server, over several segments: a scroll returns UUID ids in exactly the
    order PostgreSQL sorts the same uuids, and a scroll from any offset (an id it holds or
    not) starts at the first id >= the offset. The verifier's ranges rely on both."""
    require_server()
    rng = random.Random(5)
    ids = {str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(1500)}
    edges = ["00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
             "7fffffff-ffff-ffff-ffff-ffffffffffff", "80000000-0000-0000-0000-000000000000",
             "00000000-0000-0000-8000-000000000000", "00000000-0000-0000-7fff-ffffffffffff",
             "0000000f-0000-0000-0000-000000000000", "f0000000-0000-0000-0000-000000000001"]
    ids |= set(edges)
    await qdrant.create_collection(
        collection, vectors_config=models.VectorParams(size=2, distance=models.Distance.COSINE),
        optimizers_config=models.OptimizersConfigDiff(default_segment_number=4),
    )
    shuffled = list(ids)
    rng.shuffle(shuffled)
    for lo in range(0, len(shuffled), 200):
        await qdrant.upsert(collection, [models.PointStruct(id=i, vector=[1.0, 0.5]) for i in shuffled[lo:lo + 200]],
                            wait=True)
    postgres_order = [str(r[0]) for r in conn.execute("SELECT id FROM unnest(%s::uuid[]) AS t(id) ORDER BY id",
                                                      (list(ids),)).fetchall()]
    scrolled, offset = [], None
    while True:
        batch, offset = await qdrant.scroll(collection, limit=97, offset=offset, with_payload=False)
        scrolled += [str(p.id) for p in batch]
        if offset is None:
            break
    assert scrolled == postgres_order
    for start in [*edges, *rng.sample(sorted(ids), 20), *(str(uuid.uuid4()) for _ in range(20))]:
        batch, _ = await qdrant.scroll(collection, limit=5, offset=start, with_payload=False)
        want = [i for i in postgres_order if uuid.UUID(i) >= uuid.UUID(start)][:5]
        assert [str(p.id) for p in batch] == want, start


# --- a pass of ranges, in process -----------------------------------------------------------------
async def test_a_pass_of_small_ranges_finds_each_drift_class_once(conn, dsn, qdrant, collection, embedder,
                                                                  make_settings, pool):
    """Ranges of 7 ids walk the whole collection once per pass; each drift class injected
    behind outboxd's back is found exactly once, with the apply core's judgement; the
    repair events converge it, and the next pass finds nothing."""
    settings = make_settings()
    _, ids = add_document(conn, [f"chunk {i} of the verifier's corpus" for i in range(40)])
    await drain(settings, dsn, embedder, qdrant)
    target = await physical_collection(qdrant, collection)
    reconciler = Reconciler(pool, qdrant, target, await projection_of(qdrant, target, embedder.fingerprint.id))

    async def one_pass(repair=None):
        after, ranges, counts, chunks, points = None, 0, dict.fromkeys(KINDS, 0), 0, 0
        while True:
            checked = await reconciler.check_range(after, 7, repair)
            ranges += 1
            chunks, points = chunks + checked.report.chunks, points + checked.report.points
            counts = {k: counts[k] + checked.report.counts[k] for k in KINDS}
            assert checked.report.chunks <= 7 and checked.report.points <= 8
            if checked.complete:
                return ranges, chunks, points, counts
            assert after is None or checked.end > after
            after = checked.end

    ranges, chunks, points, counts = await one_pass()
    assert (chunks, points, sum(counts.values())) == (40, 40, 0) and ranges >= 40 // 7

    await make_every_drift(conn, qdrant, target, ids)
    assert outbox_rows(conn) == []

    _, chunks, points, counts = await one_pass(enqueue_repair(pool))
    assert counts == {"missing": 1, "orphaned": 2, "stale": 2, "wrong_model": 1, **NO_SPARSE_DRIFT}
    assert (chunks, points) == (39, 40)
    assert len(outbox_rows(conn)) == 6
    _, _, _, counts = await one_pass()  # repairs not applied yet: in flight, not drift again
    assert sum(counts.values()) == 0
    await drain(settings, dsn, embedder, qdrant)
    _, _, _, counts = await one_pass()
    assert sum(counts.values()) == 0
    await assert_converged(dsn, qdrant, collection, embedder)


async def test_the_lease_row_hands_the_verifier_on_with_its_checkpoint(dsn, pool):
    """One statement takes or renews the lease: a second worker is refused while the
    holder's lease runs, takes it over once it has run out (with the holder's checkpoint,
    counts and pass start), and the old holder's next checkpoint is then refused. A pass
    that completes is recorded and the next starts at the lowest id."""
    lease = 2.0  # long enough that b's first tries come within a's lease
    a = VerifierLease(pool, "chunks", "worker-a", lease_seconds=lease)
    b = VerifierLease(pool, "chunks", "worker-b", lease_seconds=lease)
    first = await a.take()
    assert first.held and first.after is None and first.passes == 0
    refused = await b.take()
    assert not refused.held and refused.holder == "worker-a"
    mid = uuid.UUID("40000000-0000-4000-8000-000000000000")
    saved = await a.checkpoint(mid, 120, {"stale": 2})
    assert saved.held and saved.after == mid
    assert not (await b.take()).held  # the checkpoint renewed the lease
    await until_verifier_lease_ran_out(dsn, "chunks")  # a died, or stalled
    taken = await b.take()
    assert taken.held and taken.holder == "worker-b"
    assert (taken.after, taken.pass_checked, taken.pass_drift, taken.pass_started_at) == (
        mid, 120, {"stale": 2}, first.pass_started_at)
    assert await a.checkpoint(uuid.uuid4(), 999, {}) is None  # a stalled holder wakes up: refused
    assert not (await a.take()).held
    done = await b.complete(250, {"stale": 2, "missing": 1})
    assert done.after is None and done.passes == 1 and done.pass_checked == 0 and done.pass_drift == {}
    assert (done.last_pass_checked, done.last_pass_drift) == (250, {"stale": 2, "missing": 1})
    assert done.last_pass_seconds >= lease and done.pass_started_at == done.last_pass_completed_at
    await b.release()  # handed on at once
    assert (await a.take()).held
    assert not (await VerifierLease(pool, "another-alias", "worker-a", 5).take()).after  # one row per alias


async def test_a_verifier_of_a_retired_collection_stops_instead_of_repairing(conn, dsn, qdrant, collection, embedder,
                                                                             make_settings):
    """Once a reindex retired the daemon's collection, its drift is no one's to repair: the
    verifier enqueues nothing and stops the daemon (exit 78), as its acknowledgement would."""
    settings = make_settings(verify=VerifySettings(chunks_per_second=1000, range_size=8))
    _, ids = add_document(conn, ["one text", "another text"])
    daemon = NotifyDaemon(settings, dsn, embedder=embedder, qdrant=qdrant)
    await daemon.start()
    try:
        assert await daemon.run(drain=True) == 0
        target = await physical_collection(qdrant, collection)
        await qdrant.delete(target, models.PointIdsList(points=[str(ids[0])]), wait=True)
        conn.execute("UPDATE outboxd.collections SET status = 'retired' WHERE alias = %s", (collection,))
        with pytest.raises(CollectionRetiredError, match="no longer the live collection") as stopped:
            await asyncio.wait_for((await daemon.verifier()).run(), 30)
        assert stopped.value.exit_code == 78
        assert outbox_rows(conn) == []
    finally:
        await daemon.close()


# --- the daemon as a process ----------------------------------------------------------------------
VERIFY_FAST = dict(OUTBOXD_VERIFY__CHUNKS_PER_SECOND=500, OUTBOXD_VERIFY__RANGE_SIZE=16,
                   OUTBOXD_VERIFY__LEASE_SECONDS=2, OUTBOXD_HEALTH_PORT=0, OUTBOXD_HEALTH_HOST="127.0.0.1")


def metrics_of(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def computed(port: int) -> float:
    return sample(metrics_of(port), "outboxd_embeddings_total", kind="computed") or 0.0


def drift_found(port: int) -> dict[str, float]:
    text = metrics_of(port)
    return {kind: sample(text, "outboxd_verify_drift_total", kind=kind) or 0.0 for kind in KINDS}


@pytest.mark.slow
async def test_writes_behind_outboxds_back_are_repaired_by_the_running_daemon(
        spawn, conn, dsn, collection, embedder, tmp_path, monkeypatch, capsys):
    """While `outboxd run` runs: chunk writes with the triggers disabled (ALTER TABLE ...
    DISABLE TRIGGER ALL, and session_replication_role = replica), a point deleted, an
    orphan point upserted and a payload edited by hand in Qdrant. Within one pass, with
    no operator, the verifier finds each, its repair events converge the collection, and
    the model encodes only the texts that changed."""
    require_server()
    doc, ids = add_document(conn, [f"verified chunk {i} about subject {i % 5}" for i in range(60)])
    _, titled = add_document(conn, ["first of three", "second of three", "third of three"], title="Old title")
    env = daemon_env(dsn, tmp_path / "qdrant", collection, OUTBOXD_WORKER_NAME="verifier-one", **VERIFY_FAST)
    daemon = spawn("run", env=env, name="verifying")
    port = health_port(daemon)
    daemon.wait_running()
    daemon.wait_for(lambda: not outbox_rows(conn) and computed(port) == 63, "the backlog to drain", 120, 0.2)
    daemon.wait_for(lambda: (verifier_row(dsn, collection) or {}).get("passes", 0) >= 1, "a first pass", 60, 0.1)
    assert drift_found(port) == dict.fromkeys(KINDS, 0.0)  # a converged collection: no drift
    qdrant = open_qdrant(tmp_path / "qdrant")
    target = await physical_collection(qdrant, collection)
    try:
        # PostgreSQL, behind the capture triggers
        conn.execute("ALTER TABLE chunks DISABLE TRIGGER ALL")
        try:
            conn.execute("UPDATE chunks SET text = 'a new text nobody captured' WHERE id = %s", (ids[0],))
            conn.execute("UPDATE chunks SET metadata = '{\"i\": 100}' WHERE id = %s", (ids[1],))
            conn.execute("DELETE FROM chunks WHERE id = %s", (ids[2],))
            conn.execute("INSERT INTO chunks (document_id, chunk_index, text) VALUES (%s, 99, 'an uncaptured chunk')",
                         (doc,))
        finally:
            conn.execute("ALTER TABLE chunks ENABLE TRIGGER ALL")
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute("UPDATE chunks SET text = 'replayed text, not captured' WHERE id = %s", (ids[3],))
            conn.execute("UPDATE documents SET title = 'New title' WHERE id = (SELECT document_id FROM chunks "
                         "WHERE id = %s)", (titled[0],))
        # Qdrant, behind outboxd
        await qdrant.delete(target, models.PointIdsList(points=[str(ids[4])]), wait=True)
        stray = str(uuid.uuid4())
        await qdrant.upsert(target, [models.PointStruct(id=stray, vector=[0.1] * 384, payload={"title": "stray"})],
                            wait=True)
        await qdrant.set_payload(target, {"title": "edited by hand", "url": "https://example.invalid"},
                                 points=[str(ids[5])], wait=True)
        passes = verifier_row(dsn, collection)["passes"]

        # the pass in progress may have passed some ids already; the next one passes all of them
        def repaired():
            row = verifier_row(dsn, collection)
            return row["passes"] >= passes + 2 and not outbox_rows(conn)

        daemon.wait_for(repaired, "two more passes and the repairs applied", 120, 0.1)
        await assert_converged(dsn, qdrant, collection, embedder)
        (point,) = await qdrant.retrieve(target, [str(ids[5])], with_payload=True)
        assert point.payload["title"] == "A document" and point.payload.get("url") is None
        assert not await qdrant.retrieve(target, [stray])
    finally:
        await qdrant.close()
    # each drift once: the repair of one is in flight (pending), not found again
    assert drift_found(port) == {"missing": 2, "orphaned": 2, "stale": 7, "wrong_model": 0, **NO_SPARSE_DRIFT}
    text = metrics_of(port)
    assert sample(text, "outboxd_verify_repaired_total") == 11
    assert sample(text, "outboxd_verify_chunks_checked_total") >= 2 * 63
    assert sample(text, "outboxd_verify_holder") == 1
    # only the three texts that changed (two updated, one inserted) went through the model
    assert computed(port) == 63 + 3

    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("OUTBOXD_COLLECTION", collection)
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["status", "--json"]) == 0
    v = orjson.loads(capsys.readouterr().out)["verifier"]
    assert v["holder"] == "verifier-one" and v["lease_live"] and v["passes"] >= passes + 2 and v["note"] is None
    assert 0 <= v["position"] < 1
    assert await asyncio.to_thread(cli.main, ["status"]) == 0
    out = capsys.readouterr().out
    assert "Verifier of" in out and "verifier-one" in out and "last full pass" in out
    daemon.popen.send_signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.describe()
    assert verifier_row(dsn, collection)["lease_until"] <= verifier_row(dsn, collection)["updated_at"]  # handed on


@pytest.mark.slow
def test_one_verifier_in_a_fleet_and_a_takeover_from_its_checkpoint(spawn, conn, dsn, collection, tmp_path):
    """Two `outboxd run`: only the lease holder verifies. After `kill -9` of it, the other
    takes the lease over once it runs out and resumes the pass at the dead one's
    checkpoint: the pass keeps its start and its count, and ends with every chunk
    counted once."""
    require_server()
    n = 200
    add_document(conn, [f"fleet chunk {i}" for i in range(n)])
    # 4 s a pass; a lease that outlasts a busy machine's pauses
    slow = dict(VERIFY_FAST, OUTBOXD_VERIFY__CHUNKS_PER_SECOND=50, OUTBOXD_VERIFY__RANGE_SIZE=10,
                OUTBOXD_VERIFY__LEASE_SECONDS=3)
    first = spawn("run", env=daemon_env(dsn, tmp_path / "qdrant", collection, OUTBOXD_WORKER_NAME="fleet-a", **slow),
                  name="fleet-a")
    port_a = health_port(first)
    first.wait_running()
    first.wait_for(lambda: (verifier_row(dsn, collection) or {}).get("holder") == "fleet-a", "fleet-a to verify",
                   60, 0.05)
    second = spawn("run", env=daemon_env(dsn, tmp_path / "qdrant", collection, OUTBOXD_WORKER_NAME="fleet-b", **slow),
                   name="fleet-b")
    port_b = health_port(second)
    second.wait_running()
    first.wait_for(lambda: not outbox_rows(conn), "the backlog to drain", 120, 0.1)

    # both running: only fleet-a verifies
    second.wait_for(lambda: sample(metrics_of(port_b), "outboxd_verify_holder") == 0, "fleet-b waiting", 30, 0.1)
    seen = set()
    deadline = time.monotonic() + 120  # a deadline for a stuck test: the loop ends on what it saw
    while len(seen) <= 3:  # while fleet-a checks several ranges, fleet-b never verifies
        assert time.monotonic() < deadline, f"fleet-a checked too few ranges: {sorted(seen)}\n{first.describe()}"
        a, b = metrics_of(port_a), metrics_of(port_b)
        seen.add(sample(a, "outboxd_verify_chunks_checked_total"))
        assert (sample(a, "outboxd_verify_holder"), sample(b, "outboxd_verify_holder")) == (1, 0)
        assert sample(b, "outboxd_verify_chunks_checked_total") == 0
        assert verifier_row(dsn, collection)["holder"] == "fleet-a"
        time.sleep(0.2)  # a sampling pace, not a synchronisation

    # kill -9 the holder mid-pass
    def mid_pass():
        row = verifier_row(dsn, collection)
        return row if row["after_id"] is not None and 40 <= row["pass_checked"] <= n - 60 else None

    first.wait_for(mid_pass, "fleet-a mid-pass", 30, 0.02)
    os.kill(first.pid, signal.SIGKILL)
    assert first.popen.wait(10) == -signal.SIGKILL
    at_kill = verifier_row(dsn, collection)
    assert at_kill["holder"] == "fleet-a" and at_kill["after_id"] is not None

    taken = second.wait_for(lambda: second.log("verifier lease taken"), "fleet-b to take the lease over", 30, 0.05)
    assert taken["resume_after"] == str(at_kill["after_id"]) and taken["pass_checked"] == at_kill["pass_checked"]
    assert taken["passes"] == at_kill["passes"]
    took_over = verifier_row(dsn, collection)
    assert took_over["holder"] == "fleet-b" and took_over["pass_started_at"] == at_kill["pass_started_at"]

    # the pass fleet-a started ends under fleet-b with each chunk counted once
    done = second.wait_for(
        lambda: (r := verifier_row(dsn, collection))["passes"] > at_kill["passes"] and r, "the pass to end", 60, 0.05)
    assert done["last_pass_checked"] == n
    assert (done["last_pass_completed_at"] - at_kill["pass_started_at"]).total_seconds() == pytest.approx(
        done["last_pass_seconds"], abs=0.01)  # the same pass, not one fleet-b started again
    checked_b = sample(metrics_of(port_b), "outboxd_verify_chunks_checked_total")
    assert checked_b >= n - at_kill["pass_checked"]
    second.popen.send_signal(signal.SIGTERM)
    assert second.wait(60) == 0, second.describe()


async def test_status_says_when_nobody_verifies(dsn, pool, collection, monkeypatch, capsys):
    """Before any daemon verified, and once the holder's lease ran out, `outboxd status`
    says that nothing verifies the collection now, and how to turn it on."""
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("OUTBOXD_COLLECTION", collection)

    async def verifier_status() -> tuple[dict, str]:
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["status", "--json", "--qdrant-url", "http://127.0.0.1:9"]) == 0
        doc = orjson.loads(capsys.readouterr().out)["verifier"]
        assert await asyncio.to_thread(cli.main, ["status", "--qdrant-url", "http://127.0.0.1:9"]) == 0
        return doc, capsys.readouterr().out

    doc, text = await verifier_status()
    assert doc["holder"] is None and "OUTBOXD_VERIFY__CHUNKS_PER_SECOND" in doc["note"]
    assert "Verifier: no daemon has verified this collection yet" in text
    lease = VerifierLease(pool, collection, "gone-worker", lease_seconds=0.2)
    await lease.take()
    await lease.checkpoint(uuid.UUID("c0000000-0000-4000-8000-000000000000"), 75, {"missing": 3})
    await until_verifier_lease_ran_out(dsn, collection)
    doc, text = await verifier_status()
    assert (doc["holder"], doc["lease_live"], doc["pass_checked"], doc["pass_drift"]) == (
        "gone-worker", False, 75, {"missing": 3})
    assert doc["position"] == 0.75 and "ran out" in doc["note"]
    assert "gone-worker (lease ran out: nobody verifies now)" in text and "75.0% of the pass" in text
    assert "3 missing" in text
