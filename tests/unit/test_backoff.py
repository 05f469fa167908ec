"""The one backoff (daemon.runtime.backoff): exponential, capped, jittered (in
full, or half for a failed event), a deadline; the same windows in Python and
as fail_events' parameters (the one retry loop around it: test_retry.py)."""
from __future__ import annotations

import random
from dataclasses import replace

from daemon.runtime.backoff import EVENTS, OUTAGE, Backoff


def test_two_workers_wait_differently_after_the_same_failure():
    """Full jitter: workers that fail together (a failover) do not retry in step."""
    a, b = OUTAGE.attempts(), OUTAGE.attempts()
    delays_a = [a.next_delay() for _ in range(6)]
    delays_b = [b.next_delay() for _ in range(6)]
    assert delays_a != delays_b
    assert sum(1 for x, y in zip(delays_a, delays_b) if x == y) == 0


def test_delays_grow_by_the_factor_and_stop_at_the_cap():
    backoff = Backoff(base=0.5, factor=2.0, cap=4.0)
    rng = random.Random(7)
    for attempt, ceiling in enumerate([0.5, 1.0, 2.0, 4.0, 4.0, 4.0]):
        samples = [backoff.delay(attempt, rng) for _ in range(300)]
        assert 0.0 <= min(samples) and max(samples) <= ceiling
        assert max(samples) > ceiling * 0.8  # the whole window is used, up to its ceiling
    assert backoff.delay(10_000, rng) <= 4.0  # no overflow however long the streak


def test_half_jitter_keeps_half_of_each_delay():
    """EVENTS: a failed event waits at least half its delay, so luck never retries a poison event at once."""
    backoff = replace(EVENTS, base=1.0, cap=8.0)
    rng = random.Random(3)
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (3, 8.0), (10, 8.0)]:
        assert backoff.window(attempt) == (ceiling / 2, ceiling)
        samples = [backoff.delay(attempt, rng) for _ in range(300)]
        assert ceiling / 2 <= min(samples) and max(samples) <= ceiling
    assert backoff.sql_params() == {"backoff_base": 1.0, "backoff_factor": 2.0, "backoff_max": 8.0,
                                    "backoff_jitter": 0.5}


def test_a_streak_expires_at_its_deadline_and_a_success_resets_it():
    now = [100.0]
    attempts = Backoff(base=0.01, cap=0.02, deadline=5.0).attempts(clock=lambda: now[0])
    assert not attempts.expired()
    for _ in range(5):
        attempts.next_delay()
    assert attempts.attempt == 5
    now[0] += 4.9
    assert not attempts.expired()
    assert attempts.expired(upcoming=0.2)  # waiting that long would pass the deadline
    now[0] += 0.2
    assert attempts.expired()
    attempts.reset()
    assert attempts.attempt == 0 and not attempts.expired()
    now[0] += 100.0  # a streak starts at its first failure, not at the last success
    attempts.next_delay()
    assert not attempts.expired() and attempts.elapsed() == 0.0
    assert Backoff().attempts().expired() is False  # no deadline: never
