"""Versioned writes (QdrantStore.write): a point takes a write only over an older
version or none, decided by Qdrant itself at the moment it applies the write, so
a writer that planned its write before a pause cannot put an older state back.
Against the session's Qdrant (its server, else local mode)."""
from __future__ import annotations

import os
import signal
import time
import uuid
from contextlib import closing

import pytest
from qdrant_client import models

from daemon.core.plan import bookkeeping
from daemon.core.qdrant_store import QdrantStore, Upserts
from tests.embedding_server import EmbeddingServer
from tests.processes import MODEL_LOAD_S, daemon_env
from tests.support import add_document, drain, require_server

pytestmark = [pytest.mark.integration]


@pytest.fixture
async def store(qdrant, collection):
    await qdrant.create_collection(collection, vectors_config=models.VectorParams(size=2, distance="Cosine"))
    store = QdrantStore(qdrant, collection, collection)
    await store.projection("a-model")  # settles what the points hold beside the chunk (no sparse vector here)
    return store


def ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


async def held(store: QdrantStore, point_ids: list[str]) -> dict[str, int | None]:
    records = await store.client.retrieve(store.collection, point_ids, with_payload=True)
    return {str(r.id): bookkeeping(r.payload or {}).get("version") for r in records}


async def put(store: QdrantStore, versions: dict[str, int | None]) -> int:
    upserts = Upserts()
    for point_id, version in versions.items():
        upserts.add(point_id, [1.0, 0.0], {} if version is None else {"outboxd": {"version": version}}, "a text")
    return await store.write(upserts, [], [], {k: v for k, v in versions.items() if v is not None})


async def test_an_older_version_never_lands_over_a_newer_one(store):
    a, b, c = ids(3)
    await put(store, {a: 5, b: None})
    assert await put(store, {a: 3, b: 4, c: 2}) == 1  # a holds 5: left; b held no version; c is new
    assert await held(store, [a, b, c]) == {a: 5, b: 4, c: 2}
    assert await put(store, {a: 7}) == 0
    assert (await held(store, [a]))[a] == 7


async def test_a_point_the_shared_condition_left_out_is_written_on_its_own(store):
    """One batch: a's write (12) over its 10, b's (5) over its 1. The batch's shared condition
    (older than 5) leaves a out; a is then written alone on its own version."""
    a, b = ids(2)
    await put(store, {a: 10, b: 1})
    assert await put(store, {a: 12, b: 5}) == 0
    assert await held(store, [a, b]) == {a: 12, b: 5}


async def test_a_delete_removes_only_an_older_state(store):
    a, b, c, d = ids(4)
    await put(store, {a: 8, b: 2, c: None, d: 20})
    newer = await store.write(None, [], [a, b, c, d], {a: 6, b: 9, c: 9, d: 30})
    assert newer == 1  # a holds 8, newer than its delete (6): it stays
    assert await held(store, [a, b, c, d]) == {a: 8}
    await store.write(None, [], [a], {a: 9})
    assert await held(store, [a]) == {}


async def test_unversioned_writes_are_unconditional(store):
    a, = ids(1)
    await put(store, {a: 50})
    upserts = Upserts()
    upserts.add(a, [0.0, 1.0], {"title": "written without a version"}, "a text")
    assert await store.write(upserts, [], []) == 0
    assert await held(store, [a]) == {a: None}


@pytest.mark.slow
def test_a_daemon_frozen_past_its_lease_cannot_put_an_older_state_back(spawn, conn, dsn, collection, tmp_path):
    """Daemon A is frozen (SIGSTOP) while its embed request for a chunk's first state
    is in flight; the chunk changes and daemon B applies the second state; A is
    thawed and finishes its batch. Polled every 20 ms from the thaw on, the point
    never shows the first state again: Qdrant refuses A's older write."""
    from qdrant_client import QdrantClient

    client = QdrantClient(**require_server())

    def text() -> str | None:
        records = client.retrieve(collection, [str(chunk)], with_payload=["text"])
        return records[0].payload["text"] if records else None

    first, second = "the first state of the chunk", "the second state of the chunk"
    with EmbeddingServer() as server, closing(client):
        held = server.hold("first state")
        env = daemon_env(dsn, tmp_path / "qdrant", collection, OUTBOXD_EMBEDDING__BACKEND="http",
                         OUTBOXD_EMBEDDING__URL=server.url, OUTBOXD_BATCH_SIZE=1, OUTBOXD_LEASE_SECONDS=2,
                         OUTBOXD_VERIFY__ENABLED="false")
        _, (chunk,) = add_document(conn, [first])
        a = spawn("run", env=env, name="daemon-a")
        a.wait_for(lambda: held.arrived.is_set(), "A's embed request", MODEL_LOAD_S)
        os.kill(a.pid, signal.SIGSTOP)
        try:
            held.release()  # the answer waits in A's socket
            conn.execute("UPDATE chunks SET text = %s WHERE id = %s", (second, chunk))
            b = spawn("run", env=env, name="daemon-b")
            b.wait_for(lambda: text() == second, "B's write of the second state", MODEL_LOAD_S)
        finally:
            os.kill(a.pid, signal.SIGCONT)
        seen = []
        while not a.log("first batch applied"):  # A's write and acknowledgement, after the thaw
            assert a.popen.poll() is None, a.describe()
            seen.append(text())
            time.sleep(0.02)
        seen += [text() for _ in range(10)]
        assert first not in seen, a.describe()
        assert seen[-1] == second
        assert a.popen.poll() is None and b.popen.poll() is None


