"""Backfill: an outbox event for every chunk that existed before outboxd did.

For adopting outboxd on a database that already holds data: every chunk in
scope gets an outbox event (unless one is already pending), page by page in
id order, through a checkpointed scan (daemon.admin.scan), so an interrupted
run resumes where it stopped. The daemon then applies them; chunks whose point
is already right cost a payload comparison, not an embedding.
"""
from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from daemon.admin.scan import CheckpointedScan
from db.outbox import OutboxRepository
from db.scans import ScanRepository


def job_name(source: UUID | None, document: UUID | None) -> str:
    if document:
        return f"backfill:document:{document}"
    if source:
        return f"backfill:source:{source}"
    return "backfill:all"


async def backfill(pool: AsyncConnectionPool, source: UUID | None, document: UUID | None, page_size: int,
                   restart: bool, advance: Callable[[int], None] = lambda n: None) -> dict:
    job = job_name(source, document)
    outbox = OutboxRepository(pool)
    enqueued = 0

    async def page(after: UUID | None, limit: int) -> tuple[int, UUID | None]:
        nonlocal enqueued
        row = await outbox.backfill_page(job, after, limit, source_id=source, document_id=document)
        enqueued += row["enqueued"]
        return row["scanned"], row["last_id"]

    result = await CheckpointedScan(pool, job, page_size).run(page, restart=restart, advance=advance)
    return {"job": job, "scanned": result.scanned, "enqueued": enqueued, "resumed": result.resumed,
            "already_complete": result.already_complete}


async def count_in_scope(pool: AsyncConnectionPool, source: UUID | None, document: UUID | None) -> int:
    """How many chunks a backfill of this scope passes (a full scan: for a progress bar someone watches)."""
    return await ScanRepository(pool).count_chunks(source_id=source, document_id=document)
