"""The embedding budget every daemon of one database shares: the bucket of
daemon.embedding.token_bucket kept in one row of outboxd.embedding_budget per
endpoint (its URL and model), taken from by each request in one short
statement (embedding_budget_take: the row is locked for that statement only,
never across a request), paused by any daemon's 429 for all of them (a turn
reserved before the pause is given back and taken again after it:
embedding_budget_release).

The daemon owns the pool, so it makes this budget and gives it to the backend
in place of the backend's own (share()); the backend never sees PostgreSQL.
The bucket's time is the database server's clock, the same for every daemon.

When PostgreSQL cannot be reached, a take fails as an outage of PostgreSQL:
the daemon retries its batch as for any outage (it could not acknowledge it
either), nothing is counted against the events.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from psycopg_pool import AsyncConnectionPool

from daemon.embedding.backend import Backend
from daemon.embedding.token_bucket import HORIZON, Budget, Grant, LocalBudget, Rates
from db.coordination import CoordinationRepository, SharedBucket

log = logging.getLogger(__name__)


class SharedBudget(Budget):
    scope = "database"

    def __init__(self, pool: AsyncConnectionPool, endpoint: str, rates: Rates, *, horizon: float = HORIZON) -> None:
        super().__init__(endpoint, rates)
        self.pool = pool
        self.db = CoordinationRepository(pool)
        requests, tokens = rates.requests, rates.tokens
        # what every statement on the endpoint's row is given: its key, and the bucket's shape
        self.bucket = SharedBucket(
            endpoint,
            request_rate=requests.per_second if requests else None,
            request_capacity=requests.capacity if requests else None,
            token_rate=tokens.per_second if tokens else None,
            token_capacity=tokens.capacity if tokens else None,
            horizon=horizon,
        )

    async def open(self) -> None:
        """The endpoint's row, made full if no daemon made it yet."""
        await self.db.open_budget(self.bucket)

    async def take(self, tokens: int) -> Grant:
        row = await self.db.take_budget(self.bucket, tokens)
        if row is None:  # the row went (deleted by hand, or an unlogged table emptied by a crash): a full one
            await self.open()
            row = await self.db.take_budget(self.bucket, tokens)
            assert row is not None
        # the turn stays the server's timestamp: compared with the pause's end there, exactly
        return Grant(bool(row["taken"]), float(row["wait_seconds"]), bool(row["paused"]), row["turn"])

    async def pause(self, seconds: float) -> None:
        await self.db.pause_budget(self.bucket, seconds)

    async def release(self, grant: Grant, tokens: int) -> bool:
        return await self.db.release_budget_turn(self.bucket, tokens, grant.turn)

    async def settle(self, tokens: int) -> None:
        await self.db.settle_budget(self.bucket, tokens)


async def share(backend: Backend, pool: AsyncConnectionPool, *,
                progress: Callable[[], None] | None = None) -> Budget | None:
    """Give the backend the budget its database keeps for every daemon, in place
    of its own, where it has one with limits and its scope is the database
    (OUTBOXD_EMBEDDING__BUDGET_SCOPE); the budget it uses then. progress is
    called while a request waits for its turn (the daemon's heartbeat)."""
    own = backend.budget
    if own is None:
        return None
    budget: Budget = own
    if own.rates and isinstance(own, LocalBudget) and own.share:
        shared = SharedBudget(pool, own.endpoint, own.rates)
        await shared.open()
        backend.budget = budget = shared
        log.info("embedding budget shared by the daemons of this database",
                 extra={"endpoint": own.endpoint, "budget": own.rates.describe()})
    budget.progress = progress
    return budget
