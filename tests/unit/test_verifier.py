"""The continuous verifier's pure logic: the merge of the two ordered streams,
the bounds of one range, a walk of ranges over the id space (each id checked
exactly once per pass, however chunks and orphan points are spread), how far a
pass is, how long one should take, and its settings."""
from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from pydantic import ValidationError

from daemon.admin.reconcile import bound_range, merge_by_id, range_end
from daemon.config import Settings
from daemon.outbox.settings import VerifySettings
from daemon.outbox.verifier import add_counts, expected_pass_seconds, position_of


def ids(n: int, rng: random.Random) -> list[str]:
    return sorted(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n))


async def each(items):
    for item in items:
        yield item


def merged(chunks: list[str], points: list[str]) -> list[tuple[str, object, object]]:
    async def go():
        return [x async for x in merge_by_id(each([(c, f"state {c}") for c in chunks]),
                                             each([(p, f"point {p}") for p in points]))]

    return asyncio.run(go())


# --- the merge -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_merge_pairs_each_id_once_in_order(seed):
    rng = random.Random(seed)
    universe = ids(200, rng)
    chunks = sorted(rng.sample(universe, 120))
    points = sorted(rng.sample(universe, 110))
    out = merged(chunks, points)
    assert [pid for pid, _, _ in out] == sorted(set(chunks) | set(points))
    for pid, state, point in out:
        assert (state == f"state {pid}") == (pid in chunks)
        assert (point == f"point {pid}") == (pid in points)
        assert state is not None or point is not None


def test_merge_of_one_empty_side_and_of_nothing():
    assert merged([], []) == []
    assert merged(["a", "b"], []) == [("a", "state a", None), ("b", "state b", None)]
    assert merged([], ["a"]) == [("a", None, "point a")]


def test_uuid_strings_order_as_postgresql_orders_uuids():
    """The merge compares canonical strings; PostgreSQL compares the 128-bit values."""
    rng = random.Random(3)
    values = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(500)]
    values += [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), uuid.UUID("80000000-0000-0000-0000-000000000000")]
    assert sorted(str(v) for v in values) == [str(v) for v in sorted(values, key=lambda v: v.int)]


# --- one range --------------------------------------------------------------------------------------
def test_range_end_is_the_lower_end_of_the_sides_that_may_hold_more():
    assert range_end(["a", "c"], True, ["b", "d"], True) == "c"
    assert range_end(["a", "c"], True, ["b"], False) == "c"
    assert range_end(["a"], False, ["b", "d"], True) == "d"
    assert range_end(["a"], False, ["b"], False) is None  # both read to their end: the pass completes
    assert range_end([], False, [], False) is None


def test_bound_range_leaves_what_lies_past_the_end_for_the_next_range():
    chunks = [("a", 1), ("c", 2), ("e", 3)]
    points = [("b", 1), ("d", 2), ("f", 3), ("g", 4)]
    assert bound_range(chunks, True, points, False) == ([("a", 1), ("c", 2), ("e", 3)], [("b", 1), ("d", 2)], "e")
    assert bound_range(chunks, False, points, True) == (chunks, points, "g")
    assert bound_range(chunks, False, points[:2], False) == (chunks, points[:2], None)


def walk(chunks: list[str], points: list[str], size: int) -> list[tuple[list[str], list[str], str | None]]:
    """A pass of ranges as Reconciler.check_range reads them: a keyset page of `size`
    chunks after the checkpoint, a scroll of size (+1 from a checkpoint, whose own
    point it returns first) from the checkpoint, then bound_range."""
    out, after = [], None
    while True:
        page = [c for c in chunks if after is None or c > after][:size]
        more_chunks = len(page) == size
        if after is None:
            scrolled = points[:size]
            more_points = len(points) > size
        else:
            tail = [p for p in points if p >= after]
            scrolled, more_points = tail[:size + 1], len(tail) > size + 1
            scrolled = [p for p in scrolled if p != after]
        c, p, end = bound_range([(x, None) for x in page], more_chunks, [(x, None) for x in scrolled], more_points)
        out.append(([x for x, _ in c], [x for x, _ in p], end))
        assert len(out) < 10_000, "the walk does not advance"
        if end is None:
            return out
        assert after is None or end > after
        after = end


