"""The outbox as its workers see it: claim, renew, read state, acknowledge, fail.

Each method is one call of db.outbox's repository (one named query in one
short autocommit transaction); this module says what its rows mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from daemon.core.batch import Target, Targets
from daemon.core.chunk_state import ChunkState
from daemon.errors import CollectionRetiredError
from daemon.runtime.backoff import Backoff
from db.outbox import OutboxRepository


async def read_targets(pool: AsyncConnectionPool, chunk_ids: list[UUID]) -> Targets:
    """What each chunk must become now: its current state (None: gone) and that state's version."""
    return {r["chunk_id"]: target_of(r) for r in await OutboxRepository(pool).chunk_states(chunk_ids)}


async def read_chunk_states(pool: AsyncConnectionPool, chunk_ids: list[UUID]) -> dict[UUID, ChunkState]:
    """The current state of each chunk that exists, by id."""
    targets = await read_targets(pool, chunk_ids)
    return {cid: t.state for cid, t in targets.items() if t.state is not None}


def target_of(row: dict) -> Target:
    """A chunk's state and version, as a query row holds them (no state_hash: the chunk is gone)."""
    state = ChunkState(**{f: row[f] for f in STATE_FIELDS}) if row["state_hash"] is not None else None
    return Target(state, version=row["version"])


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    chunk_id: UUID
    op: str
    attempts: int
    created_at: datetime


STATE_FIELDS = ChunkState.__slots__


class Claim(list):
    """The events one claim took (oldest first), and what their chunks must become
    (state and version, read in the same statement; a chunk without a state is gone)."""

    def __init__(self, events: list[Event], targets: Targets) -> None:
        super().__init__(events)
        self.targets = targets


@dataclass(frozen=True, slots=True)
class PendingSummary:
    pending: int
    wait_seconds: float | None  # until the next pending event can be claimed


class Outbox:
    def __init__(
        self, pool: AsyncConnectionPool, worker: str, lease_seconds: float, collection: str | None = None
    ) -> None:
        self.pool = pool
        self.db = OutboxRepository(pool)
        self.worker = worker
        self.lease_seconds = lease_seconds
        # the physical collection this worker writes; None skips the catalog check
        self.collection = collection

    async def claim(self, batch_size: int) -> Claim:
        rows = await self.db.claim(self.worker, batch_size, self.lease_seconds)
        events, targets = [], {}
        for r in rows:
            events.append(Event(r["id"], r["chunk_id"], r["op"], r["attempts"], r["created_at"]))
            if r["nth"] == 1:  # the state and version ride on the chunk's first event only
                targets[r["chunk_id"]] = target_of(r)
        events.sort(key=lambda e: e.id)
        return Claim(events, targets)

    async def renew(self, event_ids: list[int]) -> None:
        await self.db.renew_lease(self.worker, event_ids, self.lease_seconds)

    async def targets(self, chunk_ids: list[UUID]) -> Targets:
        return await read_targets(self.pool, chunk_ids)

    async def chunk_states(self, chunk_ids: list[UUID]) -> dict[UUID, ChunkState]:
        return await read_chunk_states(self.pool, chunk_ids)

    async def ack_verified(self, event_ids: list[int], written: dict[UUID, str | None]) -> tuple[int, int]:
        """(acknowledged, released): events of chunks whose state changed since it
        was read are released to be applied again instead of acknowledged."""
        row = await self.db.ack_verified(self.worker, event_ids, written, self.collection)
        if not row["live"]:
            raise CollectionRetiredError(
                f"Qdrant collection {self.collection!r} is no longer the live collection of its alias "
                "(a reindex switched it); its events were released. Restart outboxd with the model the "
                "live collection uses (see `outboxd status`)."
            )
        return row["acked"], row["released"]

    async def fail(self, event_ids: list[int], error: str, *, max_attempts: int, backoff: Backoff) -> list[dict]:
        """Count a failed attempt: the next one after a delay drawn from backoff's
        window (in PostgreSQL, with its parameters), or a dead letter at max_attempts."""
        return await self.db.fail(self.worker, event_ids, error, max_attempts=max_attempts,
                                  backoff=backoff.sql_params())

    async def release(self, event_ids: list[int]) -> None:
        await self.db.release(self.worker, event_ids)

    async def pending(self) -> PendingSummary:
        row = await self.db.pending_summary()
        wait = None
        if row["next_at"] is not None:
            wait = max(0.0, (row["next_at"] - row["db_now"]).total_seconds())
        return PendingSummary(row["pending"], wait)
