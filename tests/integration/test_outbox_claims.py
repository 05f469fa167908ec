"""The claim protocol on real PostgreSQL: two Outbox instances with different
worker names stand for two daemons sharing one outbox (invariants 3, 4 and 6)."""
from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import psycopg
import pytest
from psycopg.rows import dict_row

from daemon.config import Settings
from daemon.outbox.queue import PendingSummary
from daemon.runtime.backoff import EVENTS, Backoff
from db.queries import query
from tests.support import add_document, db_clock_passed, outbox_rows, wait_until

BACKOFF = dict(backoff=replace(EVENTS, base=10.0, cap=60.0))  # a failed event stays unclaimable for >= 5 s


def events_backoff(base: float, cap: float) -> Backoff:
    """The failed events' policy with these settings (retry_backoff_base, retry_backoff_max)."""
    return replace(EVENTS, base=base, cap=cap)


def event_ids(conn) -> list[int]:
    return [r["id"] for r in outbox_rows(conn)]


async def until_lease_ran_out(conn, event_id: int) -> None:
    """Until PostgreSQL's clock is past the event's lease (claim compares it with now())."""
    await wait_until(lambda: db_clock_passed(conn, "SELECT locked_until FROM outboxd.outbox WHERE id = %s", (event_id,)),
                     f"the lease of event {event_id} to run out")


async def until_available(conn, event_id: int) -> None:
    """Until PostgreSQL's clock is past the event's available_at (its retry backoff)."""
    await wait_until(lambda: db_clock_passed(conn, "SELECT available_at FROM outboxd.outbox WHERE id = %s", (event_id,)),
                     f"event {event_id} to be available again")


def row(conn, event_id: int) -> dict:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT *, now() AS db_now FROM outboxd.outbox WHERE id = %s", (event_id,)
        ).fetchone()


# --- claiming -------------------------------------------------------------------------
async def test_claim_returns_oldest_first_and_respects_batch_size(conn, make_outbox):
    """claim takes at most batch_size events, oldest first, and leases them to the worker."""
    _, chunk_ids = add_document(conn, [f"text {i}" for i in range(5)])
    ids = event_ids(conn)
    a = await make_outbox("worker-a")

    first = await a.claim(3)
    assert [e.id for e in first] == ids[:3]
    assert [e.chunk_id for e in first] == chunk_ids[:3]
    assert all(e.op == "insert" and e.attempts == 0 for e in first)
    assert {row(conn, i)["locked_by"] for i in ids[:3]} == {"worker-a"}
    assert {row(conn, i)["locked_by"] for i in ids[3:]} == {None}

    second = await a.claim(3)
    assert [e.id for e in second] == ids[3:]
    assert await a.claim(3) == []


async def test_concurrent_workers_claim_disjoint_events_and_all_of_them(conn, make_outbox):
    """Two workers claiming at the same time never get the same event, and together get every one."""
    add_document(conn, [f"text {i}" for i in range(60)])
    all_ids = set(event_ids(conn))
    a, b = await make_outbox("worker-a"), await make_outbox("worker-b")

    got: dict[str, list[int]] = {"worker-a": [], "worker-b": []}
    while True:
        batches = await asyncio.gather(a.claim(7), b.claim(7), a.claim(7), b.claim(7))
        if not any(batches):
            break
        for worker, batch in zip(["worker-a", "worker-b"] * 2, batches):
            assert len(batch) <= 7
            got[worker] += [e.id for e in batch]

    claimed_a, claimed_b = got["worker-a"], got["worker-b"]
    assert len(claimed_a) == len(set(claimed_a)) and len(claimed_b) == len(set(claimed_b))
    assert not set(claimed_a) & set(claimed_b)
    assert set(claimed_a) | set(claimed_b) == all_ids
    holders = {r["id"]: r["locked_by"] for r in outbox_rows(conn)}
    assert all(holders[i] == "worker-a" for i in claimed_a)
    assert all(holders[i] == "worker-b" for i in claimed_b)