@pytest.mark.parametrize("seed", range(20))
def test_a_pass_of_ranges_checks_every_id_exactly_once(seed):
    """However chunks, points, orphans and missing points are spread, the ranges of a
    pass cover both sides exactly once, in order, and no range is larger than its bound."""
    rng = random.Random(seed)
    universe = ids(rng.randint(0, 400), rng)
    chunks = sorted(x for x in universe if rng.random() < 0.8)
    points = sorted(x for x in universe if (x in chunks and rng.random() < 0.9) or rng.random() < 0.2)
    if seed % 5 == 0:  # all orphans: every chunk gone behind outboxd's back
        chunks = []
    size = rng.choice([1, 2, 3, 7, 50, 1000])
    ranges = walk(chunks, points, size)
    assert [c for r in ranges for c in r[0]] == chunks
    assert [p for r in ranges for p in r[1]] == points
    for c, p, _ in ranges:
        assert len(c) <= size and len(p) <= size + 1
    previous = ""
    for c, p, end in ranges:  # ranges are disjoint and ascending
        inside = sorted(c + p)
        assert all(previous < x for x in inside)
        if end is not None:
            assert all(x <= end for x in inside)
            previous = end


def test_many_orphan_points_never_make_one_range_large():
    rng = random.Random(9)
    points = ids(1000, rng)
    ranges = walk([], points, 10)
    assert len(ranges) >= 100 and max(len(p) for _, p, _ in ranges) <= 11


# --- position, expected pass, counts ----------------------------------------------------------------
def test_position_is_the_share_of_the_id_space_passed():
    assert position_of(None) == 0.0
    assert position_of(uuid.UUID("80000000-0000-4000-8000-000000000000")) == pytest.approx(0.5)
    assert position_of(uuid.UUID("ffffffff-ffff-ffff-ffff-ffffffffffff")) == pytest.approx(1.0)
    rng = random.Random(1)
    values = sorted(uuid.UUID(int=rng.getrandbits(128)) for _ in range(100))
    positions = [position_of(v) for v in values]
    assert positions == sorted(positions) and all(0 <= p < 1 for p in positions)


def test_expected_pass_seconds():
    s = VerifySettings(chunks_per_second=50, range_size=500)
    assert expected_pass_seconds(s, 10_000, 0, 0.0) == 200.0  # 20 ranges of 10 s
    assert expected_pass_seconds(s, 10, 0, 0.0) == 10.0  # at least one range
    assert expected_pass_seconds(s, None, 2500, 0.25) == 200.0  # the first pass, extrapolated
    assert expected_pass_seconds(s, None, 3, 0.001) is None  # too early to tell
    assert expected_pass_seconds(VerifySettings(chunks_per_second=0), 10_000, 0, 0.0) is None


def test_add_counts():
    assert add_counts({"missing": 1}, {"missing": 2, "stale": 0, "orphaned": 3}) == {"missing": 3, "orphaned": 3}
    assert add_counts({}, {}) == {}


# --- settings -------------------------------------------------------------------------------------
def test_verify_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("OUTBOXD_VERIFY__CHUNKS_PER_SECOND", "2000")
    monkeypatch.setenv("OUTBOXD_VERIFY__RANGE_SIZE", "20")
    s = Settings(database_url=None)
    assert (s.verify.chunks_per_second, s.verify.range_size, s.verify.enabled) == (2000, 20, True)
    monkeypatch.setenv("OUTBOXD_VERIFY__CHUNKS_PER_SECOND", "0")
    assert not Settings(database_url=None).verify.enabled


def test_verify_settings_defaults_and_refusals():
    s = Settings(database_url=None).verify
    assert s.enabled and 0 < s.chunks_per_second <= 100 and s.range_size >= 100
    # (an unknown key is the name check's: a warning, or exit 78 with --strict; tests/unit/test_settings_names.py)
    for bad in ({"chunks_per_second": -1}, {"range_size": 0}, {"lease_seconds": 0}):
        with pytest.raises(ValidationError):
            VerifySettings(**bad)
