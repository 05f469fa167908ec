"""Invariants 3, 4, 5 and 6 on real PostgreSQL, Qdrant and MiniLM: racing
workers, outages of Qdrant and PostgreSQL, and events that keep failing.

Faults are injected at the boundary the daemon sees: Qdrant requests fail the
way qdrant-client fails when a server is unreachable (the real local-mode
Qdrant does the work otherwise), and PostgreSQL drops the daemon's
connections and refuses new ones for a while.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from dataclasses import replace

import httpx
import orjson
import psycopg
import pytest
from psycopg.types.json import Jsonb
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from daemon import cli
from daemon.core.apply import Applier
from daemon.core.batch import Target
from daemon.core.chunk_state import ChunkState
from daemon.core.qdrant_store import QdrantStore, dense
from daemon.outbox.notify_daemon import NotifyDaemon
from daemon.outbox.queue import Outbox
from daemon.runtime.service import run_service
from db.gateway import make_pool
from tests.processes import daemon_env
from tests.support import (
    add_document,
    all_points,
    assert_converged,
    drain,
    open_qdrant,
    outbox_rows,
    require_server,
    wait_until,
)


# --- invariant 3: racing workers never leave an older state --------------------------
@contextlib.asynccontextmanager
async def two_workers(dsn, settings, embedder, qdrant):
    pool = make_pool(dsn, application_name="outboxd:test", min_size=1, max_size=4)
    await pool.open(wait=True)
    sink = QdrantStore(qdrant, settings.collection)
    await sink.ensure_collection(embedder.fingerprint)
    try:
        yield Applier(embedder, sink), Outbox(pool, "worker-a", 30), Outbox(pool, "worker-b", 30)
    finally:
        await pool.close()


async def point_text(qdrant, collection, chunk_id) -> str:
    (point,) = await qdrant.retrieve(collection, [str(chunk_id)], with_payload=True)
    return point.payload["text"]


async def test_stale_write_landing_last_is_corrected(conn, dsn, qdrant, collection, embedder, make_settings):
    """Worker A reads v2, worker B reads and writes v3, then A's v2 lands last:
    A's ack sees the chunk moved on and keeps its event, so v3 wins."""
    settings = make_settings()
    _, (cid,) = add_document(conn, ["version one"])
    await drain(settings, dsn, embedder, qdrant)
    async with two_workers(dsn, settings, embedder, qdrant) as (applier, a, b):
        conn.execute("UPDATE chunks SET text = 'version two' WHERE id = %s", (cid,))
        events_a = await a.claim(10)
        states_a = await a.chunk_states([cid])

        conn.execute("UPDATE chunks SET text = 'version three' WHERE id = %s", (cid,))
        events_b = await b.claim(10)
        assert {e.id for e in events_b}.isdisjoint(e.id for e in events_a)
        states_b = await b.chunk_states([cid])
        result_b = await applier.apply({cid: states_b[cid]})
        assert await b.ack_verified([e.id for e in events_b], result_b.written) == (1, 0)

        result_a = await applier.apply({cid: states_a[cid]})  # the stale write lands last
        assert await point_text(qdrant, collection, cid) == "version two"
        assert await a.ack_verified([e.id for e in events_a], result_a.written) == (0, 1)

    rows = outbox_rows(conn)
    assert [(r["chunk_id"], r["locked_by"]) for r in rows] == [(cid, None)]
    await drain(settings, dsn, embedder, qdrant)
    assert await point_text(qdrant, collection, cid) == "version three"
    await assert_converged(dsn, qdrant, collection, embedder)


async def test_stale_write_after_lease_loss_is_requeued(conn, dsn, qdrant, collection, embedder, make_settings):
    """If A's lease ran out and B acknowledged A's event, A's stale write still
    gets a fresh event: no write that may be stale is left uncorrected."""
    settings = make_settings()
    _, (cid,) = add_document(conn, ["version one"])
    await drain(settings, dsn, embedder, qdrant)
    async with two_workers(dsn, settings, embedder, qdrant) as (applier, a, b):
        conn.execute("UPDATE chunks SET text = 'version two' WHERE id = %s", (cid,))
        events_a = await a.claim(10)
        states_a = await a.chunk_states([cid])
        conn.execute("UPDATE outboxd.outbox SET locked_until = now() - interval '1 second' WHERE locked_by = 'worker-a'")

        conn.execute("UPDATE chunks SET text = 'version three' WHERE id = %s", (cid,))
        events_b = await b.claim(10)
        result_b = await applier.apply({cid: (await b.chunk_states([cid]))[cid]})
        acked, _ = await b.ack_verified([e.id for e in events_b], result_b.written)
        assert acked == 2  # B's own event and A's expired one

        result_a = await applier.apply({cid: states_a[cid]})
        assert await a.ack_verified([e.id for e in events_a], result_a.written) == (0, 1)

    assert len(outbox_rows(conn)) == 1
    await drain(settings, dsn, embedder, qdrant)
    assert await point_text(qdrant, collection, cid) == "version three"