async def test_claim_skips_rows_locked_by_another_transaction(dsn, conn, make_outbox):
    """FOR UPDATE SKIP LOCKED: a row locked elsewhere is skipped, not waited for."""
    add_document(conn, ["one", "two", "three"])
    ids = event_ids(conn)
    a = await make_outbox("worker-a")
    with psycopg.connect(dsn) as locker:  # holds a row lock in an open transaction
        locker.execute("SELECT id FROM outboxd.outbox WHERE id = %s FOR UPDATE", (ids[0],))
        claimed = await asyncio.wait_for(a.claim(10), timeout=5)
        locker.rollback()
    assert [e.id for e in claimed] == ids[1:]
    assert [e.id for e in await a.claim(10)] == ids[:1]


# --- leases ----------------------------------------------------------------------------
async def test_lease_blocks_others_until_it_expires(conn, make_outbox):
    """A claimed event is not claimable by another worker until its lease runs out, then it is."""
    add_document(conn, ["one", "two"])
    ids = event_ids(conn)
    a = await make_outbox("worker-a", lease_seconds=3)  # long enough that b's first claim comes within it
    b = await make_outbox("worker-b", lease_seconds=30)

    assert [e.id for e in await a.claim(10)] == ids
    assert await b.claim(10) == []
    for event_id in ids:
        await until_lease_ran_out(conn, event_id)
    assert [e.id for e in await b.claim(10)] == ids
    assert {r["locked_by"] for r in outbox_rows(conn)} == {"worker-b"}
    assert await a.claim(10) == []  # and now worker-b's lease protects them


async def test_renew_extends_the_lease(conn, make_outbox):
    """renew keeps a slow batch: the event stays unclaimable past its original lease time."""
    add_document(conn, ["one"])
    [event_id] = event_ids(conn)
    a = await make_outbox("worker-a", lease_seconds=1)
    renewing = await make_outbox("worker-a", lease_seconds=60)  # the same worker, renewing for longer
    b = await make_outbox("worker-b", lease_seconds=1)

    await a.claim(10)
    original = row(conn, event_id)["locked_until"]
    await renewing.renew([event_id])
    renewed = row(conn, event_id)["locked_until"]
    assert renewed > original + timedelta(seconds=30)

    await b.renew([event_id])  # a worker that does not hold the claim renews nothing
    assert row(conn, event_id)["locked_until"] == renewed
    assert row(conn, event_id)["locked_by"] == "worker-a"

    await wait_until(lambda: db_clock_passed(conn, "SELECT %s::timestamptz", (original,)),
                     "the original lease to run out")
    assert await b.claim(10) == []  # past the original lease, within the renewed one


async def test_release_makes_events_claimable_at_once(conn, make_outbox):
    """release hands claims back immediately, without counting an attempt."""
    add_document(conn, ["one", "two"])
    ids = event_ids(conn)
    a, b = await make_outbox("worker-a"), await make_outbox("worker-b")

    await a.claim(10)
    assert await b.claim(10) == []
    await a.release(ids)
    assert all(r["locked_by"] is None and r["locked_until"] is None for r in outbox_rows(conn))
    claimed = await b.claim(10)
    assert [e.id for e in claimed] == ids
    assert all(e.attempts == 0 for e in claimed)


async def test_release_by_another_worker_does_nothing(conn, make_outbox):
    """A worker cannot release claims it does not hold."""
    add_document(conn, ["one", "two"])
    ids = event_ids(conn)
    a, b = await make_outbox("worker-a"), await make_outbox("worker-b")

    await a.claim(10)
    await b.release(ids)
    assert {r["locked_by"] for r in outbox_rows(conn)} == {"worker-a"}
    assert await b.claim(10) == []


# --- acknowledgement ----------------------------------------------------------------------
async def test_ack_with_current_state_deletes_claimed_and_other_events_of_the_chunk(conn, make_outbox):
    """ack_verified with the current state_hash removes every event of that chunk, and only those."""
    _, (c1, c2) = add_document(conn, ["first", "second"])
    conn.execute("UPDATE chunks SET text = 'first, edited' WHERE id = %s", (c1,))
    # outbox: insert c1, insert c2, update c1
    a = await make_outbox("worker-a")

    [event] = await a.claim(1)
    assert event.chunk_id == c1
    states = await a.chunk_states([c1])
    assert states[c1].text == "first, edited"

    assert await a.ack_verified([event.id], {c1: states[c1].state_hash}) == (2, 0)
    remaining = outbox_rows(conn)
    assert [(r["chunk_id"], r["op"]) for r in remaining] == [(c2, "insert")]
    assert remaining[0]["locked_by"] is None


