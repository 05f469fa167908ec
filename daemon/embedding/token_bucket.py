"""How fast an embedding endpoint may be sent requests: its budget.

    OUTBOXD_EMBEDDING__REQUESTS_PER_MINUTE=3000     (unset: no limit on requests)
    OUTBOXD_EMBEDDING__TOKENS_PER_MINUTE=1000000    (unset: no limit on tokens)

A budget is a token bucket of two counts, requests and tokens, plus the
endpoint's last Retry-After. Every request the http backend sends first takes
its turn from the budget (admit): one request and its estimated tokens. The
arithmetic (Bucket) is the same wherever the bucket lives:

- refill: each count grows by its rate times the time elapsed, up to its
  capacity;
- take: when the bucket covers the request now, or within HORIZON seconds, the
  cost is taken (a count below zero is a turn reserved ahead) and the caller
  waits until its turn; else nothing is taken and the caller asks again when
  its turn is half a horizon away;
- a pause (a 429's Retry-After) holds every turn back until it ends, and the
  bucket gains nothing while it lasts; a turn reserved for a time the pause
  came to cover is given back (checked once its wait is over) and taken again,
  so that the turns after a pause are spaced at the rate as before it.

Capacity is a tenth of a second of the budget and at least one unit, and the
rate is (limit - capacity + 1) per minute, so that no window of a minute ever
holds more than the limit: a request needs a whole unit, so the most a window
of T seconds can hold is capacity + rate * T, strictly less than limit + 1 for
T = 60 (with one request of capacity the rate is exactly the limit). A request
of more tokens than the capacity goes when the bucket is full and leaves it in
debt, so the long-run rate still holds.

Tokens are the endpoint's own (usage.prompt_tokens of its answers), which is
what providers count: the client cannot see the endpoint's tokenizer, so a
request is charged an estimate (its characters at the ratio of tokens to
characters the endpoint reported so far; one token per three characters
before any answer) and the difference is settled when the answer says how
many it counted.

Two places keep the bucket: LocalBudget, in this process (a Kafka consumer, a
command without a database, or OUTBOXD_EMBEDDING__BUDGET_SCOPE=process); and
daemon.outbox.shared_budget.SharedBudget, one row in PostgreSQL that every daemon of
the database takes from, which the daemon gives the backend in place of its
own. Waiting on a budget is neither an attempt nor an outage: it is measured
(the embedding_budget_wait_seconds metric) and counts as progress of the work
waiting (a slow budget is not a stuck worker).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from daemon.errors import describe
from daemon.telemetry import get_metrics

log = logging.getLogger(__name__)

BURST_SECONDS = 0.1  # a bucket holds this much of its budget (at least one request, one token)
HORIZON = 1.0  # seconds ahead a request may reserve its turn; further out it asks again later
CHARS_PER_TOKEN = 3.0  # the estimate before the endpoint has reported any usage (errs towards fewer requests)
LEARNING_DECAY = 0.98  # weight of what was learned so far against each new answer's usage


@dataclass(frozen=True)
class Limit:
    """One count's budget: per_minute at most in any window of a minute."""

    per_minute: float

    @property
    def capacity(self) -> float:
        return max(1.0, self.per_minute * BURST_SECONDS / 60.0)

    @property
    def per_second(self) -> float:
        return (self.per_minute - self.capacity + 1.0) / 60.0


@dataclass(frozen=True)
class Rates:
    """The budget of one endpoint (None: no limit on that count)."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def __bool__(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    @property
    def requests(self) -> Limit | None:
        return Limit(self.requests_per_minute) if self.requests_per_minute is not None else None

    @property
    def tokens(self) -> Limit | None:
        return Limit(self.tokens_per_minute) if self.tokens_per_minute is not None else None

    def describe(self) -> str:
        parts = []
        if self.requests_per_minute is not None:
            parts.append(f"{self.requests_per_minute:g} requests/min")
        if self.tokens_per_minute is not None:
            parts.append(f"{self.tokens_per_minute:g} tokens/min")
        return ", ".join(parts) or "no limit"


class Grant(NamedTuple):
    """What one take decided: taken (the turn is this caller's once `wait`
    seconds have passed), or not (ask again after `wait`); paused: the wait is
    the endpoint's Retry-After rather than the budget; turn: when the turn is on
    the bucket's own clock (what release() is given back)."""

    taken: bool
    wait: float
    paused: bool = False
    turn: object = None


