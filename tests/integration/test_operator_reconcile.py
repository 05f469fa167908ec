"""`outboxd reconcile` and `outboxd backfill` on real PostgreSQL, Qdrant and MiniLM:
each drift class is found after it is injected behind the daemon's back,
--check and --repair behave, a live daemon causes no false drift, and a
database populated before outboxd is adopted with backfill."""
from __future__ import annotations

import asyncio
import random
import uuid

import orjson
import pytest
from psycopg.types.json import Jsonb
from qdrant_client import AsyncQdrantClient, models

from daemon import cli
from daemon.admin.reconcile import Reconciler, Scope, enqueue_repair
from daemon.errors import EXIT_CHECK_FAILED
from daemon.outbox.notify_daemon import NotifyDaemon
from db import migrate
from tests.conftest import create_database, drop_database
from tests.support import (
    NO_SPARSE_DRIFT,
    add_document,
    all_points,
    assert_converged,
    drain,
    make_every_drift,
    open_qdrant,
    outbox_rows,
    physical_collection,
    projection_of,
    qdrant_choice,
    qdrant_flags,
    require_server,
    server_settings,
)


async def reconcile(pool, qdrant, collection, embedder, repair=None, **kw):
    target = await physical_collection(qdrant, collection)
    return await Reconciler(pool, qdrant, target, await projection_of(qdrant, target, embedder.fingerprint.id),
                            **kw).run(repair)


async def test_each_drift_class_is_found_then_repaired(conn, dsn, qdrant, collection, embedder, make_settings, pool):
    """missing, orphaned, stale (text and payload), wrong_model: found exactly;
    --repair then a drain gives zero drift."""
    settings = make_settings()
    _, ids = add_document(conn, [f"chunk {i} of the reconcile corpus" for i in range(12)])
    await drain(settings, dsn, embedder, qdrant)
    target = await physical_collection(qdrant, collection)
    assert (await reconcile(pool, qdrant, collection, embedder)).drift == 0

    stray = await make_every_drift(conn, qdrant, target, ids)

    report = await reconcile(pool, qdrant, collection, embedder)
    assert report.counts == {"missing": 1, "orphaned": 2, "stale": 2, "wrong_model": 1, **NO_SPARSE_DRIFT}
    assert set(report.examples["orphaned"]) == {stray, str(ids[1])}
    assert report.examples["missing"] == [str(ids[0])] and report.examples["wrong_model"] == [str(ids[4])]
    assert report.chunks == 11 and report.points == 12

    repaired = await reconcile(pool, qdrant, collection, embedder, repair=enqueue_repair(pool))
    assert repaired.repaired == 6 and len(outbox_rows(conn)) == 6
    await drain(settings, dsn, embedder, qdrant)
    assert (await reconcile(pool, qdrant, collection, embedder)).drift == 0
    await assert_converged(dsn, qdrant, collection, embedder)


async def test_a_deep_check_finds_text_and_metadata_edited_by_hand(conn, dsn, qdrant, collection, embedder, make_settings,
                                                                   pool):
    """By default text and metadata are judged by the hashes that stand for them (the keys the
    daemon reads); a deep check reads them too, finds a hand edit of either, and its repair
    writes PostgreSQL's values back."""
    settings = make_settings()
    _, ids = add_document(conn, ["one text", "another text", "a third text"])
    await drain(settings, dsn, embedder, qdrant)
    target = await physical_collection(qdrant, collection)
    await qdrant.set_payload(target, {"text": "edited by hand"}, points=[str(ids[0])], wait=True)
    await qdrant.set_payload(target, {"metadata": {"i": 99}}, points=[str(ids[1])], wait=True)

    assert (await reconcile(pool, qdrant, collection, embedder)).drift == 0  # the hashes still agree
    deep = await reconcile(pool, qdrant, collection, embedder, deep=True)
    assert deep.counts["stale"] == 2 and set(deep.examples["stale"]) == {str(ids[0]), str(ids[1])}

    await reconcile(pool, qdrant, collection, embedder, repair=enqueue_repair(pool), deep=True)
    await drain(settings, dsn, embedder, qdrant)
    assert (await reconcile(pool, qdrant, collection, embedder, deep=True)).drift == 0
    await assert_converged(dsn, qdrant, collection, embedder)
    (point,) = await qdrant.retrieve(target, [str(ids[0])], with_payload=True)
    assert point.payload["text"] == "one text"


async def test_pending_changes_are_in_flight_not_drift(conn, dsn, qdrant, collection, embedder, make_settings, pool):
    """A change whose event the daemon has not applied yet is reported in flight."""
    _, ids = add_document(conn, ["first", "second"])
    await drain(make_settings(), dsn, embedder, qdrant)
    conn.execute("UPDATE chunks SET text = 'edited, not yet applied' WHERE id = %s", (ids[0],))
    report = await reconcile(pool, qdrant, collection, embedder)
    assert report.drift == 0 and report.in_flight == 1


