"""The outbox as outboxd's processes use it: claim, renew, acknowledge, fail
and release events; read the chunks' current state; enqueue repairs and
backfills; the backlog; the relay's versions; the LISTEN wake-up.

Each method runs one named query of sql/queries.sql in its own short
autocommit statement, never across embedding or a Qdrant call. Rows come back
as dicts: what they mean is the daemon's (daemon.outbox.queue).
"""
from __future__ import annotations

from collections.abc import Mapping
from uuid import UUID

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from db.gateway import fetch

CHANNEL = "outboxd"  # the channel the migrations' notify_outbox() sends on
LISTEN = f"LISTEN {CHANNEL}"


async def listen(conn: AsyncConnection) -> None:
    """Subscribe this (dedicated, autocommit) connection to the outbox's wake-ups."""
    await conn.execute(LISTEN)


class OutboxRepository:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    # --- a worker's claims -------------------------------------------------------------
    async def claim(self, worker: str, batch_size: int, lease_seconds: float) -> list[dict]:
        """Lease up to batch_size claimable events, oldest first, each with its chunk's
        state on the chunk's first event (claim_batch)."""
        return await fetch(self.pool, "claim_batch", worker=worker, batch_size=batch_size,
                           lease_seconds=lease_seconds)

    async def renew_lease(self, worker: str, event_ids: list[int], lease_seconds: float) -> None:
        await fetch(self.pool, "renew_lease", worker=worker, event_ids=event_ids, lease_seconds=lease_seconds)

    async def ack_verified(self, worker: str, event_ids: list[int], written: Mapping[UUID, str | None],
                           collection: str | None) -> dict:
        """Acknowledge the events of chunks whose state is still what was written
        (written: chunk id -> state hash, None for a gone chunk); the row holds
        acked, released, and live (False: the catalog no longer calls `collection`
        live, and nothing was acknowledged)."""
        (row,) = await fetch(self.pool, "ack_verified", worker=worker, event_ids=event_ids,
                             chunk_ids=list(written), state_hashes=list(written.values()), collection=collection)
        return row

    async def fail(self, worker: str, event_ids: list[int], error: str, *, max_attempts: int,
                   backoff: Mapping[str, float]) -> list[dict]:
        """Count a failed attempt (backoff: the policy's sql_params()); the events'
        id, chunk_id, status (pending or dead) and attempts."""
        return await fetch(self.pool, "fail_events", worker=worker, event_ids=event_ids, error=error,
                           max_attempts=max_attempts, **backoff)

    async def release(self, worker: str, event_ids: list[int]) -> None:
        await fetch(self.pool, "release_events", worker=worker, event_ids=event_ids)

    # --- chunks ------------------------------------------------------------------------
    async def chunk_states(self, chunk_ids: list[UUID]) -> list[dict]:
        """The current state of each of these chunks that exists."""
        return await fetch(self.pool, "chunk_states", chunk_ids=chunk_ids)

    async def pending_chunks(self, chunk_ids: list[UUID]) -> set[UUID]:
        """Which of these chunks have an event waiting."""
        return {r["chunk_id"] for r in await fetch(self.pool, "pending_chunks", chunk_ids=chunk_ids)}

    async def enqueue_chunks(self, chunk_ids: list[UUID], *, while_live: str | None = None) -> int:
        """An event per chunk; given a collection, only while the catalog calls it
        live (none otherwise). How many were enqueued."""
        return len(await fetch(self.pool, "enqueue_chunks", chunk_ids=chunk_ids, collection=while_live))

    async def backfill_page(self, job: str, after: UUID | None, limit: int, *, source_id: UUID | None,
                            document_id: UUID | None) -> dict:
        """One page of a backfill: an event for each chunk after `after` with none
        pending, and the job's checkpoint moved, in one statement (scanned, last_id,
        enqueued)."""
        (row,) = await fetch(self.pool, "backfill_page", job=job, after=after, limit=limit, source_id=source_id,
                             document_id=document_id)
        return row

    # --- the backlog -------------------------------------------------------------------
    async def pending_summary(self) -> dict:
        """pending, next_at (when the next pending event becomes claimable) and db_now."""
        return (await fetch(self.pool, "pending_summary"))[0]

    async def backlog(self) -> dict:
        """pending and oldest_age_seconds, by the database clock."""
        return (await fetch(self.pool, "backlog"))[0]

    # --- the relay ---------------------------------------------------------------------
    async def relay_versions(self, chunk_ids: list[UUID]) -> dict[UUID, int]:
        """A fresh version per chunk, drawn after its state was read (for a chunk
        without one in chunk_versions: the state read gives every other its version)."""
        return {r["chunk_id"]: r["version"] for r in await fetch(self.pool, "relay_versions", chunk_ids=chunk_ids)}
