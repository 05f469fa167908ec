"""outboxd against a 3-node Qdrant cluster of the real server (tests/qdrant_cluster.py):
the collection it creates has the configured shards, replicas and write
consistency; a node SIGKILLed under writes and restarted on its storage costs no
write, no dead letter and (with two replicas per shard) no read; the node the
daemon itself talks to going down makes it wait, not exit; `outboxd collection`
and `outboxd status` show each shard's replicas and name a shard short of its
replicas; and a raised replication factor gets its replicas from `outboxd
collection --apply`.

What the tests measure (reads failed while a node was down, seconds from the
restart to convergence) is printed (`pytest -s` shows it); docs/production.md
"Against a Qdrant cluster" reports it. The tests skip where no server binary is
at hand (a session in local mode)."""
from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
from collections import Counter

import httpx
import psycopg
import pytest

from daemon.core.cluster import placement
from daemon.errors import describe
from daemon.outbox.notify_daemon import NotifyDaemon
from tests.integration.test_exit_codes import outboxd, report
from tests.processes import VOCAB, base_env, health_port, insert_backlog, long_texts, outbox_counts, sample
from tests.qdrant_cluster import QdrantCluster
from tests.qdrant_server import find_binary
from tests.support import add_document, assert_converged, drain, outbox_rows, physical_collection, wait_until

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def qdrant_cluster():
    binary = find_binary()
    if binary is None:
        pytest.skip("needs a Qdrant server binary (OUTBOXD_TEST_QDRANT_BIN) to start a cluster")
    with QdrantCluster(binary) as cluster:
        yield cluster


@pytest.fixture
def cluster(qdrant_cluster) -> QdrantCluster:
    """The module's cluster with every node up (a node a failed test left down is restarted)."""
    qdrant_cluster.heal()
    return qdrant_cluster


def cluster_env(cluster: QdrantCluster, node: int, dsn: str, collection: str, **settings) -> dict[str, str]:
    """An outboxd process's environment: this database, node `node` of the cluster as its QDRANT_URL."""
    return base_env(DATABASE_URL=dsn, OUTBOXD_COLLECTION=collection, OUTBOXD_LEASE_SECONDS=3,
                    OUTBOXD_POLL_INTERVAL=0.5, OUTBOXD_STARTUP_TIMEOUT=20, **cluster.nodes[node].env(), **settings)


def cli_json(argv: list[str], env: dict[str, str], cwd, code: int = 0) -> dict:
    result = outboxd([*argv, "--json"], env, cwd)
    assert result.returncode == code, report(result)
    return json.loads(result.stdout)


def alive(*daemons) -> bool:
    """True; a daemon that exited fails the test with its output."""
    for daemon in daemons:
        if daemon.popen.poll() is not None:
            pytest.fail(f"outboxd exited while it should have waited\n{daemon.describe()}")
    return True


