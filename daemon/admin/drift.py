"""Prove that a collection matches PostgreSQL, and find what does not.

Both sides are streamed in chunk-id order — keyset pages of the chunk_state
view, and Qdrant's scroll, which returns points ordered by id — and merged,
so memory stays flat however many chunks there are. Each pair is judged by
daemon.core.plan, the decision the apply core carries out, on the same small
keys of the point (a deep check reads whole payloads, text and metadata
included). Each difference is one of:

- missing      a chunk with text has no point
- orphaned     a point has no chunk (or its chunk's text is empty)
- stale        the point's content_hash or payload differs from the chunk's state
- wrong_model  the point was written under another model fingerprint

A running daemon may be applying a change while the scan passes it, so each
candidate is confirmed before it is reported: a chunk with an event still
pending is "in flight", not drift; the rest are read again from both sides and
reported only if they still differ.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from psycopg_pool import AsyncConnectionPool
from qdrant_client import AsyncQdrantClient, models

from daemon.core.chunk_state import METADATA_HASH, ChunkState
from daemon.core.plan import POINT_KEYS, plan
from daemon.errors import InvalidChunkError
from daemon.outbox.queue import read_chunk_states
from db.gateway import fetch

KINDS = ("missing", "orphaned", "stale", "wrong_model")
# Points per scroll request. A Qdrant server pages through an index; qdrant-client's
# local mode sorts every point and walks to the offset on each request, so with it
# fewer, larger pages are far faster (at the cost of holding one page in memory).
SERVER_QDRANT_PAGE = 4096
LOCAL_QDRANT_PAGE = 25_000
EXAMPLES = 5
CONFIRM_BATCH = 256

# Given the confirmed drift {chunk id: kind}, fix it; returns how many were handled.
Repair = Callable[[dict[UUID, str]], Awaitable[int]]


@dataclass(frozen=True)
class Scope:
    source_id: UUID | None = None
    document_id: UUID | None = None

    def sql(self) -> dict[str, Any]:
        return {"source_id": self.source_id, "document_id": self.document_id}

    def qdrant_filter(self) -> models.Filter | None:
        must = [
            models.FieldCondition(key=key, match=models.MatchValue(value=str(value)))
            for key, value in (("source_id", self.source_id), ("document_id", self.document_id))
            if value is not None
        ]
        return models.Filter(must=must) if must else None


@dataclass
class ReconcileReport:
    collection: str
    model_id: str
    scope: dict[str, Any]
    chunks: int = 0
    points: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    examples: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    in_flight: int = 0
    repaired: int = 0
    seconds: float = 0.0

    @property
    def drift(self) -> int:
        return sum(self.counts.values())

    def record(self, chunk_id: UUID, kind: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(str(chunk_id))

    def as_dict(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "model_id": self.model_id,
            "scope": {k: str(v) for k, v in self.scope.items() if v is not None},
            "chunks": self.chunks,
            "points": self.points,
            "drift": self.drift,
            "counts": self.counts,
            "examples": self.examples,
            "in_flight": self.in_flight,
            "repaired": self.repaired,
            "seconds": round(self.seconds, 3),
            "chunks_per_second": round(self.chunks / self.seconds, 1) if self.seconds else None,
        }


def classify(state: ChunkState | None, payload: dict[str, Any] | None, model_id: str) -> str | None:
    """The kind of drift between a chunk and its point, or None if they agree."""
    try:
        return plan(state, payload, model_id).drift
    except InvalidChunkError:  # the daemon cannot write this chunk; its dead letter says why
        return "missing" if payload is None else "stale"


class Reconciler:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        qdrant: AsyncQdrantClient,
        collection: str,
        model_id: str,
        *,
        scope: Scope = Scope(),
        page_size: int = 2000,
        qdrant_page_size: int = SERVER_QDRANT_PAGE,
        trust_pending: bool = True,
        deep: bool = False,
    ) -> None:
        self.pool = pool
        self.qdrant = qdrant
        self.collection = collection
        self.model_id = model_id
        self.scope = scope
        self.page_size = page_size
        self.qdrant_page_size = qdrant_page_size
        # A pending event means the daemon will fix the chunk in *its* collection;
        # a reindex building another collection cannot count on that.
        self.trust_pending = trust_pending
        # what is read of each point: the keys the apply core plans with, or (deep) the
        # whole payload, so a text or metadata edited by hand behind outboxd's back shows too
        self.point_keys: list[str] | bool = True if deep else POINT_KEYS

    async def count_chunks(self) -> int:
        return await count_chunks(self.pool, self.scope)

    async def run(self, repair: Repair | None = None, progress: Callable[[int], None] | None = None) -> ReconcileReport:
        started = time.perf_counter()
        report = ReconcileReport(self.collection, self.model_id, self.scope.sql())
        candidates: dict[UUID, str] = {}
        chunks = self._chunks()
        points = self._points()
        chunk = await anext(chunks, None)
        point = await anext(points, None)
        # ids compare as their canonical strings: PostgreSQL's uuid order and Qdrant's are
        # both the order of the 128-bit value, which lower-case hex keeps
        while chunk is not None or point is not None:
            if point is None or (chunk is not None and chunk[0] < point[0]):
                pid, kind = chunk[0], classify(chunk[1], None, self.model_id)
                chunk, report.chunks = await anext(chunks, None), report.chunks + 1
                if progress:
                    progress(1)
            elif chunk is None or point[0] < chunk[0]:
                pid, kind = point[0], classify(None, point[1], self.model_id)
                point, report.points = await anext(points, None), report.points + 1
            else:
                pid, kind = chunk[0], classify(chunk[1], point[1], self.model_id)
                chunk, report.chunks = await anext(chunks, None), report.chunks + 1
                point, report.points = await anext(points, None), report.points + 1
                if progress:
                    progress(1)
            if kind is not None:
                candidates[UUID(pid)] = kind
                if len(candidates) >= CONFIRM_BATCH:
                    await self._confirm(candidates, report, repair)
                    candidates = {}
        if candidates:
            await self._confirm(candidates, report, repair)
        report.seconds = time.perf_counter() - started
        return report

    async def _chunks(self) -> AsyncIterator[tuple[str, ChunkState]]:
        after = None
        while True:
            rows = await fetch(self.pool, "reconcile_chunks", after=after, limit=self.page_size, **self.scope.sql())
            for row in rows:
                state = ChunkState.from_row(row)
                yield str(state.chunk_id), state
            if len(rows) < self.page_size:
                return
            after = rows[-1]["chunk_id"]

    async def _points(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        offset, previous = None, ""
        while True:
            batch, offset = await self.qdrant.scroll(
                self.collection,
                scroll_filter=self.scope.qdrant_filter(),
                limit=self.qdrant_page_size,
                offset=offset,
                with_payload=self.point_keys,
                with_vectors=False,
            )
            for p in batch:
                pid = p.id if isinstance(p.id, str) else str(UUID(int=p.id))
                if pid <= previous:
                    raise RuntimeError(
                        f"Qdrant scrolled {pid} after {previous}: points are not in id order, so a "
                        "streaming comparison is impossible against this Qdrant"
                    )
                previous = pid
                yield pid, p.payload or {}
            if offset is None:
                return

    async def _confirm(self, candidates: dict[UUID, str], report: ReconcileReport, repair: Repair | None) -> None:
        """Keep only drift that is real now: read both sides again, twice, and
        skip chunks with a pending event (the daemon has not applied it yet).
        Pending events are read after the two sides, so a change that commits
        during the check is either seen pending or seen applied."""
        drift, in_flight = await self._still_drifted(candidates)
        if drift:
            drift, again = await self._still_drifted(drift)
            in_flight |= again
        report.in_flight += len(in_flight)
        for cid, kind in drift.items():
            report.record(cid, kind)
        if drift and repair is not None:
            stale = [str(cid) for cid, kind in drift.items() if kind == "stale"]
            if stale:  # a hash that may no longer describe the payload: the repair rewrites it whole
                await self.qdrant.delete_payload(self.collection, keys=[METADATA_HASH], points=stale, wait=True)
            report.repaired += await repair(drift)

    async def _still_drifted(self, candidates: dict[UUID, str]) -> tuple[dict[UUID, str], set[UUID]]:
        ids = list(candidates)
        states = await read_chunk_states(self.pool, ids)
        records = await self.qdrant.retrieve(self.collection, [str(i) for i in ids], with_payload=self.point_keys)
        pending = {r["chunk_id"] for r in await fetch(self.pool, "pending_chunks", chunk_ids=ids)}
        payloads = {UUID(str(r.id)): r.payload or {} for r in records}
        drift: dict[UUID, str] = {}
        in_flight: set[UUID] = set()
        for cid in ids:
            kind = classify(states.get(cid), payloads.get(cid), self.model_id)
            if kind is None:
                continue
            if cid in pending and self.trust_pending:
                in_flight.add(cid)
            else:
                drift[cid] = kind
        return drift, in_flight


async def count_chunks(pool: AsyncConnectionPool, scope: Scope = Scope()) -> int:
    """For progress bars: how many chunks a scan of this scope will pass."""
    return (await fetch(pool, "count_chunks", **scope.sql()))[0]["n"]


def enqueue_repair(pool: AsyncConnectionPool) -> Repair:
    """Repair through the normal path: one outbox event per drifted chunk, which
    the daemon applies (re-embedding, re-payloading or deleting as needed)."""

    async def repair(drift: dict[UUID, str]) -> int:
        return len(await fetch(pool, "enqueue_chunks", chunk_ids=list(drift)))

    return repair
