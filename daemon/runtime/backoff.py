"""The one backoff every retrying place uses: exponential, capped, with full
jitter, optionally bounded by a deadline.

Full jitter (a delay drawn uniformly between 0 and the capped exponential)
keeps the workers of a fleet from retrying in step after a shared failure
(a PostgreSQL failover, a Qdrant restart, a rate limit): each draws its own
delay. Loops that wait by hand take `Attempts` (the psycopg_pool
AttemptWithBackoff shape: one object per failing streak, reset on success);
tenacity-based retries take `wait()` and `stop()`.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tenacity import stop_after_delay, stop_never, wait_random_exponential


@dataclass(frozen=True)
class Backoff:
    base: float = 0.5  # seconds: the first delay's upper bound
    factor: float = 2.0
    cap: float = 30.0  # seconds: no delay is longer
    deadline: float | None = None  # seconds a streak of failures may last, where it is bounded

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay before retry number `attempt` (0: the first retry)."""
        ceiling = min(self.cap, self.base * self.factor ** min(attempt, 64))
        return (rng or random).uniform(0.0, ceiling)

    def wait(self) -> wait_random_exponential:
        """The same delays for tenacity."""
        return wait_random_exponential(multiplier=self.base, exp_base=self.factor, max=self.cap)

    def stop(self):
        """Tenacity's stop for the deadline (never, where there is none)."""
        return stop_after_delay(self.deadline) if self.deadline is not None else stop_never

    def attempts(self, clock: Callable[[], float] = time.monotonic) -> "Attempts":
        return Attempts(self, clock=clock)


@dataclass
class Attempts:
    """One streak of failures: the next delay, and whether the deadline has passed."""

    backoff: Backoff
    clock: Callable[[], float] = time.monotonic
    attempt: int = 0
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def next_delay(self) -> float:
        delay = self.backoff.delay(self.attempt)
        self.attempt += 1
        return delay

    def expired(self) -> bool:
        deadline = self.backoff.deadline
        return deadline is not None and self.clock() - self.started >= deadline

    def reset(self) -> None:
        """A success ends the streak: the next failure starts from the first delay."""
        self.attempt = 0
        self.started = self.clock()


# The policies of the places that retry, in one table so they are read and tuned together.
OUTAGE = Backoff(base=0.5, cap=30.0)  # a batch, a claim, a poll: until the dependency is back or the process stops
STARTUP = Backoff(base=0.5, cap=10.0)  # reaching a service at start (the deadline is OUTBOXD_STARTUP_TIMEOUT)
RECONNECT = Backoff(base=0.5, cap=30.0)  # the LISTEN connection
