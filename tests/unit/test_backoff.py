"""The one backoff (daemon.runtime.backoff): exponential, capped, full jitter,
a deadline; the same delays by hand and through tenacity."""
from __future__ import annotations

import random
from types import SimpleNamespace

from daemon.runtime.backoff import OUTAGE, Backoff


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


def test_tenacity_draws_from_the_same_windows():
    backoff = Backoff(base=0.5, factor=2.0, cap=4.0)
    wait = backoff.wait()
    for attempt_number, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        state = SimpleNamespace(attempt_number=attempt_number)
        assert all(0.0 <= wait(state) <= ceiling for _ in range(200))


def test_a_streak_expires_at_its_deadline_and_a_success_resets_it():
    now = [100.0]
    attempts = Backoff(base=0.01, cap=0.02, deadline=5.0).attempts(clock=lambda: now[0])
    assert not attempts.expired()
    for _ in range(5):
        attempts.next_delay()
    assert attempts.attempt == 5
    now[0] += 4.9
    assert not attempts.expired()
    now[0] += 0.2
    assert attempts.expired()
    attempts.reset()
    assert attempts.attempt == 0 and not attempts.expired()
    assert Backoff().attempts().expired() is False  # no deadline: never
