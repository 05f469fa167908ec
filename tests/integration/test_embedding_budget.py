"""The embedding budget shared by every daemon of a database (daemon.outbox.shared_budget)
on a real PostgreSQL: the bucket's SQL does the arithmetic of
daemon.embedding.token_bucket.Bucket; a pause (one daemon's 429) holds back every
daemon's turns; and `outboxd run` processes on one database, against the
test endpoint in its rate-limited mode, send no request over the budget, keep
up with it, meet no 429 and converge with no dead letter."""
from __future__ import annotations

import asyncio
import signal

import numpy as np
import psycopg
import pytest
from psycopg.rows import dict_row

from daemon.core.qdrant_store import dense
from daemon.embedding.token_bucket import HORIZON, Bucket, Rates
from daemon.outbox.shared_budget import SharedBudget
from db.gateway import make_pool
from tests.embedding_server import EmbeddingServer
from tests.processes import daemon_env
from tests.support import add_document, all_points, open_qdrant, outbox_rows, require_server

ENDPOINT = "http://127.0.0.1:9/v1/embeddings test-model"


@pytest.fixture
async def budgets(dsn):
    """make(rates, endpoint=ENDPOINT) -> an open SharedBudget on a pool of its own, as a daemon has."""
    pools = []

    async def make(rates: Rates, endpoint: str = ENDPOINT) -> SharedBudget:
        pool = make_pool(dsn, application_name=f"outboxd:budget-{len(pools)}", min_size=1, max_size=4)
        await pool.open(wait=True)
        pools.append(pool)
        budget = SharedBudget(pool, endpoint, rates)
        await budget.open()
        return budget

    yield make
    for pool in pools:
        await pool.close()


def budget_row(conn: psycopg.Connection, endpoint: str = ENDPOINT) -> dict:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM outboxd.embedding_budget WHERE endpoint = %s", (endpoint,)).fetchone()


# --- the bucket in SQL ---------------------------------------------------------------------------
@pytest.mark.parametrize("rates", [
    Rates(requests_per_minute=600, tokens_per_minute=3000),  # 10 and 50 a second: tokens bind at 7 a request
    Rates(requests_per_minute=600, tokens_per_minute=30000),  # requests bind
    Rates(requests_per_minute=60_000),  # a capacity of ten requests
], ids=["tokens-bind", "requests-bind", "burst"])
async def test_the_sql_is_the_buckets_arithmetic(budgets, rates):
    """The same forty takes, one after the other, through the shared row and
    through Bucket.take at the server's time of each (what the statement
    returns as `now`): the same turns taken, the same waits. The first twenty are
    spaced out, so the refill by time elapsed counts."""
    shared = await budgets(rates)
    bucket = None
    for n in range(40):
        if n < 20:
            await asyncio.sleep(0.03)  # time passing between requests, not a synchronisation
        row = await shared.db.take_budget(shared.bucket, 7)
        now = row["now"].timestamp()
        bucket = bucket or Bucket.full(rates, now)
        assert_same_take(row, bucket.take(rates, 7, now), n)


def assert_same_take(row: dict, want, n: int) -> None:
    assert (row["taken"], row["wait_seconds"], row["paused"], row["turn"].timestamp()) == (
        want.taken, pytest.approx(want.wait, abs=1e-6), want.paused, pytest.approx(want.turn, abs=1e-6)), n


async def test_the_sql_pauses_and_gives_turns_back_as_the_bucket_does(budgets):
    """Takes that reserve turns ahead, a pause, takes during it, the reserved
    turns given back, takes after it: the shared row and Bucket at the server's
    time of each statement agree on every turn, wait and give-back."""
    rates = Rates(requests_per_minute=600, tokens_per_minute=30000)  # ten requests a second, capacity one
    shared = await budgets(rates)
    bucket = None
    reserved = []

    async def take(n: int) -> None:
        nonlocal bucket
        row = await shared.db.take_budget(shared.bucket, 7)
        now = row["now"].timestamp()
        bucket = bucket or Bucket.full(rates, now)
        want = bucket.take(rates, 7, now)
        assert_same_take(row, want, n)
        if want.taken and want.wait > 0:
            reserved.append((row["turn"], want.turn))

    for n in range(6):  # one now, five reserved ahead
        await take(n)
    paused_at = await shared.db.pause_budget(shared.bucket, 0.25)
    bucket.pause(rates, paused_at.timestamp(), 0.25)
    released = []
    for turn, want_turn in reserved:
        released.append(await shared.db.release_budget_turn(shared.bucket, 7, turn))
        assert released[-1] == bucket.release(rates, 7, want_turn)
    assert len(reserved) == 5 and released[0]  # the first turn, a tenth of a second ahead, is in the pause
    for n in range(6, 30):
        await asyncio.sleep(0.02)  # time passing between requests, not a synchronisation
        await take(n)


