"""The embedding budget's arithmetic (daemon.embedding.token_bucket): a bucket of
requests and tokens that never lets a window of a minute hold more than the
limit, keeps up with it, reserves turns at most HORIZON ahead, pauses for a
Retry-After, and settles the tokens the endpoint reports. Pure: a fake clock."""
from __future__ import annotations

import asyncio
import selectors
import time

import pytest

from daemon.embedding.token_bucket import HORIZON, Bucket, Limit, LocalBudget, Rates, TokenEstimate


def greedy_sends(rates: Rates, n: int, tokens: float = 1.0, waiters: int = 1) -> list[float]:
    """The send times of n requests from `waiters` callers that ask again the moment
    they may: each sends at the time its take said (its wait after asking)."""
    bucket = Bucket.full(rates, 0.0)
    asks = [0.0] * waiters  # when each caller asks next
    sends: list[float] = []
    while len(sends) < n:
        i = min(range(waiters), key=asks.__getitem__)
        now = asks[i]
        grant = bucket.take(rates, tokens, now)
        if grant.taken:
            sends.append(now + grant.wait)
            asks[i] = now + grant.wait  # sends, then asks for its next request at once
        else:
            asks[i] = now + grant.wait
    return sorted(sends)


def most_in_a_window(times: list[float], window: float) -> int:
    """The most of these times any half-open window [t, t + window) holds (to a
    microsecond: the float arithmetic of thousands of turns is not exact)."""
    most, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window + 1e-6:
            j += 1
        most = max(most, i - j + 1)
    return most


@pytest.mark.parametrize("per_minute", [1, 7.5, 60, 240, 6000, 60000])
@pytest.mark.parametrize("waiters", [1, 12])
def test_no_minute_holds_more_than_the_limit_and_the_rate_keeps_up(per_minute, waiters):
    rates = Rates(requests_per_minute=per_minute)
    n = int(min(3 * per_minute + 5, 30_000))
    sends = greedy_sends(rates, n, waiters=waiters)
    # a whole number of requests: a limit of 7.5 sends 8 in some minutes, 7 in others
    assert most_in_a_window(sends, 60.0) < per_minute + 1
    span_minutes = (sends[-1] - sends[0]) / 60
    assert (n - 1) / span_minutes >= 0.99 * per_minute


def test_capacity_is_a_tenth_of_a_second_and_at_least_one():
    assert Limit(240).capacity == 1.0 and Limit(240).per_second == pytest.approx(4.0)
    assert Limit(60_000).capacity == pytest.approx(100.0)
    assert Limit(60_000).per_second == pytest.approx((60_000 - 99) / 60)
    assert Limit(0.5).capacity == 1.0 and Limit(0.5).per_second == pytest.approx(0.5 / 60)


def test_a_turn_is_reserved_within_the_horizon_and_not_beyond():
    rates = Rates(requests_per_minute=60)  # one a second, capacity one
    bucket = Bucket.full(rates, 0.0)
    assert bucket.take(rates, 0, 0.0)[:3] == (True, 0.0, False)
    first = bucket.take(rates, 0, 0.0)  # the next turn is one second away: reserved
    assert first.taken and first.wait == pytest.approx(1.0)
    second = bucket.take(rates, 0, 0.0)  # two seconds away: beyond the horizon, nothing taken
    assert not second.taken and second.wait == pytest.approx(2.0 - HORIZON / 2)
    assert bucket.requests == pytest.approx(-1.0)  # one turn reserved ahead, no more
    again = bucket.take(rates, 0, second.wait)  # asks again when its turn is half a horizon away
    assert again.taken and again.wait == pytest.approx(HORIZON / 2)


def test_a_pause_holds_every_turn_back_until_it_ends():
    rates = Rates(requests_per_minute=6000)
    bucket = Bucket.full(rates, 0.0)
    bucket.pause(rates, 10.0, 5.0)
    grant = bucket.take(rates, 0, 10.0)
    assert not grant.taken and grant.paused and grant.wait == pytest.approx(5.0 - HORIZON / 2)
    grant = bucket.take(rates, 0, 14.5)
    assert grant.taken and grant.paused and grant.wait == pytest.approx(0.5)
    bucket.pause(rates, 14.5, 0.2)  # a shorter pause never shortens the one in force
    assert bucket.paused_until == pytest.approx(15.0)
    bucket.pause(rates, 14.5, 1.0)
    assert bucket.paused_until == pytest.approx(15.5)
    assert bucket.take(rates, 0, 15.5)[:3] == (True, 0.0, False)