def _edit_rounds(dsn: str, ids: list, rounds: int = 5, pause: float = 0.3) -> None:
    """Writers changing the same chunks again and again: each round edits 60 chunks, 40 of them again."""
    with psycopg.connect(dsn, autocommit=True) as writer:
        for round_ in range(rounds):
            with writer.transaction():
                for cid in ids[round_ * 20 : round_ * 20 + 60]:
                    writer.execute("UPDATE chunks SET text = text || ' (edit ' || %s || ')' WHERE id = %s", (round_, cid))
            time.sleep(pause)


class MovedOnBeforeWrite(QdrantStore):
    """A store where another writer changes each point after apply planned from its keys,
    just before apply's write lands (a paused daemon, a rebalanced Kafka partition)."""

    def __init__(self, client, collection, other_write):
        super().__init__(client, collection)
        self.other_write = other_write

    async def write(self, *args, **kwargs):
        await self.other_write()
        return await super().write(*args, **kwargs)


async def test_a_versioned_payload_update_lands_only_beside_the_text_it_assumes(qdrant, collection, embedder):
    """A retitled chunk of a versioned target is one payload update carrying its version,
    nothing embedded. Where the point moved on between the plan and the write (another
    text, or a newer version), Qdrant leaves it as it is: a payload is never set beside
    another text's vector, and a newer point is never set back."""
    store = QdrantStore(qdrant, collection)
    await store.ensure_collection(embedder.fingerprint)
    cid = uuid.uuid4()
    first = ChunkState(chunk_id=cid, document_id=uuid.uuid4(), source_id=uuid.uuid4(), chunk_index=0,
                       text="Vectors kept in step with rows.", token_count=6, content_hash="h-first", metadata={},
                       title="A title", url=None, document_type=None, state_hash="s1")
    await Applier(embedder, store).apply({cid: Target(first, version=1)})

    # another text lands in between (a version the update is newer than): the update does not land
    newer = replace(first, text="A different text altogether.", content_hash="h-newer", title="Newer")
    moved = MovedOnBeforeWrite(qdrant, collection, lambda: Applier(embedder, store).apply({cid: Target(newer, 2)}))
    await Applier(embedder, moved).apply({cid: Target(replace(first, title="Retitled"), version=3)})
    (point,) = await qdrant.retrieve(collection, [str(cid)], with_payload=True, with_vectors=True)
    vectors, _ = await embedder.embed({"h-newer": newer.text})
    held = point.payload["outboxd"]
    assert (held["content_hash"], point.payload["title"], held["version"]) == ("h-newer", "Newer", 2)
    assert dense(point.vector) == pytest.approx(vectors["h-newer"].vector, abs=1e-6)

    # a newer version of the same text lands in between: the older update does not land
    await Applier(embedder, store).apply({cid: Target(first, version=4)})
    moved = MovedOnBeforeWrite(qdrant, collection,
                               lambda: Applier(embedder, store).apply({cid: Target(first, version=9)}))
    await Applier(embedder, moved).apply({cid: Target(replace(first, title="Older"), version=5)})
    (point,) = await qdrant.retrieve(collection, [str(cid)], with_payload=True)
    assert (point.payload["outboxd"]["version"], point.payload["title"]) == (9, first.title)

    # nothing in between: one payload update, nothing embedded, the vector kept
    kept = await all_points(qdrant, collection)
    result = await Applier(embedder, store).apply({cid: Target(replace(first, title="Kept"), version=10)})
    assert (result.payload_only, result.embedded, result.upserted) == (1, 0, 0)
    after = (await all_points(qdrant, collection))[str(cid)]
    assert after.vector == kept[str(cid)].vector
    assert (after.payload["title"], after.payload["outboxd"]["version"]) == ("Kept", 10)


