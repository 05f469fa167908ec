"""The one retry loop (daemon.runtime.retry) and the one classification of
failures it asks (daemon.errors.classify): it waits the backoff's delays, stops
at once when the stop event is set mid-wait, raises a refusal as the
ConfigError it is without waiting, gives up at the deadline rather than wait
past it, and starts a new streak after a success. Waits are recorded by a fake
(and a fake clock moved by them), so no test depends on the machine's speed."""
from __future__ import annotations

import asyncio

import httpx
import psycopg
import pytest
from qdrant_client.http.exceptions import UnexpectedResponse

from daemon.errors import ConfigError, DependencyDown, Failure, InvalidChunkError, classify
from daemon.runtime.backoff import Backoff
from daemon.runtime.retry import Failed, GaveUp, Retry, Stopped

STEADY = Backoff(base=1.0, factor=2.0, cap=100.0, jitter=0.0)  # delays 1, 2, 4, ...: exact, for the assertions


class Clock:
    """A monotonic clock that only the fake wait moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return False  # no stop came


class Flaky:
    """Fails with the given errors, in order, then returns "done"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def outage(n: int = 1) -> list[BaseException]:
    return [ConnectionRefusedError("connection refused") for _ in range(n)]


def unauthorized() -> UnexpectedResponse:
    return UnexpectedResponse(401, "Unauthorized", b"Invalid API key or JWT", httpx.Headers())


# --- the classification ---------------------------------------------------------------------------
@pytest.mark.parametrize(("exc", "failure"), [
    (ConnectionRefusedError("refused"), Failure.TRANSIENT),
    (httpx.ConnectError("refused"), Failure.TRANSIENT),
    (UnexpectedResponse(503, "Service Unavailable", b"", httpx.Headers()), Failure.TRANSIENT),
    (DependencyDown("the endpoint is rate limiting", "embedding"), Failure.TRANSIENT),
    (unauthorized(), Failure.REFUSAL),
    (psycopg.OperationalError('FATAL:  password authentication failed for user "outboxd"'), Failure.REFUSAL),
    (ConfigError("the model changed"), Failure.CONFIG),
    (ValueError("a bug"), Failure.OTHER),
    (InvalidChunkError("metadata nested too deep"), Failure.OTHER),
])
def test_every_failure_has_one_class(exc, failure):
    assert classify(exc) is failure


# --- waiting ----------------------------------------------------------------------------------------
async def test_it_waits_the_backoffs_delays_and_reports_each_retry():
    clock, seen = Clock(), []
    fn = Flaky(*outage(4))
    retry = Retry(STEADY, clock=clock, wait=clock.wait, on_retry=seen.append)
    assert await retry.call(fn) == "done"
    assert fn.calls == 5 and clock.waits == [1.0, 2.0, 4.0, 8.0]
    assert [(f.delay, f.attempt, f.failure) for f in seen] == [
        (1.0, 1, Failure.TRANSIENT), (2.0, 2, Failure.TRANSIENT), (4.0, 3, Failure.TRANSIENT), (8.0, 4, Failure.TRANSIENT)]
    assert all(isinstance(f, Failed) and isinstance(f.error, ConnectionRefusedError) for f in seen)


async def test_what_a_lambda_returns_is_awaited_and_retried():
    """until_reachable(what, lambda: probe(client)): the coroutine the lambda returns is the try."""
    clock = Clock()
    fn = Flaky(*outage(1))
    assert await Retry(STEADY, clock=clock, wait=clock.wait).call(lambda: fn()) == "done"
    assert fn.calls == 2 and clock.waits == [1.0]


async def test_jittered_delays_stay_in_the_backoffs_windows():
    clock = Clock()
    backoff = Backoff(base=0.5, factor=2.0, cap=4.0)
    await Retry(backoff, clock=clock, wait=clock.wait).call(Flaky(*outage(8)))
    assert len(clock.waits) == 8
    for attempt, waited in enumerate(clock.waits):
        low, high = backoff.window(attempt)
        assert low <= waited <= high


async def test_a_failures_own_delay_replaces_the_backoffs():
    """A Retry-After: the endpoint's time, not the curve's."""
    clock = Clock()
    retry = Retry(STEADY, clock=clock, wait=clock.wait, delay_of=lambda exc: 7.0 if "later" in str(exc) else None)
    await retry.call(Flaky(ConnectionError("come back later"), ConnectionError("reset")))
    assert clock.waits == [7.0, 2.0]  # the streak moved on under the endpoint's delay


# --- stopping ------------------------------------------------------------------------------------------
async def test_the_stop_event_ends_a_wait_at_once():
    """A wait of an hour ends as soon as the stop is set: Stopped, the last failure its cause."""
    stop, waiting = asyncio.Event(), asyncio.Event()
    fn = Flaky(*outage(100))
    hour = Backoff(base=3600.0, cap=3600.0, jitter=0.0)
    retry = Retry(hour, stop=stop, on_retry=lambda _failed: waiting.set())
    task = asyncio.create_task(retry.call(fn))
    await asyncio.wait_for(waiting.wait(), 30)
    stop.set()
    with pytest.raises(Stopped) as stopped:
        await asyncio.wait_for(task, 30)  # far less than the hour it was waiting
    assert fn.calls == 1
    assert isinstance(stopped.value.last, ConnectionRefusedError) and stopped.value.__cause__ is stopped.value.last
    assert classify(stopped.value) is Failure.TRANSIENT  # still an outage to whoever sees it