def test_a_pause_keeps_the_level_it_began_with_and_adds_nothing():
    """A bucket of one request a second, emptied just before a 5 s pause: when the
    pause ends it is still empty, so the next turn is a second later, not at once."""
    rates = Rates(requests_per_minute=60)
    bucket = Bucket.full(rates, 0.0)
    assert bucket.take(rates, 0, 0.0).taken
    bucket.pause(rates, 0.5, 5.0)  # half a request accrued before it began
    assert bucket.requests == pytest.approx(0.5) and bucket.at == pytest.approx(5.5)
    grant = bucket.take(rates, 0, 5.0)
    assert grant.taken and grant.paused and grant.wait == pytest.approx(1.0) and grant.turn == pytest.approx(6.0)
    grant = bucket.take(rates, 0, 6.0)  # the pause is over: the next turn is a second after the one before
    assert grant.taken and not grant.paused and grant.wait == pytest.approx(1.0) and grant.turn == pytest.approx(7.0)


def test_a_turn_a_pause_came_to_cover_is_given_back_and_no_other():
    rates = Rates(requests_per_minute=60, tokens_per_minute=6000)  # capacities one request and ten tokens
    bucket = Bucket.full(rates, 0.0)
    first, reserved = bucket.take(rates, 4, 0.0), bucket.take(rates, 4, 0.0)
    assert first.wait == 0.0 and reserved.taken and reserved.turn == pytest.approx(1.0)
    assert not bucket.release(rates, 4, reserved.turn)  # no pause: the turn stands
    bucket.pause(rates, 0.5, 2.0)  # begins before the reserved turn: it covers it
    assert bucket.release(rates, 4, reserved.turn)
    # the request and its tokens back, as of the pause's start (the tokens up to the capacity)
    assert bucket.requests == pytest.approx(0.5) and bucket.tokens == pytest.approx(10.0)
    after = bucket.take(rates, 4, 2.0)  # taken during the pause, for a turn after it: not given back
    assert after.taken and after.turn >= bucket.paused_until
    assert not bucket.release(rates, 4, after.turn)


def test_a_pause_without_limits_still_holds_back():
    bucket = Bucket.full(Rates(), 0.0)
    assert bucket.take(Rates(), 0, 0.0)[:3] == (True, 0.0, False)
    bucket.pause(Rates(), 0.0, 0.4)
    assert bucket.take(Rates(), 0, 0.1)[:3] == pytest.approx((True, 0.3, True))


def test_a_request_over_the_token_capacity_goes_when_full_and_leaves_debt():
    rates = Rates(tokens_per_minute=6000)  # 100 a second, capacity 10
    sends = greedy_sends(rates, 50, tokens=500)  # 5 seconds of tokens each
    gaps = [b - a for a, b in zip(sends, sends[1:])]
    assert min(gaps) == pytest.approx(500 / rates.tokens.per_second - 0 * 1, rel=0.03)
    assert 50 * 500 / ((sends[-1] - sends[0]) / 60) <= 6000 * 1.03


def test_both_counts_must_cover_a_request():
    rates = Rates(requests_per_minute=60_000, tokens_per_minute=60)  # tokens bind
    bucket = Bucket.full(rates, 0.0)
    assert bucket.take(rates, 1, 0.0).taken
    grant = bucket.take(rates, 1, 0.0)
    assert grant.taken and grant.wait == pytest.approx(1.0)