async def test_ack_with_stale_state_acknowledges_nothing_and_releases(conn, make_outbox):
    """A chunk that changed after its state was read is not acknowledged; its claims go back."""
    _, (c1, c2) = add_document(conn, ["first", "second"])
    a, b = await make_outbox("worker-a"), await make_outbox("worker-b")

    claimed = await a.claim(10)
    states = await a.chunk_states([c1, c2])
    conn.execute("UPDATE chunks SET text = 'changed meanwhile' WHERE id = %s", (c1,))

    acked, released = await a.ack_verified(
        [e.id for e in claimed], {c: states[c].state_hash for c in (c1, c2)}
    )
    assert (acked, released) == (1, 1)  # c2 verified, c1 stale
    rows = outbox_rows(conn)
    assert {r["chunk_id"] for r in rows} == {c1}
    assert all(r["locked_by"] is None for r in rows)
    # both the released insert and the new update of c1 are claimable at once
    assert [e.op for e in await b.claim(10)] == ["insert", "update"]


async def test_ack_of_only_stale_chunks_returns_zero_acked(conn, make_outbox):
    """With only stale state hashes, ack_verified returns (0, n) and deletes nothing."""
    _, (c1,) = add_document(conn, ["first"])
    conn.execute("UPDATE chunks SET text = 'second version' WHERE id = %s", (c1,))
    a = await make_outbox("worker-a")

    claimed = await a.claim(10)
    old_hash = (await a.chunk_states([c1]))[c1].state_hash
    conn.execute("UPDATE chunks SET metadata = '{\"k\": 1}' WHERE id = %s", (c1,))

    assert await a.ack_verified([e.id for e in claimed], {c1: old_hash}) == (0, 2)
    assert len(outbox_rows(conn)) == 3
    assert all(r["locked_by"] is None for r in outbox_rows(conn))


async def test_ack_of_deleted_chunk_with_none_hash(conn, make_outbox):
    """A deleted chunk (no state) is acknowledged with state_hash None, all its events gone."""
    _, (c1, c2) = add_document(conn, ["gone soon", "stays"])
    conn.execute("DELETE FROM chunks WHERE id = %s", (c1,))
    a = await make_outbox("worker-a")

    [event] = await a.claim(1)
    assert event.chunk_id == c1
    assert await a.chunk_states([c1]) == {}
    assert await a.ack_verified([event.id], {c1: None}) == (2, 0)
    assert [r["chunk_id"] for r in outbox_rows(conn)] == [c2]


async def test_ack_with_none_hash_for_a_live_chunk_acknowledges_nothing(conn, make_outbox):
    """state_hash None means 'deleted'; it does not acknowledge a chunk that still exists."""
    _, (c1,) = add_document(conn, ["still here"])
    a = await make_outbox("worker-a")

    claimed = await a.claim(10)
    assert await a.ack_verified([e.id for e in claimed], {c1: None}) == (0, 1)
    assert len(outbox_rows(conn)) == 1


# --- failures and dead letters ----------------------------------------------------------------
async def test_fail_counts_the_attempt_and_backs_off(conn, make_outbox):
    """fail records the error, the attempt and its time, and keeps the event away for the backoff."""
    add_document(conn, ["poison", "fine"])
    poison, fine = event_ids(conn)
    a, b = await make_outbox("worker-a"), await make_outbox("worker-b")

    await a.claim(1)
    result = await a.fail([poison], "ValueError: bad", max_attempts=3, **BACKOFF)
    assert [(r["id"], r["status"], r["attempts"]) for r in result] == [(poison, "pending", 1)]

    r = row(conn, poison)
    assert (r["status"], r["attempts"], r["last_error"]) == ("pending", 1, "ValueError: bad")
    assert r["first_failed_at"] is not None and r["first_failed_at"] == r["last_failed_at"]
    assert r["locked_by"] is None and r["locked_until"] is None
    delay = (r["available_at"] - r["db_now"]).total_seconds()
    assert 4.0 < delay <= 10.0  # base * 2**0 * (0.5 .. 1)

    # not claimable now, and it does not block the event behind it
    assert [e.id for e in await b.claim(10)] == [fine]

    summary = await a.pending()
    assert summary.pending == 2  # the failed one and worker-b's leased one
    assert 4.0 < summary.wait_seconds <= 10.0  # the backoff ends before worker-b's 30 s lease


