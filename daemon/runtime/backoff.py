"""The one backoff every retrying place uses: exponential, capped, with
jitter, optionally bounded by a deadline.

Full jitter (a delay drawn uniformly between 0 and the capped exponential)
keeps the workers of a fleet from retrying in step after a shared failure
(a PostgreSQL failover, a Qdrant restart, a rate limit): each draws its own
delay. A failed event's next attempt keeps half its delay fixed (EVENTS: a
poison event is not retried at once by luck); PostgreSQL draws it
(`fail_events`), with the parameters sql_params() gives it, so the curve is
defined here only. `Attempts` is one failing streak (the psycopg_pool
AttemptWithBackoff shape, reset on success); the one loop around it is
daemon.runtime.retry.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_EXPONENT = 64


@dataclass(frozen=True)
class Backoff:
    base: float = 0.5  # seconds: the first delay's upper bound
    factor: float = 2.0
    cap: float = 30.0  # seconds: no delay is longer
    deadline: float | None = None  # seconds a streak of failures may last, where it is bounded
    jitter: float = 1.0  # the share of each delay drawn at random: 1 full jitter, 0.5 half fixed, half drawn

    def window(self, attempt: int) -> tuple[float, float]:
        """The (shortest, longest) delay before retry number `attempt` (0: the first retry)."""
        # the exponent is bounded, as in fail_events, so a long streak cannot overflow
        ceiling = min(self.cap, self.base * self.factor ** min(attempt, MAX_EXPONENT))
        return ceiling * (1.0 - self.jitter), ceiling

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay before retry number `attempt` (0: the first retry), drawn from its window."""
        return (rng or random).uniform(*self.window(attempt))

    def sql_params(self) -> dict[str, float]:
        """The curve as the query parameters of `fail_events`, which computes the
        same window in PostgreSQL for a failed event's next attempt."""
        return {"backoff_base": self.base, "backoff_factor": self.factor, "backoff_max": self.cap,
                "backoff_jitter": self.jitter}

    def attempts(self, clock: Callable[[], float] = time.monotonic) -> "Attempts":
        return Attempts(self, clock=clock)


@dataclass
class Attempts:
    """One streak of failures: the next delay, and whether the deadline has
    passed. A streak starts at its first failure (next_delay) and ends at a success (reset)."""

    backoff: Backoff
    clock: Callable[[], float] = time.monotonic
    attempt: int = 0
    started: float | None = None

    def next_delay(self) -> float:
        if self.started is None:
            self.started = self.clock()
        delay = self.backoff.delay(self.attempt)
        self.attempt += 1
        return delay

    def elapsed(self) -> float:
        """Seconds since the streak's first failure (0 while there is none)."""
        return 0.0 if self.started is None else self.clock() - self.started

    def expired(self, upcoming: float = 0.0) -> bool:
        """Whether the deadline has passed, or would have after waiting `upcoming` seconds more."""
        deadline = self.backoff.deadline
        return deadline is not None and self.started is not None and self.elapsed() + upcoming >= deadline

    def reset(self) -> None:
        """A success ends the streak: the next failure starts from the first delay."""
        self.attempt = 0
        self.started = None


# The policies of the places that retry, in one table so they are read and tuned together.
OUTAGE = Backoff(base=0.5, cap=30.0)  # a batch, a claim, a poll: until the dependency is back or the process stops
STARTUP = Backoff(base=0.5, cap=10.0)  # reaching a service at start (the deadline is OUTBOXD_STARTUP_TIMEOUT)
RECONNECT = Backoff(base=0.5, cap=30.0)  # the LISTEN connection
KAFKA_STATUS = Backoff(base=0.25, cap=1.0, deadline=20.0)  # `outboxd status` asking a broker that says "not yet"
# A failed event's next attempt (fail_events, in PostgreSQL); base and cap are the
# settings' retry_backoff_base and retry_backoff_max (daemon.outbox.service).
EVENTS = Backoff(base=1.0, cap=300.0, jitter=0.5)