def test_settling_charges_the_difference_and_a_refund_stops_at_the_capacity():
    rates = Rates(tokens_per_minute=600)  # 10 a second, capacity 1
    bucket = Bucket.full(rates, 0.0)
    bucket.settle(rates, 30)
    assert bucket.tokens == pytest.approx(-29.0)
    bucket.settle(rates, -100)
    assert bucket.tokens == pytest.approx(rates.tokens.capacity)
    bucket.settle(Rates(requests_per_minute=5), 50)  # no token limit: nothing to settle
    assert bucket.tokens == pytest.approx(rates.tokens.capacity)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when every task waits: it jumps to
    the next timer instead of sleeping, so a test of many callers over minutes
    of budget runs in milliseconds and its times are exact, whatever the machine."""

    def __init__(self) -> None:
        loop = self

        class Selector(selectors.DefaultSelector):
            def select(self, timeout=None):
                if timeout is None:
                    raise RuntimeError("every task waits and no timer is due: deadlock")
                loop.now += timeout
                return []

        self.now = 0.0
        super().__init__(Selector())

    def time(self) -> float:
        return self.now


def sends_around_pauses(rates: Rates, callers: int, pauses: list[tuple[float, float]], until: float) -> list[float]:
    """When the requests of `callers` callers of one LocalBudget go (each admits its
    next request the moment the one before went), with a 429's Retry-After of
    `seconds` arriving at each (at, seconds) of pauses; in virtual time."""
    sends: list[float] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        budget = LocalBudget("e", rates, clock=loop.time)

        async def caller() -> None:
            while loop.time() < until:
                await budget.admit(["some text"])
                sends.append(loop.time())

        async def endpoint() -> None:
            for at, seconds in pauses:
                await asyncio.sleep(at - loop.time())
                await budget.pause(seconds)

        await asyncio.gather(endpoint(), *(caller() for _ in range(callers)))

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(run())
    return sorted(sends)


@pytest.mark.parametrize("per_minute, pauses", [
    (180, [(5.0, 6.0)]),  # three daemons of two workers, a 6 s Retry-After
    (180, [(5.1, 0.4)]),  # a pause shorter than the turns reserved ahead
    (600, [(5.05, 6.0), (5.08, 6.0), (8.0, 2.0)]),  # pauses that lengthen the one in force
    (60_000, [(5.0, 3.0)]),  # a capacity of a hundred requests
])
def test_after_a_pause_the_turns_are_spaced_at_the_rate_again(per_minute, pauses):
    """Six callers keep the budget busy, so turns are always reserved ahead when a
    pause begins. No request goes during a pause, and after it no window of T
    seconds holds more than capacity + rate * T: the turns reserved before it, and
    the time it lasted, do not all go the moment it ends."""
    rates = Rates(requests_per_minute=per_minute)
    sends = sends_around_pauses(rates, 6, pauses, until=75.0)
    for at, seconds in pauses:
        assert not [t for t in sends if at + 1e-9 < t < at + seconds - 1e-9]
    limit = rates.requests
    for window in (0.01, 0.5, 1.0, 2.0, 10.0, 60.0):
        assert most_in_a_window(sends, window) <= limit.capacity + limit.per_second * window + 1e-6, window
    end = max(at + seconds for at, seconds in pauses)
    after = [t for t in sends if t >= end]  # the budget is used again: the turns given back are taken again
    assert len(after) / (after[-1] - end) >= 0.95 * limit.per_second


def test_the_token_estimate_starts_cautious_and_learns_the_endpoints_count():
    estimate = TokenEstimate()
    assert estimate.of(300) == 100  # one token per three characters before any answer
    estimate.learn(400, 100)
    assert estimate.of(400) == 100
    for _ in range(200):
        estimate.learn(500, 50)  # the endpoint counts fewer now: the estimate follows
    assert estimate.of(500) == pytest.approx(50, abs=2)
    assert estimate.of(0) == 1


async def test_admit_waits_for_each_turn():
    """Three callers of one LocalBudget of 600 requests a minute (capacity one):
    each request's turn is a tenth of a second after the one before, and admit()
    returns no earlier than its turn, in real time."""
    budget = LocalBudget("http://x/v1/embeddings m", Rates(requests_per_minute=600))
    turns: list[float] = []
    take = budget.take

    async def recorded(tokens: int):
        grant = await take(tokens)
        if grant.taken:
            turns.append(time.monotonic() + grant.wait)
        return grant

    budget.take = recorded
    returned: list[tuple[float, float]] = []  # (turn, when admit returned)

    async def caller() -> None:
        for _ in range(4):
            await budget.admit(["some text"])
            returned.append(time.monotonic())

    started = time.monotonic()
    await asyncio.gather(caller(), caller(), caller())
    assert len(turns) == 12
    gaps = [b - a for a, b in zip(turns, turns[1:])]
    assert min(gaps) >= 0.1 - 0.002  # one turn a tenth of a second (the clock moves while the take runs)
    early = 0.005  # the event loop may wake a timer up to its clock resolution early
    assert all(r >= t - early for t, r in zip(sorted(turns), sorted(returned)))
    assert max(returned) - started >= 1.1 - early


async def test_answered_learns_and_settles_the_endpoints_count():
    budget = LocalBudget("e", Rates(tokens_per_minute=600))
    ticket = await budget.admit(["x" * 30])
    assert ticket.tokens == 10 and ticket.chars == 30
    level = budget.bucket.tokens
    await budget.answered(ticket, 25)  # the endpoint counted 15 more than charged
    assert budget.bucket.tokens == pytest.approx(level - 15)
    assert budget.estimate.of(30) == 25
    await budget.answered(ticket, None)  # an endpoint that does not say: nothing changes
    assert budget.estimate.of(30) == 25
