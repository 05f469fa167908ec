"""What the operator and a reader read from PostgreSQL, by what it is for:
OperatorReads (what `outboxd status` shows) and SearchReads (hybrid search's
PostgreSQL side). Read-only; each method is one named query on a connection
from the pool (its own short autocommit statement)."""
from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from db.capture import read_capture_mode
from db.catalog import CatalogRepository
from db.gateway import fetch


class OperatorReads:
    """The outbox, the leases, the connected processes, the catalog and the verifier,
    as `outboxd status` reports them. A table or column missing (a schema from
    before `outboxd migrate`) raises psycopg's UndefinedTable or UndefinedColumn."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def outbox(self) -> dict[str, Any]:
        """The outbox at a glance (backlog, lag, leases, backoff, dead letters) and the database's now (db_now)."""
        return (await fetch(self.pool, "status_outbox"))[0]

    async def leases(self) -> list[dict[str, Any]]:
        """Live leases by worker: events held, and when the first and the last end."""
        return await fetch(self.pool, "status_leases")

    async def processes(self) -> list[dict[str, Any]]:
        """outboxd processes connected now, by worker name (their LISTEN and the CLI's connections aside)."""
        return await fetch(self.pool, "status_processes")

    async def catalog(self) -> list[dict[str, Any]]:
        """Every collection the catalog records, of every alias, oldest first per alias."""
        return await CatalogRepository(self.pool).records()

    async def verifier(self, collection: str) -> dict[str, Any] | None:
        """The continuous verifier's row of this collection (alias), None before any daemon verified it."""
        rows = await fetch(self.pool, "verify_status", collection=collection)
        return rows[0] if rows else None

    async def capture_mode(self) -> str | None:
        """db.capture's mode now; None on a schema from before capture modes."""
        return await read_capture_mode(self.pool)


class SearchReads:
    """Hybrid search's PostgreSQL side: the keyword candidates, and what the fused
    candidates hold now. Both take the same restriction (None: no restriction):
    a source, a document, a document_type, and metadata as a nested object the
    chunk's metadata must contain."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def keyword_candidates(self, text: str, *, limit: int, **restriction: Any) -> list[tuple[UUID, float]]:
        """The best `limit` full-text matches of `text` (websearch syntax), with their ts_rank, best first."""
        rows = await fetch(self.pool, "search_keyword", query=text, limit=limit, **_restriction(**restriction))
        return [(r["chunk_id"], float(r["rank"])) for r in rows]

    async def current_chunks(self, chunk_ids: list[UUID], **restriction: Any) -> dict[UUID, dict[str, Any]]:
        """What PostgreSQL holds now for these chunks, by chunk id: a chunk deleted, emptied or
        outside the restriction is left out."""
        if not chunk_ids:
            return {}
        rows = await fetch(self.pool, "search_hits", chunk_ids=chunk_ids, **_restriction(**restriction))
        return {r["chunk_id"]: r for r in rows}


def _restriction(*, source_id: UUID | None = None, document_id: UUID | None = None,
                 document_type: str | None = None, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"source_id": source_id, "document_id": document_id, "document_type": document_type,
            "metadata": Jsonb(metadata) if metadata else None}