async def test_two_daemon_instances_in_one_process_share_the_work_under_concurrent_writes(
    conn, dsn, qdrant, collection, embedder, make_settings
):
    """Two NotifyDaemon instances in this test's process (one event loop, one Qdrant client,
    one embedder; separate pools and leases), while writers in a thread keep changing the
    same chunks: converged, every event acknowledged, both took work. The same with two
    processes: test_two_daemon_processes_share_the_work_under_concurrent_writes."""
    _, ids = add_document(conn, [f"chunk number {i} about topic {i % 7}" for i in range(240)])
    daemons = [
        NotifyDaemon(make_settings(worker_name=name, batch_size=16, concurrency=1), dsn, embedder=embedder, qdrant=qdrant)
        for name in ("daemon-a", "daemon-b")
    ]
    for d in daemons:
        await d.start()
    runs = [asyncio.create_task(d.run()) for d in daemons]
    try:
        await asyncio.to_thread(_edit_rounds, dsn, ids)  # the writes block a thread, not the daemons' loop
        async def drained() -> bool:
            return not await asyncio.to_thread(outbox_rows, conn)

        await wait_until(drained, "the two daemons to drain the outbox", timeout=180, interval=0.2)
    finally:
        for d in daemons:
            d.stop.set()
        assert await asyncio.gather(*runs) == [0, 0]
        for d in daemons:
            await d.close()
    assert all(d.stats.batches > 0 for d in daemons), "both daemons should have taken work"
    await assert_converged(dsn, qdrant, collection, embedder)


@pytest.mark.slow
async def test_two_daemon_processes_share_the_work_under_concurrent_writes(spawn, conn, dsn, collection, embedder,
                                                                           tmp_path):
    """Two `outboxd run` processes on one database and one Qdrant server, while writers keep
    changing the same chunks: once the writes stop and the backlog drains, the collection
    has converged, both processes took work, and every event was acknowledged exactly once
    between them."""
    require_server()
    _, ids = add_document(conn, [f"chunk number {i} about topic {i % 7}" for i in range(240)])
    env = daemon_env(dsn, tmp_path / "qdrant", collection, OUTBOXD_BATCH_SIZE=16, OUTBOXD_CONCURRENCY=1)
    procs = [spawn("run", env=env, name=f"daemon-{name}") for name in ("a", "b")]
    for proc in procs:
        proc.wait_running()
    await asyncio.to_thread(_edit_rounds, dsn, ids)
    procs[0].wait_for(lambda: not outbox_rows(conn), "the backlog to drain", 300, 0.2)
    for proc in procs:
        proc.popen.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(60) == 0, proc.describe()
    stopped = [proc.log("outboxd stopped") for proc in procs]
    assert all(s["batches"] > 0 for s in stopped), "both daemons should have taken work"
    # every event that ever existed (the writers', and any an acknowledgement re-queued) was
    # acknowledged by exactly one of them: the outbox is empty and the counts add up
    created = conn.execute(
        "SELECT pg_sequence_last_value(pg_get_serial_sequence('outboxd.outbox', 'id')::regclass)").fetchone()[0]
    assert sum(s["events_acked"] for s in stopped) == created >= 240 + 5 * 60
    assert sum(s["dead_letters"] for s in stopped) == 0
    client = open_qdrant(tmp_path / "qdrant")
    try:
        await assert_converged(dsn, client, collection, embedder)
    finally:
        await client.close()


# --- invariants 4 and 5: outages end in convergence, with nothing lost -------------------
class FlakyQdrant:
    """The real client, with requests failing as they do when the server is
    unreachable while `down` is set, or rejected (HTTP 400) for one chunk id."""

    def __init__(self, client) -> None:
        self._client = client
        self.down = False
        self.reject_id: str | None = None
        self.failures = 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    def _check(self, ids) -> None:
        if self.down:
            self.failures += 1
            raise ResponseHandlingException(httpx.ConnectError("[Errno 111] Connection refused"))
        if self.reject_id is not None and self.reject_id in ids:
            raise UnexpectedResponse(400, "Bad Request", b'{"status":{"error":"rejected"}}', httpx.Headers())

    async def retrieve(self, collection_name, ids, **kw):
        self._check([str(i) for i in ids])
        return await self._client.retrieve(collection_name, ids, **kw)

    async def batch_update_points(self, collection_name, update_operations, **kw):
        ids = []
        for op in update_operations:
            if hasattr(op, "upsert"):  # a PointsList, or a column-wise PointsBatch
                upsert = op.upsert
                ids += [str(i) for i in upsert.batch.ids] if hasattr(upsert, "batch") else [str(p.id) for p in upsert.points]
        self._check(ids)
        return await self._client.batch_update_points(collection_name, update_operations, **kw)