def shortfall(level: float, limit: Limit | None, cost: float) -> float:
    """Seconds until a count's level covers cost (a cost over the capacity needs a full bucket)."""
    if limit is None:
        return 0.0
    return max(0.0, min(cost, limit.capacity) - level) / limit.per_second


@dataclass
class Bucket:
    """The levels of one endpoint's budget as of `at` (seconds on some clock;
    ahead of the clock while a pause lasts: the bucket's time stands still
    until it ends); what the shared row holds, and what a LocalBudget keeps in
    memory. The named queries embedding_budget_take, _pause and _release do the
    same arithmetic in SQL."""

    requests: float
    tokens: float
    at: float
    paused_until: float = -math.inf

    @classmethod
    def full(cls, rates: Rates, now: float) -> "Bucket":
        return cls(
            rates.requests.capacity if rates.requests else 0.0, rates.tokens.capacity if rates.tokens else 0.0, now
        )

    def refill(self, rates: Rates, now: float) -> None:
        """Both counts grow by the time elapsed since `at`, up to their capacity; `at` never goes back."""
        elapsed = max(0.0, now - self.at)
        if rates.requests:
            self.requests = min(rates.requests.capacity, self.requests + rates.requests.per_second * elapsed)
        if rates.tokens:
            self.tokens = min(rates.tokens.capacity, self.tokens + rates.tokens.per_second * elapsed)
        self.at = max(self.at, now)

    def take(self, rates: Rates, tokens: float, now: float, horizon: float = HORIZON) -> Grant:
        self.refill(rates, now)
        ahead = self.at - now  # a pause: no turn before it ends
        need = max(shortfall(self.requests, rates.requests, 1.0), shortfall(self.tokens, rates.tokens, tokens))
        wait = ahead + need
        is_pause = self.paused_until > now and ahead >= need
        if wait > horizon:  # asks again when its turn is well within reach
            return Grant(False, wait - horizon / 2, is_pause, self.at + need)
        if rates.requests:
            self.requests -= 1.0
        if rates.tokens:
            self.tokens -= tokens
        return Grant(True, wait, is_pause, self.at + need)

    def pause(self, rates: Rates, now: float, seconds: float) -> None:
        """No turn before now + seconds. The bucket keeps what it held when the
        pause began and gains nothing while it lasts, so the turns after it are
        spaced at the rate again instead of all going the moment it ends."""
        self.refill(rates, now)
        self.paused_until = max(self.paused_until, now + seconds)
        self.at = max(self.at, self.paused_until)

    def release(self, rates: Rates, tokens: float, turn: float) -> bool:
        """A turn reserved for `turn` that a pause now covers is given back (its
        request and tokens return to the bucket) to be taken again after the
        pause, in its place among the others; whether it was."""
        if self.paused_until <= turn:
            return False
        if rates.requests:
            self.requests = min(rates.requests.capacity, self.requests + 1.0)
        if rates.tokens:
            self.tokens = min(rates.tokens.capacity, self.tokens + tokens)
        return True

    def settle(self, rates: Rates, tokens: float) -> None:
        """Charge tokens more (fewer, when negative) than were taken."""
        if rates.tokens:
            self.tokens = min(rates.tokens.capacity, self.tokens - tokens)


class Ticket(NamedTuple):
    """A request's admission: the tokens charged for it, and the seconds it waited."""

    chars: int
    tokens: int
    waited: float


@dataclass
class TokenEstimate:
    """Tokens per character as the endpoint counts them, learned from its answers."""

    chars: float = 0.0
    tokens: float = 0.0

    def of(self, chars: int) -> int:
        ratio = self.tokens / self.chars if self.chars > 0 and self.tokens > 0 else 1.0 / CHARS_PER_TOKEN
        return max(1, math.ceil(chars * ratio))

    def learn(self, chars: int, tokens: int) -> None:
        if chars > 0 and tokens > 0:
            self.chars = self.chars * LEARNING_DECAY + chars
            self.tokens = self.tokens * LEARNING_DECAY + tokens