async def test_scope_limits_the_comparison(conn, dsn, qdrant, collection, embedder, make_settings, pool):
    """--document compares only that document's chunks and points."""
    doc_a, ids_a = add_document(conn, ["a1", "a2"])
    _, ids_b = add_document(conn, ["b1", "b2", "b3"])
    await drain(make_settings(), dsn, embedder, qdrant)
    target = await physical_collection(qdrant, collection)
    await qdrant.delete(target, models.PointIdsList(points=[str(ids_b[0])]))
    scoped = await reconcile(pool, qdrant, collection, embedder, scope=Scope(document_id=doc_a))
    assert (scoped.chunks, scoped.points, scoped.drift) == (2, 2, 0)
    assert (await reconcile(pool, qdrant, collection, embedder)).counts["missing"] == 1


async def test_reconcile_against_a_live_daemon_reports_no_false_drift(conn, dsn, qdrant, collection, embedder, make_settings, pool):
    """While a daemon applies a stream of writes, reconcile finds no drift: every
    difference it meets is either in flight or already applied."""
    _, ids = add_document(conn, [f"live chunk {i}" for i in range(150)])
    daemon = NotifyDaemon(make_settings(batch_size=8), dsn, embedder=embedder, qdrant=qdrant)
    await daemon.start()
    run = asyncio.create_task(daemon.run())

    async def writer():
        for round_ in range(6):
            with conn.transaction():
                for cid in ids[round_ * 25 : round_ * 25 + 25]:
                    conn.execute("UPDATE chunks SET text = text || ' edited' WHERE id = %s", (cid,))
            await asyncio.sleep(0.15)

    try:
        reports = []
        writing = asyncio.create_task(writer())
        while not writing.done():
            reports.append(await reconcile(pool, qdrant, collection, embedder))
        await writing
    finally:
        daemon.stop.set()
        await run
        await daemon.close()
    assert reports and all(r.drift == 0 for r in reports), [r.counts for r in reports if r.drift]