async def test_concurrent_takes_get_distinct_turns(budgets, conn):
    """Twenty requests of four daemons ask at once, 600 a minute: one goes now, the
    next ten reserve the turns a tenth of a second apart, within the horizon, the
    rest take nothing and ask again later."""
    shared = [await budgets(Rates(requests_per_minute=600)) for _ in range(4)]
    grants = await asyncio.gather(*(shared[i % 4].take(0) for i in range(20)))
    taken = sorted(g.wait for g in grants if g.taken)
    assert 11 <= len(taken) <= 12 and taken[0] == 0.0
    assert all(0.07 <= b - a <= 0.1 + 1e-9 for a, b in zip(taken, taken[1:])), taken
    assert all(g.wait >= 0.3 and not g.paused for g in grants if not g.taken)
    row = budget_row(conn)
    # the turns reserved ahead, less what the clock refilled while the statements ran
    assert row["granted"] == len(taken) and 1 - len(taken) <= row["requests"] < 2 - len(taken)


async def test_one_daemons_429_pauses_every_daemons_turns(budgets, conn):
    a, b = await budgets(Rates(requests_per_minute=6000)), await budgets(Rates(requests_per_minute=6000))
    assert (await b.take(0)).taken
    await a.pause(1.5)  # a was answered 429 with Retry-After 1.5
    await a.pause(0.2)  # a shorter one does not shorten it
    grant = await b.take(0)
    assert not grant.taken and grant.paused and grant.wait == pytest.approx(1.5 - HORIZON / 2, abs=0.1)
    row = budget_row(conn)
    assert row["rate_limited"] == 2 and row["updated_at"] == row["paused_until"]  # the bucket's time waits for its end


async def test_tokens_are_settled_and_a_lost_row_starts_full(budgets, conn):
    rates = Rates(tokens_per_minute=6000)  # 100 a second, capacity 10
    shared = await budgets(rates)
    assert (await shared.take(5))[:3] == (True, 0.0, False)
    await shared.settle(20)  # the endpoint counted 25 tokens, not 5
    grant = await shared.take(1)
    assert grant.taken and grant.wait == pytest.approx((1 + 15) / rates.tokens.per_second, abs=0.02)
    await shared.settle(-1000)  # a refund stops at the capacity
    assert budget_row(conn)["tokens"] == pytest.approx(10.0)
    conn.execute("DELETE FROM outboxd.embedding_budget")  # as a crash empties an unlogged table
    assert (await shared.take(3))[:3] == (True, 0.0, False)
    assert budget_row(conn)["tokens"] == pytest.approx(7.0, abs=0.1)


# --- daemons as processes --------------------------------------------------------------------
def most_in_a_window(times: list[float], window: float) -> int:
    times = sorted(times)
    most, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        most = max(most, i - j + 1)
    return most


def fleet_env(dsn, tmp_path, collection, server: EmbeddingServer, per_minute: float, batch_texts: int, **extra):
    return daemon_env(
        dsn, tmp_path / "qdrant", collection,
        OUTBOXD_EMBEDDING__BACKEND="http", OUTBOXD_EMBEDDING__URL=server.url,
        OUTBOXD_EMBEDDING__MAX_BATCH_TEXTS=batch_texts, OUTBOXD_EMBEDDING__REQUESTS_PER_MINUTE=per_minute,
        OUTBOXD_BATCH_SIZE=2 * batch_texts, OUTBOXD_CONCURRENCY=2,
        OUTBOXD_MAX_ATTEMPTS=1,  # any failure counted against an event would make a dead letter
        **extra,
    )


def start_fleet(spawn, env, n: int) -> list:
    procs = [spawn("run", env=env, name=f"daemon-{i}") for i in range(n)]
    for proc in procs:
        proc.wait_running()
    return procs


def stop_fleet(procs) -> list[dict]:
    for proc in procs:
        proc.popen.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(60) == 0, proc.describe()
    return [proc.log("outboxd stopped") for proc in procs]


async def assert_converged_to_the_endpoint(conn, tmp_path, collection, server: EmbeddingServer, texts, ids) -> None:
    """One point per chunk, each the endpoint's vector of its text; no dead letter, nothing pending."""
    assert outbox_rows(conn) == []
    client = open_qdrant(tmp_path / "qdrant")
    try:
        points = await all_points(client, collection)
    finally:
        await client.close()
    assert set(points) == {str(i) for i in ids}
    for text, chunk_id in zip(texts, ids):
        assert np.allclose(dense(points[str(chunk_id)].vector), server.vector_for(text), atol=1e-5)