async def test_a_failure_once_stopping_is_not_waited_for():
    clock, stop = Clock(), asyncio.Event()
    stop.set()
    fn = Flaky(*outage(3))
    with pytest.raises(Stopped):
        await Retry(STEADY, stop=stop, clock=clock, wait=clock.wait).call(fn)
    assert fn.calls == 1 and clock.waits == []


# --- what is not retried ----------------------------------------------------------------------------
async def test_a_refusal_is_its_config_error_at_once():
    clock = Clock()
    fn = Flaky(unauthorized())
    with pytest.raises(ConfigError, match="QDRANT_API_KEY") as caught:
        await Retry(STEADY, clock=clock, wait=clock.wait).call(fn)
    assert fn.calls == 1 and clock.waits == []
    assert isinstance(caught.value.__cause__, UnexpectedResponse)


@pytest.mark.parametrize("error", [ConfigError("the model changed"), ValueError("a bug")])
async def test_a_configuration_error_or_a_bug_is_raised_at_once(error):
    clock = Clock()
    fn = Flaky(error)
    with pytest.raises(type(error)):
        await Retry(STEADY, clock=clock, wait=clock.wait).call(fn)
    assert fn.calls == 1 and clock.waits == []


async def test_a_caller_may_retry_bugs_too_and_narrow_what_it_retries():
    clock = Clock()
    bugs_too = Retry(STEADY, clock=clock, wait=clock.wait, retries=(Failure.TRANSIENT, Failure.OTHER))
    assert await bugs_too.call(Flaky(ValueError("a bug"), *outage(1))) == "done"
    assert clock.waits == [1.0, 2.0]
    narrowed = Retry(STEADY, clock=clock, wait=clock.wait, retry_if=lambda exc: "refused" not in str(exc))
    with pytest.raises(ConnectionRefusedError):
        await narrowed.call(Flaky(*outage(1)))
    assert clock.waits == [1.0, 2.0]


async def test_a_cancellation_is_never_retried():
    clock = Clock()
    fn = Flaky(asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await Retry(STEADY, clock=clock, wait=clock.wait, retries=tuple(Failure)).call(fn)
    assert fn.calls == 1 and clock.waits == []


# --- the deadline ------------------------------------------------------------------------------------
async def test_it_gives_up_at_the_deadline_rather_than_wait_past_it():
    """Delays of 1 s and a deadline of 3.5 s from the first failure: tries at 0, 1, 2, 3;
    the fourth failure would wait until 4, past the deadline, so it gives up."""
    clock = Clock()
    fn = Flaky(*outage(100))
    steady = Backoff(base=1.0, factor=1.0, cap=1.0, jitter=0.0, deadline=3.5)
    with pytest.raises(GaveUp) as gave_up:
        await Retry(steady, clock=clock, wait=clock.wait).call(fn)
    assert clock.waits == [1.0, 1.0, 1.0] and fn.calls == 4
    assert gave_up.value.attempts == 4 and isinstance(gave_up.value.last, ConnectionRefusedError)
    assert not isinstance(gave_up.value, Stopped)


async def test_the_deadline_counts_from_the_first_failure_on_the_callers_clock():
    """Time the caller leaves out of its clock (waiting for a turn of a budget) is not failing time."""
    clock = Clock()
    left_out = [0.0]

    async def slow_then_failing() -> None:
        clock.now += 50.0  # a long wait for a turn, before each try
        left_out[0] += 50.0
        raise ConnectionRefusedError("refused")

    steady = Backoff(base=1.0, factor=1.0, cap=1.0, jitter=0.0, deadline=2.5)
    retry = Retry(steady, clock=lambda: clock.now - left_out[0], wait=clock.wait)
    with pytest.raises(GaveUp):
        await retry.call(slow_then_failing)
    assert clock.waits == [1.0, 1.0]


# --- streaks ------------------------------------------------------------------------------------------
async def test_a_success_resets_the_streak_for_the_next_call():
    """A long-lived loop keeps one Retry: after a success, the next outage starts from the first delay."""
    clock = Clock()
    retry = Retry(STEADY, clock=clock, wait=clock.wait)
    await retry.call(Flaky(*outage(3)))
    await retry.call(Flaky(*outage(1)))
    assert clock.waits == [1.0, 2.0, 4.0, 1.0]


async def test_a_long_call_resets_the_streak_on_its_own_success():
    """A LISTEN connection: connected is a success, though the call goes on (and fails later)."""
    clock = Clock()
    retry = Retry(STEADY, clock=clock, wait=clock.wait)
    tries = []

    async def connection() -> None:
        tries.append(1)
        if len(tries) == 3:
            retry.reset()  # connected; lost again afterwards
        if len(tries) < 5:
            raise ConnectionResetError("connection lost")

    await retry.call(connection)
    assert clock.waits == [1.0, 2.0, 1.0, 2.0]