async def test_a_point_seen_when_planning_is_only_updated_never_brought_back(store):
    """The writer saw the point when it planned; deleted since (its chunk is gone),
    the point is not inserted again by that writer's update."""
    a, b = ids(2)
    await put(store, {a: 1})
    await store.write(None, [], [a], {a: 5})  # another writer's delete, after this one planned
    upserts = Upserts()
    upserts.add(a, [1.0, 0.0], {"outboxd": {"version": 3}}, "a text")
    upserts.add(b, [1.0, 0.0], {"outboxd": {"version": 3}}, "a text")
    await store.write(upserts, [], [], {a: 3, b: 3}, seen=[a])
    assert await held(store, [a, b]) == {b: 3}


@pytest.mark.slow
def test_a_new_chunk_deleted_while_its_writer_is_frozen_is_gone_after_one_claim_cycle(spawn, conn, dsn, collection,
                                                                                     tmp_path):
    """What versions cannot prevent: a chunk new to Qdrant (no point when A planned),
    deleted while A is frozen, is inserted by A when it thaws. A's acknowledgement
    finds the chunk gone and enqueues its delete, which the daemons apply: the point
    goes again, and nothing stays pending. (docs/invariants.md, invariant 3, gives
    the window this measures: OUTBOXD_TEST_REPORT prints it.)"""
    from qdrant_client import QdrantClient

    client = QdrantClient(**require_server())
    with EmbeddingServer() as server, closing(client):
        held = server.hold("brief chunk")
        env = daemon_env(dsn, tmp_path / "qdrant", collection, OUTBOXD_EMBEDDING__BACKEND="http",
                         OUTBOXD_EMBEDDING__URL=server.url, OUTBOXD_BATCH_SIZE=1, OUTBOXD_LEASE_SECONDS=2,
                         OUTBOXD_VERIFY__ENABLED="false")
        _, (chunk,) = add_document(conn, ["a brief chunk"])
        a = spawn("run", env=env, name="daemon-a")
        a.wait_for(lambda: held.arrived.is_set(), "A's embed request", MODEL_LOAD_S)
        os.kill(a.pid, signal.SIGSTOP)
        try:
            held.release()
            conn.execute("DELETE FROM chunks WHERE id = %s", (chunk,))
            b = spawn("run", env=env, name="daemon-b")
            b.wait_for(lambda: pending(conn) == 0, "B's handling of the delete", MODEL_LOAD_S)
        finally:
            os.kill(a.pid, signal.SIGCONT)
        appeared = gone = None
        deadline = time.monotonic() + 60
        while gone is None and time.monotonic() < deadline:
            there = bool(client.retrieve(collection, [str(chunk)], with_payload=False))
            now = time.monotonic()
            if there and appeared is None:
                appeared = now
            elif not there and appeared is not None:
                gone = now
            elif a.log("first batch applied") and appeared is None and pending(conn) == 0:
                break  # A's write never showed (it landed and went between two looks, or not at all)
            time.sleep(0.005)
        assert not client.retrieve(collection, [str(chunk)], with_payload=False), a.describe()
        b.wait_for(lambda: pending(conn) == 0, "the delete A's acknowledgement enqueued", MODEL_LOAD_S)
        if appeared is not None and os.environ.get("OUTBOXD_TEST_REPORT"):
            print(f"\nthe deleted chunk's point lived {1000 * (gone - appeared):.0f} ms after the thaw")


def pending(conn) -> int:
    return conn.execute("SELECT count(*) FROM outboxd.outbox").fetchone()[0]


async def test_a_gone_chunks_version_is_forgotten_once_its_delete_is_acknowledged(conn, dsn, qdrant, embedder,
                                                                                    make_settings):
    """chunk_versions keeps a row per chunk that exists or has events waiting: a deleted
    chunk's row goes with the acknowledgement of its last events, and should the same id
    come back, its new version is above the one it had."""
    _, (kept, gone) = add_document(conn, ["a chunk that stays", "a chunk that goes"])
    before = dict(conn.execute("SELECT chunk_id, version FROM outboxd.chunk_versions").fetchall())
    conn.execute("DELETE FROM chunks WHERE id = %s", (gone,))
    await drain(make_settings(), dsn, embedder, qdrant)
    after = dict(conn.execute("SELECT chunk_id, version FROM outboxd.chunk_versions").fetchall())
    assert set(after) == {kept} and after[kept] == before[kept]
    conn.execute("INSERT INTO chunks (id, document_id, chunk_index, text) SELECT %s, document_id, 9, 'back again' "
                 "FROM chunks WHERE id = %s", (gone, kept))
    (back,) = conn.execute("SELECT version FROM outboxd.chunk_versions WHERE chunk_id = %s", (gone,)).fetchone()
    assert back > before[gone]