async def test_qdrant_outage_is_retried_without_counting_attempts(conn, dsn, qdrant, collection, embedder, make_settings):
    """While Qdrant is unreachable nothing is acknowledged, no attempt is counted and
    nothing becomes a dead letter; once it is back the backlog converges."""
    flaky = FlakyQdrant(qdrant)
    daemon = NotifyDaemon(make_settings(max_attempts=2), dsn, embedder=embedder, qdrant=flaky)
    await daemon.start()
    flaky.down = True
    add_document(conn, [f"written during the outage {i}" for i in range(30)])
    run = asyncio.create_task(daemon.run())
    try:
        await wait_until(lambda: flaky.failures >= 3, "three writes to fail against the unreachable Qdrant")
        rows = outbox_rows(conn)
        assert len(rows) == 30
        assert {r["status"] for r in rows} == {"pending"} and {r["attempts"] for r in rows} == {0}
        flaky.down = False
        await wait_until(lambda: not outbox_rows(conn), "the backlog to drain once Qdrant is back")
    finally:
        daemon.stop.set()
        assert await run == 0
        await daemon.close()
    assert daemon.stats.transient_retries >= 3 and daemon.stats.dead_letters == 0
    await assert_converged(dsn, qdrant, collection, embedder)


async def test_postgres_outage_ends_in_convergence(conn, dsn, qdrant, collection, embedder, make_settings, caplog):
    """PostgreSQL drops the daemon's connections and refuses new ones for a
    while; writes made before and after converge with no manual step."""
    dbname = conn.info.dbname
    daemon = NotifyDaemon(make_settings(), dsn, embedder=embedder, qdrant=qdrant)
    run = asyncio.create_task(run_service(daemon))  # the supervisor: the listener runs beside the workers
    admin = psycopg.connect(dsn, autocommit=True, dbname="postgres")
    try:
        await wait_until(lambda: daemon.started, "the daemon to start")
        add_document(conn, [f"before the outage {i}" for i in range(10)])
        await wait_until(lambda: not outbox_rows(conn), "the backlog before the outage to drain")
        retries = daemon.stats.transient_retries
        add_document(conn, [f"just before the outage {i}" for i in range(40)])
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        # the outage lasts until the daemon has met it: its LISTEN connection lost, a retry counted
        await wait_until(lambda: "LISTEN connection lost; polling covers the gap" in caplog.text
                         and daemon.stats.transient_retries > retries, "the daemon to meet the outage")
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        with psycopg.connect(dsn, autocommit=True) as fresh:
            add_document(fresh, [f"after the outage {i}" for i in range(10)])
            await wait_until(lambda: not outbox_rows(fresh), "the backlog to drain after the outage", timeout=90)
    finally:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        admin.close()
        daemon.stop.set()
        assert await run == 0
    assert "LISTEN connection lost; polling covers the gap" in caplog.text  # the outage was real
    assert await assert_converged(dsn, qdrant, collection, embedder) == 60


async def test_postgres_down_at_start_longer_than_one_try_is_waited_for(conn, dsn, qdrant, collection, embedder,
                                                                       make_settings, caplog):
    """PostgreSQL refuses connections when the daemon starts, for longer than one
    try of the pool (10 s): the daemon keeps trying within OUTBOXD_STARTUP_TIMEOUT
    and converges once it is back, instead of giving up on a pool that closed."""
    dbname = conn.info.dbname
    add_document(conn, [f"written before the start {i}" for i in range(5)])
    admin = psycopg.connect(dsn, autocommit=True, dbname="postgres")
    admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
    daemon = NotifyDaemon(make_settings(startup_timeout=60), dsn, embedder=embedder, qdrant=qdrant)
    run = asyncio.create_task(run_service(daemon))
    try:
        await wait_until(lambda: "PostgreSQL not reachable yet; retrying" in caplog.text,
                         "the daemon to retry reaching PostgreSQL", timeout=30)
        assert not daemon.started
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        await wait_until(lambda: daemon.started, "the daemon to start once PostgreSQL is back", timeout=45)
        with psycopg.connect(dsn, autocommit=True) as fresh:
            await wait_until(lambda: not outbox_rows(fresh), "the backlog to drain", timeout=60)
    finally:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        admin.close()
        daemon.stop.set()
        assert await run == 0
    assert await assert_converged(dsn, qdrant, collection, embedder) == 5