async def test_fail_backoff_grows_with_attempts_and_is_capped(conn, make_outbox):
    """The retry delay is base * 2**attempts (with jitter), never more than backoff_max."""
    add_document(conn, ["one", "two"])
    first, second = event_ids(conn)
    conn.execute("UPDATE outboxd.outbox SET attempts = 3")
    a = await make_outbox("worker-a")

    await a.claim(10)
    await a.fail([first], "boom", max_attempts=10, backoff=events_backoff(1.0, 1000.0))
    await a.fail([second], "boom", max_attempts=10, backoff=events_backoff(100.0, 2.0))

    r1, r2 = row(conn, first), row(conn, second)
    assert r1["attempts"] == 4
    assert 3.9 < (r1["available_at"] - r1["db_now"]).total_seconds() <= 8.0  # 1 * 2**3 * (0.5 .. 1)
    assert 0.9 < (r2["available_at"] - r2["db_now"]).total_seconds() <= 2.0  # capped at 2


async def test_fail_draws_the_delay_from_the_python_policys_window(conn, make_outbox):
    """fail_events computes daemon.runtime.backoff's curve with the policy's own
    parameters: base, factor, cap and jitter. Without jitter the delay is exactly
    the window's ceiling (available_at and last_failed_at share one now())."""
    add_document(conn, ["one", "two", "three"])
    ids = event_ids(conn)
    conn.execute("UPDATE outboxd.outbox SET attempts = 2")
    a = await make_outbox("worker-a")
    policies = [
        Backoff(base=1.5, factor=3.0, cap=1000.0, jitter=0.0),  # 1.5 * 3**2: 13.5 s exactly
        Backoff(base=1.5, factor=3.0, cap=5.0, jitter=0.0),  # capped: 5 s exactly
        events_backoff(2.0, 1000.0),  # half jitter: 4 .. 8 s
    ]
    await a.claim(10)
    for event_id, backoff in zip(ids, policies):
        await a.fail([event_id], "boom", max_attempts=10, backoff=backoff)
    for event_id, backoff in zip(ids, policies):
        r = row(conn, event_id)
        low, high = backoff.window(2)
        delay = (r["available_at"] - r["last_failed_at"]).total_seconds()
        assert low - 1e-6 <= delay <= high + 1e-6, (backoff, delay)


async def test_fail_by_another_worker_does_nothing(conn, make_outbox):
    """Only the worker holding a claim can count a failure against it."""
    add_document(conn, ["one"])
    [event_id] = event_ids(conn)
    a, b = await make_outbox("worker-a"), await make_outbox("worker-b")

    await a.claim(10)
    assert await b.fail([event_id], "not mine", max_attempts=1, **BACKOFF) == []
    r = row(conn, event_id)
    assert (r["status"], r["attempts"], r["last_error"], r["locked_by"]) == ("pending", 0, None, "worker-a")


