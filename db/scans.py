"""The long scans of the chunks in id order (reconcile, the verifier's ranges,
a reindex's build, a backfill): keyset pages of chunk states, how many chunks a
scope holds, and a scan's checkpoint in outboxd.scan_progress.

Each method runs one named query of sql/queries.sql in its own short
autocommit statement; a page is read, never held in a transaction.
"""
from __future__ import annotations

from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from db.gateway import fetch


class ScanRepository:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    # --- chunks --------------------------------------------------------------------------
    async def chunk_page(self, after: UUID | None, limit: int, *, source_id: UUID | None = None,
                         document_id: UUID | None = None) -> list[dict]:
        """Up to `limit` chunk states with ids after `after` (None: from the lowest),
        in id order, within the scope (reconcile_chunks)."""
        return await fetch(self.pool, "reconcile_chunks", after=after, limit=limit, source_id=source_id,
                           document_id=document_id)

    async def count_chunks(self, *, source_id: UUID | None = None, document_id: UUID | None = None) -> int:
        """How many chunks the scope holds (a full count: for a progress bar)."""
        return (await fetch(self.pool, "count_chunks", source_id=source_id, document_id=document_id))[0]["n"]

    # --- a job's checkpoint --------------------------------------------------------------
    async def progress(self, job: str) -> dict | None:
        """The job's checkpoint (last_chunk_id, done, completed_at, ...); None: never started."""
        return next(iter(await fetch(self.pool, "scan_progress", job=job)), None)

    async def reset(self, job: str) -> None:
        await fetch(self.pool, "scan_progress_reset", job=job)

    async def save(self, job: str, last_chunk_id: UUID, done: int) -> None:
        """Move the checkpoint to last_chunk_id, `done` more chunks done."""
        await fetch(self.pool, "scan_progress_save", job=job, last_chunk_id=last_chunk_id, done=done)

    async def complete(self, job: str) -> None:
        await fetch(self.pool, "scan_progress_complete", job=job)