# --- invariant 6: poison isolation and dead letters ----------------------------------------
async def test_poison_chunk_becomes_a_dead_letter_and_others_converge(conn, dsn, qdrant, collection, embedder, make_settings, capsys):
    """A chunk whose metadata cannot be a payload object is retried, then parked
    with its error; the rest of its batch converges; fixing the row heals it."""
    settings = make_settings(max_attempts=3)
    _, ids = add_document(conn, ["good one", "good two", "poisoned", "good three"])
    conn.execute("UPDATE chunks SET metadata = %s WHERE id = %s", (Jsonb(["not", "an", "object"]), ids[2]))
    daemon = await drain(settings, dsn, embedder, qdrant)

    rows = outbox_rows(conn)
    assert {r["chunk_id"] for r in rows} == {ids[2]}
    assert {r["status"] for r in rows} == {"dead"}
    assert all(r["attempts"] == 3 and "metadata is a JSON list" in r["last_error"] for r in rows)
    assert daemon.stats.dead_letters == len(rows)
    assert set(await all_points(qdrant, collection)) == {str(i) for i in ids if i != ids[2]}

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DATABASE_URL", dsn)
        env.setenv("OUTBOXD_LOG_FORMAT", "json")
        assert await asyncio.to_thread(cli.main, ["dead-letters", "list", "--json"]) == 0  # a command runs its own loop
    listed = orjson.loads(capsys.readouterr().out)
    assert {r["chunk_id"] for r in listed} == {str(ids[2])}

    conn.execute("UPDATE chunks SET metadata = '{}' WHERE id = %s", (ids[2],))
    await drain(settings, dsn, embedder, qdrant)
    assert outbox_rows(conn) == []  # the fix's event converged the chunk, and its dead letters with it
    await assert_converged(dsn, qdrant, collection, embedder)


async def test_dead_letter_retry_puts_events_back(conn, dsn, qdrant, collection, embedder, make_settings, capsys):
    """`outboxd dead-letters retry` sends dead letters back to pending with attempts reset."""
    settings = make_settings(max_attempts=1)
    _, (cid,) = add_document(conn, ["poisoned"])
    conn.execute("DELETE FROM outboxd.outbox")
    conn.execute("UPDATE chunks SET metadata = '\"a string\"'::jsonb WHERE id = %s", (cid,))
    await drain(settings, dsn, embedder, qdrant)
    assert [r["status"] for r in outbox_rows(conn)] == ["dead"]

    with pytest.MonkeyPatch.context() as env:
        env.setenv("DATABASE_URL", dsn)
        assert await asyncio.to_thread(cli.main, ["dead-letters", "retry", "--all"]) == 0
    assert "1 dead letter(s) back to pending" in capsys.readouterr().out
    assert [(r["status"], r["attempts"]) for r in outbox_rows(conn)] == [("pending", 0)]


async def test_rejected_point_is_isolated_from_its_batch(conn, dsn, qdrant, collection, embedder, make_settings):
    """Qdrant rejecting one point (HTTP 400) fails that chunk alone: the batch is
    split, the others converge, the rejected one ends as a dead letter."""
    flaky = FlakyQdrant(qdrant)
    _, ids = add_document(conn, [f"text {i}" for i in range(8)])
    flaky.reject_id = str(ids[5])
    await drain(make_settings(max_attempts=2), dsn, embedder, flaky)
    rows = outbox_rows(conn)
    assert {r["chunk_id"] for r in rows} == {ids[5]} and {r["status"] for r in rows} == {"dead"}
    assert "UnexpectedResponse" in rows[0]["last_error"]
    assert set(await all_points(qdrant, collection)) == {str(i) for i in ids if i != ids[5]}


# --- the embedding edge: text longer than the model's window ----------------------------------
async def test_long_text_is_embedded_truncated_and_says_so(conn, dsn, qdrant, collection, embedder, make_settings):
    long_text = " ".join(f"word{i}" for i in range(600))
    _, (short_id, long_id) = add_document(conn, ["a short text", long_text])
    await drain(make_settings(), dsn, embedder, qdrant)
    points = await all_points(qdrant, collection)
    assert points[str(short_id)].payload["outboxd"]["truncated"] is False
    assert points[str(long_id)].payload["outboxd"]["truncated"] is True
    assert len(points[str(long_id)].payload["text"]) == 1000
    await assert_converged(dsn, qdrant, collection, embedder)


@pytest.mark.parametrize("text", ["x" * 300, "naïve café 東京 " * 10])
async def test_text_near_the_window_is_flagged_correctly(conn, dsn, qdrant, collection, embedder, reference, make_settings, text):
    _, (cid,) = add_document(conn, [text])
    await drain(make_settings(), dsn, embedder, qdrant)
    (point,) = await qdrant.retrieve(collection, [str(cid)], with_payload=True)
    tokens = len(reference.tokenizer(text)["input_ids"])
    assert point.payload["outboxd"]["truncated"] is (tokens > embedder.max_seq_length)
