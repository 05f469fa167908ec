"""The one retry loop: try, classify the failure (daemon.errors.classify), wait
with the backoff (daemon.runtime.backoff), give up or go on. Every place that
retries runs through it: the claim, the batch (the batch policy), the Kafka
poll and commit, the LISTEN connection, the verifier, the http embedding
backend's requests, start-up waiting and `outboxd status`'s Kafka section.

    retry = Retry(OUTAGE, stop=stop, on_retry=note)   # one per loop: its streak outlives a call
    claim = await retry.call(outbox.claim, 100)       # a success resets the streak

- what is retried: the failures of `retries` (an outage, by default); a
  refusal of the configuration is raised at once as its ConfigError (exit 78),
  anything else at once as it is;
- the wait: the streak's next delay (or the failure's own, a Retry-After),
  spent on the stop event: setting it ends the wait at once, and the call
  raises Stopped;
- giving up: at the deadline (the backoff's, counted from the streak's first
  failure on the caller's clock), rather than waiting past it: GaveUp, with
  the last failure;
- on_retry(Failed) before each wait: the caller's log line and metrics.

Each call is one tenacity AsyncRetrying; the streak of failures
(daemon.runtime.backoff.Attempts, psycopg_pool's AttemptWithBackoff shape)
belongs to the Retry instead, so a long-lived loop keeps it across calls (one
Retry per loop, never shared between tasks), and a call that is itself
long-lived (a LISTEN connection) ends it on its own success with reset().
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from daemon.errors import DependencyDown, Failure, classify, dependency_of, describe, refusal
from daemon.runtime.backoff import Backoff

P = ParamSpec("P")
T = TypeVar("T")


async def wait_for_any(events: list[asyncio.Event], timeout: float | None) -> bool:
    """Until one of the events is set (True) or the timeout passes (False)."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for w in waiters:
            w.cancel()


class GaveUp(DependencyDown):
    """A failure that was being retried lasted past the deadline: still an outage
    (a DependencyDown of the last failure's dependency), the last failure its cause."""

    def __init__(self, last: BaseException, attempts: int) -> None:
        super().__init__(describe(last), dependency_of(last))
        self.last = last
        self.attempts = attempts  # tries made, the last included


class Stopped(GaveUp):
    """The stop event ended the retrying: the work was not done."""


@dataclass(frozen=True)
class Failed:
    """One failed try that will be retried, for on_retry."""

    error: BaseException
    failure: Failure
    delay: float  # seconds until the next try
    attempt: int  # tries made in this call


class Retry:
    def __init__(
        self,
        backoff: Backoff,
        *,
        stop: asyncio.Event | None = None,
        retries: Collection[Failure] = (Failure.TRANSIENT,),
        retry_if: Callable[[BaseException], bool] | None = None,
        on_retry: Callable[[Failed], None] | None = None,
        delay_of: Callable[[BaseException], float | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], Awaitable[bool]] | None = None,
    ) -> None:
        """backoff: the delays, and the deadline where it has one. retries: the
        failures retried; retry_if narrows them further (a caller's own rule,
        e.g. "not a broker that does not answer"). delay_of: a failure's own
        delay (a Retry-After), None for the backoff's. clock: the streak's time
        (a caller may leave out time that is not failing). wait(seconds) -> True
        when the stop came: by default the stop event's, or a plain sleep."""
        self.backoff = backoff
        self.stop = stop
        self.retries = frozenset(retries)
        self.retry_if = retry_if
        self.on_retry = on_retry
        self.delay_of = delay_of
        self.streak = backoff.attempts(clock)
        self._wait = wait or self._wait_for_stop
        self._failure: Failure | None = None  # the last failure's class, from the retry predicate
        self._waiting: Failed | None = None  # the failure whose delay is being waited

    def reset(self) -> None:
        """A success ends the streak (call() does it when its function returns)."""
        self.streak.reset()

    async def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """fn(*args, **kwargs), retried as the class says; its result."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(self._retried),
            wait=self._next_delay,
            stop=self._give_up,
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            retry_error_callback=self._gave_up,
            reraise=True,
        )

        async def attempt() -> T:  # any callable returning an awaitable (tenacity would not await a lambda's)
            return await fn(*args, **kwargs)

        try:
            result = await retrying(attempt)
        except Exception as exc:
            if self._failure is Failure.REFUSAL and (refused := refusal(exc)) is not None:
                raise refused from exc
            raise
        self.reset()
        return result

    # --- tenacity's hooks -------------------------------------------------------------------
    def _retried(self, exc: BaseException) -> bool:
        if not isinstance(exc, Exception):  # a cancellation, an interrupt: never retried
            self._failure = None
            return False
        self._failure = classify(exc)
        return self._failure in self.retries and (self.retry_if is None or self.retry_if(exc))

    def _next_delay(self, state: RetryCallState) -> float:
        delay = self.streak.next_delay()  # the streak moves on whatever the wait
        own = self.delay_of(state.outcome.exception()) if self.delay_of is not None else None
        return delay if own is None else own

    def _give_up(self, state: RetryCallState) -> bool:
        return (self.stop is not None and self.stop.is_set()) or self.streak.expired(state.upcoming_sleep)

    def _gave_up(self, state: RetryCallState) -> None:
        last = state.outcome.exception()
        kind = Stopped if self.stop is not None and self.stop.is_set() else GaveUp
        raise kind(last, state.attempt_number) from last

    def _before_sleep(self, state: RetryCallState) -> None:
        self._waiting = Failed(state.outcome.exception(), self._failure, state.upcoming_sleep, state.attempt_number)
        if self.on_retry is not None:
            self.on_retry(self._waiting)

    async def _sleep(self, seconds: float) -> None:
        if await self._wait(seconds):
            last = self._waiting.error
            raise Stopped(last, self._waiting.attempt) from last

    async def _wait_for_stop(self, seconds: float) -> bool:
        if self.stop is None:
            await asyncio.sleep(seconds)  # nothing to stop this retry but a cancellation
            return False
        return await wait_for_any([self.stop], seconds)