@pytest.mark.slow
async def test_three_daemons_share_one_budget_below_the_endpoints_limit(spawn, conn, dsn, collection, tmp_path):
    """Three `outboxd run` processes on one database, each wanting 4 requests in
    flight, against an endpoint that answers at most 12 requests in any 2 seconds;
    their budget is 240 a minute (4 a second, 8 in 2 s plus one of capacity). The
    endpoint counts: no window holds more than the budget, the fleet sends at
    least 0.9 of it, it refuses nothing, and the backlog converges with no dead
    letter, every daemon having taken work."""
    require_server()
    per_second, window = 4.0, 2.0
    texts = [f"chunk {i} of the fleet's backlog" for i in range(288)]  # 72 requests of 4 texts: 18 s of budget
    with EmbeddingServer(rate_limit=12, rate_window=window, base_seconds=0.02) as server:
        env = fleet_env(dsn, tmp_path, collection, server, per_second * 60, batch_texts=4)
        procs = start_fleet(spawn, env, 3)
        server.reset_stats()  # the three probes at start went through the budget too
        _, ids = await asyncio.to_thread(add_document, conn, texts)
        procs[0].wait_for(lambda: not outbox_rows(conn), "the backlog to drain", 120, 0.2)
        stopped = stop_fleet(procs)
        stats = server.stats
    await assert_converged_to_the_endpoint(conn, tmp_path, collection, server, texts, ids)
    assert all(s["batches"] > 0 for s in stopped), "every daemon should have taken work"
    assert sum(s["events_acked"] for s in stopped) == len(texts)
    assert sum(s["dead_letters"] for s in stopped) == 0

    arrivals = sorted(t for t, _ in stats.answers)
    total = len(arrivals)
    assert total >= len(texts) / 4
    # over the budget: more in some window than its turns (per_second * w) plus one of capacity, plus one
    # request whose turn fell just before the window but whose send was delayed into it
    for w in (1.0, window, 5.0, 10.0):
        assert most_in_a_window(arrivals, w) <= per_second * w + 2, (w, most_in_a_window(arrivals, w))
    assert stats.refused <= 1 + 0.01 * total, f"{stats.refused} of {total} requests were refused"
    throughput = (total - 1) / (arrivals[-1] - arrivals[0])
    assert throughput >= 0.9 * per_second, f"{throughput:.2f} requests/s of a budget of {per_second}"
    assert budget_row(conn, f"{server.url}/v1/embeddings sentence-transformers/all-MiniLM-L6-v2")["granted"] >= total


@pytest.mark.slow
async def test_one_daemons_429_pauses_the_others(spawn, conn, dsn, collection, tmp_path):
    """Two `outboxd run` processes share a budget of 10 requests a second; the
    endpoint answers one request 429 with Retry-After 2 s. Whichever daemon got it,
    the endpoint then sees no request from either until the 2 s are over (but those
    already on their way), and the backlog still converges with no dead letter."""
    require_server()
    retry_after = 2.0
    texts = [f"chunk {i} waiting out a rate limit" for i in range(160)]  # 80 requests of 2: 8 s of budget
    with EmbeddingServer(base_seconds=0.02) as server:
        env = fleet_env(dsn, tmp_path, collection, server, 600, batch_texts=2)
        procs = start_fleet(spawn, env, 2)
        server.reset_stats()
        _, ids = await asyncio.to_thread(add_document, conn, texts)
        procs[0].wait_for(lambda: len(server.stats.answers) >= 15, "15 requests", 60, 0.05)
        server.fail_next(1, 429, retry_after=retry_after)
        procs[0].wait_for(lambda: not outbox_rows(conn), "the backlog to drain", 120, 0.2)
        stopped = stop_fleet(procs)
        answers = sorted(server.stats.answers)
    await assert_converged_to_the_endpoint(conn, tmp_path, collection, server, texts, ids)
    assert sum(s["dead_letters"] for s in stopped) == 0
    refused_at = next(t for t, status in answers if status == 429)
    on_their_way = 0.3  # a request past its last look at the pause when the 429 came
    during = [round(t - refused_at, 3) for t, _ in answers if refused_at + on_their_way <= t < refused_at + retry_after]
    assert during == [], f"requests sent during the pause (seconds after the 429): {during}"
    assert any(t >= refused_at + retry_after for t, _ in answers), "the daemons went on after the pause"
    assert budget_row(conn, f"{server.url}/v1/embeddings sentence-transformers/all-MiniLM-L6-v2")["rate_limited"] == 1