class Budget(ABC):
    """One endpoint's budget (see the module). A subclass keeps the bucket:
    take(), pause(), release() and settle() are its operations."""

    scope: str  # "process" or "database", for the metric and the logs

    def __init__(self, endpoint: str, rates: Rates) -> None:
        self.endpoint = endpoint  # what the budget is kept for: the endpoint's URL and model
        self.rates = rates
        self.estimate = TokenEstimate()
        # called while a request waits for its turn: the owner marks its work in progress
        self.progress: Callable[[], None] | None = None

    @abstractmethod
    async def take(self, tokens: int) -> Grant:
        """One request's turn, with `tokens` tokens (see Bucket.take)."""

    @abstractmethod
    async def pause(self, seconds: float) -> None:
        """The endpoint answered 429 with Retry-After `seconds` (0: none): no turn before then."""

    @abstractmethod
    async def release(self, grant: Grant, tokens: int) -> bool:
        """Give back the turn of `grant` (with `tokens` tokens) if a pause now
        covers it (see Bucket.release); whether it was given back."""

    @abstractmethod
    async def settle(self, tokens: int) -> None:
        """Charge `tokens` more than the estimate taken (fewer, when negative)."""

    async def admit(self, texts: list[str]) -> Ticket:
        """Wait for the turn of one request of these texts; its cost is taken."""
        chars = sum(len(t) for t in texts)
        tokens = self.estimate.of(chars) if self.rates.tokens else 0
        waited = 0.0
        while True:
            grant = await self.take(tokens)
            if grant.wait > 0:
                waited += await self._sleep(grant)
            # a turn reserved ahead: a pause may have begun meanwhile (another worker's 429); then the turn is
            # given back and taken again after it, spaced from the others, rather than all going when it ends
            if grant.taken and not (grant.wait > 0 and await self.release(grant, tokens)):
                return Ticket(chars, tokens, waited)

    async def answered(self, ticket: Ticket, prompt_tokens: int | None) -> None:
        """The endpoint answered the request of `ticket`, counting `prompt_tokens`
        (None: it did not say): the estimate learns, and the bucket is settled."""
        if prompt_tokens is None:
            return
        self.estimate.learn(ticket.chars, prompt_tokens)
        if self.rates.tokens and prompt_tokens != ticket.tokens:
            try:
                await self.settle(prompt_tokens - ticket.tokens)
            except Exception as exc:  # noqa: BLE001 - the vectors are good; the bucket keeps the estimate
                log.warning("cannot settle the embedding budget's tokens; the estimate stands",
                            extra={"endpoint": self.endpoint, "error": describe(exc)})

    async def _sleep(self, grant: Grant) -> float:
        if self.progress is not None:
            self.progress()
        started = time.monotonic()
        try:
            await asyncio.sleep(grant.wait)  # paced: the budget's next turn (a rate, not a retry)
        finally:
            waited = time.monotonic() - started
            reason = "retry_after" if grant.paused else "budget"
            get_metrics().embedding_budget_wait_seconds.add(waited, {"reason": reason, "scope": self.scope})
        return waited


class LocalBudget(Budget):
    """The bucket in this process's memory: a budget for this process alone.
    share: whether a process with a database should use the database's
    instead (OUTBOXD_EMBEDDING__BUDGET_SCOPE=database, the default)."""

    scope = "process"

    def __init__(self, endpoint: str, rates: Rates, *, share: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(endpoint, rates)
        self.share = share
        self._clock = clock
        self.bucket = Bucket.full(rates, clock())
        self.rate_limited = 0  # 429s this process was answered

    async def take(self, tokens: int) -> Grant:
        return self.bucket.take(self.rates, tokens, self._clock())

    async def pause(self, seconds: float) -> None:
        self.rate_limited += 1
        self.bucket.pause(self.rates, self._clock(), seconds)

    async def release(self, grant: Grant, tokens: int) -> bool:
        return self.bucket.release(self.rates, tokens, grant.turn)

    async def settle(self, tokens: int) -> None:
        self.bucket.settle(self.rates, tokens)