def dead_letters(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute("SELECT count(*) FROM outboxd.outbox WHERE status = 'dead'").fetchone()[0]


def acked_since(dsn: str, mark: int) -> int:
    """Events created after event id `mark` that were acknowledged (gone from the outbox)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute(
            "SELECT count(*) FROM generate_series(%s + 1, (SELECT pg_sequence_last_value("
            "pg_get_serial_sequence('outboxd.outbox', 'id')::regclass))) g "
            "WHERE NOT EXISTS (SELECT 1 FROM outboxd.outbox WHERE id = g)", (mark,)).fetchone()[0]


def last_event(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute("SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('outboxd.outbox', 'id')"
                         "::regclass), 0)").fetchone()[0]


class Writer(threading.Thread):
    """An application changing chunk texts in PostgreSQL, a dozen per transaction,
    whenever fewer than `backlog` events are pending: writes keep coming for as
    long as the test runs, at the pace the daemons confirm them."""

    def __init__(self, dsn: str, ids: list, backlog: int = 24) -> None:
        super().__init__(daemon=True)
        self.dsn, self.ids, self.backlog = dsn, ids, backlog
        self.done = threading.Event()
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(11)
        try:
            with psycopg.connect(self.dsn, autocommit=True) as c:
                while not self.done.is_set():
                    pending = c.execute("SELECT count(*) FROM outboxd.outbox").fetchone()[0]
                    if pending >= self.backlog:
                        self.done.wait(0.05)  # a paced poll of the backlog, not a wait on the daemons
                        continue
                    with c.transaction():
                        for cid in rng.sample(self.ids, 12):
                            text = f"edit {self.rounds}: " + " ".join(rng.choice(VOCAB) for _ in range(12))
                            c.execute("UPDATE chunks SET text = %s WHERE id = %s", (text, cid))
                    self.rounds += 1
        except BaseException as exc:  # noqa: BLE001 - reported by stop(): a dead writer would end the writes unseen
            self.error = exc

    def stop(self) -> None:
        self.done.set()
        self.join(30)
        assert self.error is None, f"the writer failed: {describe(self.error)}"


class Reader:
    """A reader searching through the alias on one node, counting what answered and what failed."""

    def __init__(self, client, alias: str, dimension: int) -> None:
        self.client, self.alias = client, alias
        self.vector = [random.Random(3).uniform(-1, 1) for _ in range(dimension)]
        self.ok = self.failed = 0
        self.errors: Counter[str] = Counter()

    async def read(self) -> bool:
        try:
            await self.client.query_points(self.alias, query=self.vector, limit=5)
        except Exception as exc:  # noqa: BLE001 - every failed read is counted, whatever failed
            self.failed += 1
            self.errors[describe(exc)[:200]] += 1
            return False
        self.ok += 1
        return True

    async def run(self, done: asyncio.Event) -> None:
        while not done.is_set():
            await self.read()
            await asyncio.sleep(0.02)  # a paced reader, so that it does not take a core from the daemons

    @property
    def attempts(self) -> int:
        return self.ok + self.failed


async def placed(client, collection: str):
    """The collection's shards, against its replication factor as the node reports it."""
    factor = (await client.get_collection(collection)).config.params.replication_factor
    return await placement(client, collection, factor)


async def degraded(client, collection: str, peer: int) -> list:
    """The shards whose replica on `peer` Qdrant no longer counts as active."""
    shards = await placed(client, collection)
    return [s for s in shards.shards if peer in s.replicas and s.replicas[peer] != "Active"]


async def all_active(client, collection: str, replicas: int) -> bool:
    shards = await placed(client, collection)
    return all(s.active == len(s.replicas) == replicas for s in shards.shards)


# --- the collection outboxd creates -----------------------------------------------------
async def test_the_collection_has_the_configured_shards_replicas_and_write_consistency(
        cluster, conn, dsn, collection, embedder, make_settings, tmp_path):
    """[qdrant] shard_number 6, replication_factor 2, write_consistency_factor 2: the
    collection a daemon creates on the cluster has them, every shard's two replicas are
    active on two different nodes and every node holds some; `outboxd collection --json`
    and `outboxd status --json` list each shard's replicas and their state."""
    add_document(conn, [f"a chunk about {word}" for word in VOCAB[:12]])
    node = cluster.nodes[0]
    shape = {"shard_number": 6, "replication_factor": 2, "write_consistency_factor": 2}
    client = node.client()
    try:
        await drain(make_settings(qdrant={"url": node.url, "grpc_port": node.grpc_port, **shape}), dsn, embedder,
                    client)
        physical = await physical_collection(client, collection)
        params = (await client.get_collection(physical)).config.params
        assert (params.shard_number, params.replication_factor, params.write_consistency_factor) == (6, 2, 2)
        shards = await placed(client, physical)
        assert shards.peers == sorted(cluster.peer_ids)
        assert [s.shard_id for s in shards.shards] == list(range(6))
        assert all(list(s.replicas.values()) == ["Active", "Active"] for s in shards.shards), shards
        assert set(Counter(peer for s in shards.shards for peer in s.replicas)) == set(cluster.peer_ids)
        assert shards.problems() == []
    finally:
        await client.close()
    other = cluster.nodes[2].client()  # any node answers for the whole collection
    try:
        assert await assert_converged(dsn, other, collection, embedder) == 12
    finally:
        await other.close()

    env = cluster_env(cluster, 1, dsn, collection, **{f"OUTBOXD_QDRANT__{k.upper()}": v for k, v in shape.items()})
    shown = await asyncio.to_thread(cli_json, ["collection", "--check"], env, tmp_path)
    assert shown["differences"] == [] and shown["shard_problems"] == [], shown
    assert [(s["shard"], s["active"], sorted(s["replicas"].values())) for s in shown["shards"]] == [
        (i, 2, ["Active", "Active"]) for i in range(6)]
    status = (await asyncio.to_thread(cli_json, ["status"], env, tmp_path))["qdrant"]
    assert (status["peers"], status["replication_factor"], status["shard_problems"]) == (3, 2, []), status
    assert status["shards"] == shown["shards"]
    text = await asyncio.to_thread(outboxd, ["status"], env, tmp_path)
    assert text.returncode == 0 and "Shards of" in text.stdout, report(text)


async def test_a_write_short_of_its_write_consistency_is_retried_not_acknowledged(
        cluster, conn, dsn, collection, embedder, make_settings):
    """write_consistency_factor 2 with two replicas per shard: while a node is down Qdrant
    cannot confirm a write to a shard with a replica there, so the daemon acknowledges
    nothing; it retries (an outage: no attempt counted, no dead letter) until the node
    is back, then the backlog converges."""
    node = cluster.nodes[0]
    client = node.client()
    settings = make_settings(max_attempts=2, qdrant={"url": node.url, "grpc_port": node.grpc_port, "shard_number": 3,
                                                     "replication_factor": 2, "write_consistency_factor": 2})
    daemon = NotifyDaemon(settings, dsn, embedder=embedder, qdrant=client)
    await daemon.start()
    run = asyncio.create_task(daemon.run())
    try:
        add_document(conn, [f"written while every node is up {i}" for i in range(6)])
        await wait_until(lambda: not outbox_rows(conn), "the first writes to be confirmed")
        await asyncio.to_thread(cluster.kill, 2)
        retries = daemon.stats.transient_retries
        add_document(conn, [f"written while a node is down {i}" for i in range(30)])
        await wait_until(lambda: daemon.stats.transient_retries >= retries + 3,
                         "three writes to fail short of their write consistency")
        rows = outbox_rows(conn)
        assert len(rows) == 30
        assert {r["status"] for r in rows} == {"pending"} and {r["attempts"] for r in rows} == {0}
        await asyncio.to_thread(cluster.restart, 2)
        await wait_until(lambda: not outbox_rows(conn), "the backlog to drain once the node is back")
    finally:
        daemon.stop.set()
        assert await run == 0
        await daemon.close()
    assert daemon.stats.dead_letters == 0 and daemon.stats.events_failed == 0
    try:
        assert await assert_converged(dsn, client, collection, embedder) == 36
    finally:
        await client.close()


# --- a node lost under writes -----------------------------------------------------------
@pytest.mark.slow


# --- a node lost under writes -----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.model
async def test_a_node_killed_under_writes_costs_no_write_no_dead_letter_and_no_read(
        cluster, spawn, conn, dsn, collection, embedder, tmp_path):
    """Two `outboxd run` daemons on one database, talking to node 0; a writer keeps
    changing chunks; node 2 is SIGKILLed, then started again on its storage. No daemon
    exits, no event becomes a dead letter, writes keep being confirmed while the node
    is down, reads through the alias on node 1 all answer (two replicas per shard), the
    operator commands name the shards short of a replica, and once the writes stop and
    the backlog drains the collection has converged."""
    _, ids = add_document(conn, [f"chunk {i}: " + " ".join(random.Random(i).choices(VOCAB, k=12)) for i in range(96)])
    env = cluster_env(cluster, 0, dsn, collection, OUTBOXD_QDRANT__SHARD_NUMBER=3,
                      OUTBOXD_QDRANT__REPLICATION_FACTOR=2, OUTBOXD_BATCH_SIZE=8, OUTBOXD_CONCURRENCY=1,
                      OUTBOXD_RETRY_BACKOFF_MAX=1)
    daemons = [spawn("run", env=env, name=f"daemon-{name}") for name in ("a", "b")]
    for daemon in daemons:
        daemon.wait_running()
    await wait_until(lambda: alive(*daemons) and not outbox_rows(conn), "the first backlog to drain", 180, 0.2)

    writer = Writer(dsn, ids)
    writer.start()
    observer, reading = cluster.nodes[0].client(), cluster.nodes[1].client()
    done = asyncio.Event()
    reader = Reader(reading, collection, embedder.fingerprint.dimension)
    try:
        physical = await physical_collection(observer, collection)
        await wait_until(lambda: alive(*daemons) and writer.rounds >= 2, "the writes to start", 60, 0.1)

        mark = last_event(dsn)
        cluster.kill(2)
        reads = asyncio.create_task(reader.run(done))
        lost = cluster.peer_ids[2]

        async def while_down() -> bool:
            return (alive(*daemons) and reader.attempts >= 50 and acked_since(dsn, mark) >= 24
                    and bool(await degraded(observer, physical, lost)))

        await wait_until(while_down, "writes confirmed, reads answered and the lost replicas marked while the "
                         "node is down", 180, 0.2)
        shown = await asyncio.to_thread(cli_json, ["collection"], env, tmp_path)
        status = (await asyncio.to_thread(cli_json, ["status"], env, tmp_path))["qdrant"]
        done.set()
        await reads
        down = (reader.ok, reader.failed)
        print(f"\nnode down, replication factor 2: {reader.ok} reads answered, {reader.failed} failed "
              f"{dict(reader.errors)}; {acked_since(dsn, mark)} events confirmed")
        assert reader.failed == 0, reader.errors

        # both commands list each shard's replicas and name those short of one, on the lost peer
        assert {p for s in shown["shards"] for p, state in s["replicas"].items() if state != "Active"} == {str(lost)}
        assert shown["shard_problems"] and all(f"peer {lost}: Dead" in p for p in shown["shard_problems"]), shown
        assert all("of 2 configured" in p for p in shown["shard_problems"])
        assert status["shard_problems"], status

        restarted = time.monotonic()
        cluster.restart(2)
        await wait_until(lambda: alive(*daemons) and all_active(observer, physical, 2),
                         "every replica active again after the restart", 180, 0.2)
        active_after = time.monotonic() - restarted
        writer.stop()
        await wait_until(lambda: alive(*daemons) and not outbox_rows(conn), "the backlog to drain", 180, 0.2)
        drained_after = time.monotonic() - restarted
        print(f"after the restart: replicas active in {active_after:.1f} s, backlog drained in {drained_after:.1f} s "
              f"({writer.rounds} write rounds in all; reads while down: {down})")
    finally:
        done.set()
        if writer.is_alive():
            writer.done.set()
        await observer.close()
        await reading.close()

    assert dead_letters(dsn) == 0
    for daemon in daemons:
        daemon.popen.send_signal(signal.SIGTERM)
    for daemon in daemons:
        assert daemon.wait(60) == 0, daemon.describe()
    stopped = [daemon.log("outboxd stopped") for daemon in daemons]
    assert sum(s["dead_letters"] for s in stopped) == 0 and sum(s["events_failed"] for s in stopped) == 0, stopped
    print(f"transient retries: {[s['transient_retries'] for s in stopped]}, "
          f"events acknowledged: {[s['events_acked'] for s in stopped]}")
    back = cluster.nodes[2].client()  # the restarted node answers with the whole collection
    try:
        await assert_converged(dsn, back, collection, embedder)
    finally:
        await back.close()


@pytest.mark.slow
@pytest.mark.model
async def test_the_node_the_daemon_talks_to_killed_and_restarted(cluster, spawn, conn, dsn, collection, embedder,
                                                                 tmp_path):
    """outboxd takes one QDRANT_URL. When that node is SIGKILLed under a backlog the daemon
    waits (readiness down, retries counted against qdrant, no dead letter, no exit); once
    the node is back on its storage it drains the backlog and the collection has converged."""
    texts = long_texts(96, words=30, seed=7)
    insert_backlog(conn, texts, per_document=48)
    env = cluster_env(cluster, 0, dsn, collection, OUTBOXD_QDRANT__SHARD_NUMBER=3,
                      OUTBOXD_QDRANT__REPLICATION_FACTOR=2, OUTBOXD_BATCH_SIZE=8, OUTBOXD_HEALTH__PORT=0,
                      OUTBOXD_HEALTH__HOST="127.0.0.1", OUTBOXD_RETRY_BACKOFF_MAX=1)
    daemon = spawn("run", env=env, name="through-its-node")
    port = health_port(daemon)
    daemon.wait_running()

    def acked_and_claimed():
        remaining, claimed = outbox_counts(dsn)
        return 0 < remaining < len(texts) and claimed > 0

    daemon.wait_for(acked_and_claimed, "a first acknowledged batch with another in flight", 120, 0.02)
    cluster.kill(0)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        def qdrant_down():
            ready, metrics = http.get("/readyz"), http.get("/metrics").text
            retries = sample(metrics, "outboxd_retries_total", dependency="qdrant", stage="batch") or 0
            return ready if ready.status_code == 503 and retries > 0 else None

        ready = daemon.wait_for(qdrant_down, "readiness down and retries counted against qdrant", 60, 0.2)
        assert ready.json()["checks"]["qdrant"]["status"] == "fail"
        assert outbox_counts(dsn)[0] > 0, "the backlog drained without the daemon's node"

        restarted = time.monotonic()
        cluster.restart(0)
        daemon.wait_for(lambda: outbox_counts(dsn)[0] == 0, "the backlog to drain after the restart", 180, 0.2)
        print(f"\nthe daemon's node back: backlog drained {time.monotonic() - restarted:.1f} s after the restart")
        daemon.wait_for(lambda: http.get("/readyz").status_code == 200, "readiness back", 60, 0.2)

    daemon.popen.send_signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.describe()
    stopped = daemon.log("outboxd stopped")
    assert stopped["events_acked"] == len(texts), stopped
    assert stopped["dead_letters"] == 0 and stopped["events_failed"] == 0 and stopped["transient_retries"] > 0
    client = cluster.nodes[1].client()
    try:
        assert await assert_converged(dsn, client, collection, embedder) == len(texts)
    finally:
        await client.close()


# --- the replication factor raised on an existing collection ------------------------------
@pytest.mark.slow
async def test_a_raised_replication_factor_gets_its_replicas_from_collection_apply(
        cluster, conn, dsn, collection, embedder, make_settings, tmp_path):
    """A collection made with one replica per shard loses every read while a node is down
    (each search touches every shard, and the lost node held the only copy of one).
    OUTBOXD_QDRANT__REPLICATION_FACTOR raised to 2: `outboxd collection --apply` adds a
    second replica to each shard, and the same loss then costs no read."""
    add_document(conn, [f"a chunk about {word}" for word in VOCAB[:12]])
    node = cluster.nodes[0]
    client = node.client()
    try:
        settings = make_settings(qdrant={"url": node.url, "grpc_port": node.grpc_port, "shard_number": 3,
                                         "replication_factor": 1})
        await drain(settings, dsn, embedder, client)
        physical = await physical_collection(client, collection)
        shards = await placed(client, physical)
        assert all(len(s.replicas) == 1 for s in shards.shards)
        assert {peer for s in shards.shards for peer in s.replicas} == set(cluster.peer_ids)  # one on each node

        env = cluster_env(cluster, 0, dsn, collection, OUTBOXD_QDRANT__SHARD_NUMBER=3)

        async def reads_while_node_2_is_down(n: int = 10) -> tuple[Reader, dict]:
            reader = Reader(client, collection, embedder.fingerprint.dimension)
            await asyncio.to_thread(cluster.kill, 2)
            for _ in range(n):
                await reader.read()
            # what the daemon's readiness check asks the node keeps answering, whatever the shards' state
            assert physical in {c.name for c in (await client.get_collections()).collections}
            status = (await asyncio.to_thread(cli_json, ["status"], env, tmp_path))["qdrant"]
            await asyncio.to_thread(cluster.restart, 2)
            return reader, status

        one, status = await reads_while_node_2_is_down()
        print(f"\nnode down, replication factor 1: {one.ok} reads answered, {one.failed} failed")
        assert (one.ok, one.failed) == (0, 10), one.errors
        # nothing that reads the collection's points answers: status says so, and why
        assert status["available"] is False and "500" in status["reason"], status
        await wait_until(lambda: Reader(client, collection, embedder.fingerprint.dimension).read(),
                         "reads answering again after the restart", 60, 0.1)

        env["OUTBOXD_QDRANT__REPLICATION_FACTOR"] = "2"
        dry = await asyncio.to_thread(outboxd, ["collection", "--check"], env, tmp_path)
        assert dry.returncode == 3 and "replication_factor: configured 2, the collection has 1" in dry.stdout, (
            report(dry))
        applied = await asyncio.to_thread(cli_json, ["collection", "--apply"], env, tmp_path)
        assert "replication_factor" in applied["applied"], applied
        assert sum("a replica from peer" in line for line in applied["applied"]) == 3, applied
        await wait_until(lambda: all_active(client, physical, 2), "two active replicas of every shard", 120, 0.2)
        checked = await asyncio.to_thread(outboxd, ["collection", "--check"], env, tmp_path)
        assert checked.returncode == 0, report(checked)

        two, status = await reads_while_node_2_is_down()
        print(f"node down, replication factor 2: {two.ok} reads answered, {two.failed} failed")
        assert (two.ok, two.failed) == (10, 0), two.errors
        assert status["available"] is True and status["points"] == 12, status
        assert await assert_converged(dsn, client, collection, embedder) == 12
    finally:
        await client.close()