# --- the CLI (sync tests: each command runs its own event loop) -------------------------------
def test_cli_check_json_and_repair(conn, dsn, collection, embedder, make_settings, tmp_path, capsys, monkeypatch):
    """--check exits 3 on drift and 0 without; --json is one document, which says it is the
    safety net for writes the capture triggers missed; --repair enqueues."""
    path = tmp_path / "qdrant"  # in local mode, on disk, so the CLI can open it once the test closed it
    settings = make_settings(**qdrant_choice(path))
    _, ids = add_document(conn, ["one", "two", "three"])

    async def converge_then_lose_a_point():
        client = open_qdrant(path)
        await drain(settings, dsn, embedder, client)
        await client.delete(await physical_collection(client, collection), models.PointIdsList(points=[str(ids[1])]))
        await client.close()

    async def converge():
        client = open_qdrant(path)
        await drain(settings, dsn, embedder, client)
        await client.close()

    asyncio.run(converge_then_lose_a_point())
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("OUTBOXD_COLLECTION", collection)
    base = ["reconcile", *qdrant_flags(path)]
    capsys.readouterr()
    assert cli.main(base + ["--check", "--json"]) == EXIT_CHECK_FAILED == 3
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["counts"]["missing"] == 1 and doc["examples"]["missing"] == [str(ids[1])] and doc["drift"] == 1
    assert doc["capture_mode"] == "origin" and doc["safety_net"].endswith("capture mode: origin")
    assert "triggers disabled are caught here" in doc["safety_net"]
    assert doc.get("local_mode_points") == (None if server_settings() else 2) and doc["warnings"] == []

    assert cli.main(base + ["--repair", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["repaired"] == 1
    assert [r["chunk_id"] for r in outbox_rows(conn)] == [ids[1]]

    asyncio.run(converge())
    assert cli.main(base + ["--check"]) == 0
    out = capsys.readouterr().out
    assert "0 drifted" in out and "writes made with the capture triggers disabled are caught here; capture mode: origin" in out


def floats_of(value) -> list[float]:
    """The floats of a JSON value, in order."""
    if isinstance(value, float):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [f for item in items for f in floats_of(item)]


def test_cli_deep_check_takes_floats_as_the_server_keeps_them(conn, dsn, collection, embedder, make_settings, tmp_path,
                                                               capsys, monkeypatch):
    """A Qdrant server stores some payload floats a few ulps off the ones it was sent, and
    no rewrite changes that: a deep check of a converged collection whose metadata is full
    of floats finds no drift (before, it found "stale" chunks that every repair left stale)."""
    require_server()  # local mode keeps floats exactly: nothing to tolerate there
    settings = make_settings()
    rng = random.Random(20)
    _, ids = add_document(conn, [f"chunk {i} with float metadata" for i in range(20)])
    sent = {}
    with conn.transaction():
        for cid in ids:
            sent[str(cid)] = {"score": rng.random(), "spans": [{"w": rng.uniform(-1e6, 1e6), "n": 3} for _ in range(50)],
                              # tiny ones too (PostgreSQL's jsonb keeps a float above 1e16 as a whole number)
                              "tiny": [rng.gauss(0, 1) * 10.0 ** rng.randint(-300, -1) for _ in range(20)]}
            conn.execute("UPDATE chunks SET metadata = %s WHERE id = %s", (Jsonb(sent[str(cid)]), cid))

    async def converge_and_read_back():
        client = open_qdrant(tmp_path)
        await drain(settings, dsn, embedder, client)
        points = await all_points(client, await physical_collection(client, collection))
        await client.close()
        return points

    points = asyncio.run(converge_and_read_back())
    pairs = [(held, wrote) for cid, metadata in sent.items()
             for held, wrote in zip(floats_of(points[cid].payload["metadata"]), floats_of(metadata), strict=True)]
    assert sum(held != wrote for held, wrote in pairs) > 0, "the server kept every float exactly: this test proves nothing"
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("OUTBOXD_COLLECTION", collection)
    capsys.readouterr()
    assert cli.main(["reconcile", "--check", "--deep", "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["drift"] == 0 and doc["chunks"] == doc["points"] == len(ids)


def test_cli_warns_about_local_mode_above_20000_points(conn, dsn, collection, embedder, make_settings, tmp_path,
                                                      capsys, monkeypatch):
    """Qdrant's local mode holds every point in memory: above 20,000 points reconcile says a server is due."""
    from daemon.commands import reconcile

    path = tmp_path / "qdrant"
    add_document(conn, ["one", "two"])

    async def converge():
        client = AsyncQdrantClient(path=str(path))
        await drain(make_settings(qdrant={"path": path}), dsn, embedder, client)
        await client.close()

    asyncio.run(converge())
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("OUTBOXD_COLLECTION", collection)
    monkeypatch.setattr(reconcile, "LOCAL_MODE_POINTS", 1)  # 2 points stand in for 20,001
    capsys.readouterr()
    assert cli.main(["reconcile", "--qdrant-path", str(path), "--json"]) == 0
    out, err = capsys.readouterr()
    (warning,) = orjson.loads(out)["warnings"]
    assert "local mode holds every point in memory" in warning and "recommends a server" in warning
    assert warning in err


# --- backfill ----------------------------------------------------------------------------------
@pytest.fixture
def legacy_dsn(pg_server):
    """A database whose content existed before outboxd's outbox did."""
    name = f"outboxd_legacy_{uuid.uuid4().hex[:8]}"
    dsn = create_database(pg_server, name)
    migrate.upgrade(dsn, "0001")  # the content tables only: no capture yet
    yield dsn
    drop_database(pg_server, name)


def test_backfill_adopts_a_database_populated_before_migration(legacy_dsn, collection, embedder, make_settings, capsys,
                                                               monkeypatch):
    """Chunks written before the outbox existed converge after backfill + drain;
    a second backfill says it is complete; --restart enqueues only what is not pending."""
    import psycopg

    with psycopg.connect(legacy_dsn, autocommit=True) as conn:
        add_document(conn, [f"pre-existing chunk {i}" for i in range(30)])
        add_document(conn, [f"another document {i}" for i in range(7)])
        migrate.upgrade(legacy_dsn)
        assert outbox_rows(conn) == []

        monkeypatch.setenv("DATABASE_URL", legacy_dsn)
        base = ["backfill", "--page-size", "8", "--json"]
        capsys.readouterr()
        assert cli.main(base) == 0
        first = orjson.loads(capsys.readouterr().out)
        assert (first["scanned"], first["enqueued"]) == (37, 37)
        assert cli.main(base) == 0
        assert orjson.loads(capsys.readouterr().out)["already_complete"] is True
        assert cli.main(base + ["--restart"]) == 0
        again = orjson.loads(capsys.readouterr().out)
        assert (again["scanned"], again["enqueued"]) == (37, 0)  # all still pending: nothing doubled
        assert len(outbox_rows(conn)) == 37

    async def converge() -> int:
        qdrant = open_qdrant(":memory:")
        await drain(make_settings(database_url=legacy_dsn), legacy_dsn, embedder, qdrant)
        return await assert_converged(legacy_dsn, qdrant, collection, embedder)

    assert asyncio.run(converge()) == 37


def test_backfill_resumes_from_its_checkpoint(conn, dsn, capsys, monkeypatch):
    """An interrupted backfill (checkpoint half-way) continues after it, scoped to one source."""
    doc, ids = add_document(conn, [f"c{i}" for i in range(20)])
    source = conn.execute("SELECT source_id FROM documents WHERE id = %s", (doc,)).fetchone()[0]
    add_document(conn, ["other source"])
    conn.execute("DELETE FROM outboxd.outbox")
    ordered = sorted(ids)
    job = f"backfill:source:{source}"
    conn.execute(
        "INSERT INTO outboxd.scan_progress (job, last_chunk_id, done) VALUES (%s, %s, 10)", (job, ordered[9])
    )
    capsys.readouterr()
    monkeypatch.setenv("DATABASE_URL", dsn)
    assert cli.main(["backfill", "--source", str(source), "--json"]) == 0
    result = orjson.loads(capsys.readouterr().out)
    assert result["resumed"] is True and result["enqueued"] == 10
    assert sorted(r["chunk_id"] for r in outbox_rows(conn)) == ordered[10:]