async def test_event_becomes_dead_at_max_attempts_and_is_never_claimed(conn, make_outbox):
    """After max_attempts failures an event is a dead letter: kept, never claimed, not pending."""
    add_document(conn, ["poison"])
    [event_id] = event_ids(conn)
    a = await make_outbox("worker-a")

    await a.claim(10)
    [r] = await a.fail([event_id], "first", max_attempts=2, backoff=events_backoff(0.01, 0.01))
    assert (r["status"], r["attempts"]) == ("pending", 1)
    first_failed = row(conn, event_id)["first_failed_at"]

    await until_available(conn, event_id)
    assert [e.id for e in await a.claim(10)] == [event_id]
    [r] = await a.fail([event_id], "second", max_attempts=2, backoff=events_backoff(0.01, 0.01))
    assert (r["status"], r["attempts"]) == ("dead", 2)

    dead = row(conn, event_id)
    assert dead["last_error"] == "second"
    assert dead["first_failed_at"] == first_failed
    assert dead["last_failed_at"] > first_failed

    await until_available(conn, event_id)  # dead, not merely backing off
    assert await a.claim(10) == []
    summary = await a.pending()
    assert (summary.pending, summary.wait_seconds) == (0, None)


async def test_pending_counts_pending_events_and_says_when_the_next_is_claimable(conn, make_outbox):
    """pending() counts pending (not dead) events; wait_seconds is the time until the next can be claimed."""
    a = await make_outbox("worker-a", lease_seconds=20)
    assert await a.pending() == PendingSummary(0, None)

    add_document(conn, ["one", "two", "three"])
    e1, e2, e3 = event_ids(conn)
    summary = await a.pending()
    assert (summary.pending, summary.wait_seconds) == (3, 0.0)

    await a.claim(10)  # all leased for 20 s
    summary = await a.pending()
    assert summary.pending == 3
    assert 18.0 < summary.wait_seconds <= 20.0

    await a.fail([e1], "dead now", max_attempts=1, **BACKOFF)
    await a.fail([e2], "retry later", max_attempts=5, **BACKOFF)  # back in 5..10 s
    summary = await a.pending()
    assert summary.pending == 2
    assert 4.0 < summary.wait_seconds <= 10.0

    await a.release([e3])
    summary = await a.pending()
    assert (summary.pending, summary.wait_seconds) == (2, 0.0)


async def test_dead_letters_list_and_retry(dsn, conn, make_outbox):
    """Operators list dead letters with their error, and retry one by id or all of them."""
    add_document(conn, ["one", "two", "three"])
    e1, e2, e3 = event_ids(conn)
    a = await make_outbox("worker-a")
    await a.claim(2)
    await a.fail([e1], "ValueError: one", max_attempts=1, **BACKOFF)
    await a.fail([e2], "ValueError: two", max_attempts=1, **BACKOFF)

    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
        listed = c.execute(query("dead_letters")).fetchall()
        assert [(r["id"], r["attempts"], r["last_error"]) for r in listed] == [
            (e1, 1, "ValueError: one"),
            (e2, 1, "ValueError: two"),
        ]
        assert all(r["first_failed_at"] and r["last_failed_at"] and r["op"] == "insert" for r in listed)

        retried = c.execute(query("retry_dead_letters"), {"event_ids": [e1], "error_pattern": None, "all": False}).fetchall()
        assert [r["id"] for r in retried] == [e1]
        r = row(conn, e1)
        assert (r["status"], r["attempts"], r["last_error"], r["first_failed_at"]) == ("pending", 0, None, None)
        assert row(conn, e2)["status"] == "dead"
        assert [r["id"] for r in c.execute(query("dead_letters")).fetchall()] == [e2]

        retried = c.execute(query("retry_dead_letters"), {"event_ids": None, "error_pattern": None, "all": True}).fetchall()
        assert [r["id"] for r in retried] == [e2]
        assert c.execute(query("dead_letters")).fetchall() == []

    assert {(r["status"], r["attempts"]) for r in outbox_rows(conn)} == {("pending", 0)}
    assert [e.id for e in await a.claim(10)] == [e1, e2, e3]


# --- visibility --------------------------------------------------------------------------------
@pytest.mark.parametrize("worker_name", ["claims-test-worker", "w" * 100])
async def test_pool_connections_show_the_worker_in_pg_stat_activity(conn, make_outbox, worker_name):
    """The pool sets application_name, so each worker is visible (and identifiable) in pg_stat_activity."""
    settings = Settings(database_url=None, worker_name=worker_name)
    a = await make_outbox(settings.worker_name, application_name=settings.application_name)
    await a.pending()
    names = [
        r[0]
        for r in conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    ]
    assert settings.application_name in names, names
