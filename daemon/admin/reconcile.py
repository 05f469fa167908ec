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
- missing_sparse / wrong_sparse  the point lacks the sparse vector the collection
               carries, or holds one made with other BM25 settings (or one where
               none is configured); a repair writes it again with the dense vector
               it holds, embedding nothing

A running daemon may be applying a change while the scan passes it, so each
candidate is confirmed before it is reported: a chunk with an event still
pending is "in flight", not drift; the rest are read again from both sides and
reported only if they still differ.

`Reconciler.run` walks everything at once (`outboxd reconcile`);
`Reconciler.check_range` one bounded range of ids after a checkpoint (the
continuous verifier of `outboxd run`, daemon.outbox.verifier). Both merge the
two sides with merge_by_id and judge and confirm each pair the same way.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from psycopg_pool import AsyncConnectionPool
from qdrant_client import AsyncQdrantClient, models

from daemon.core.chunk_state import ChunkState, Projection
from daemon.core.plan import POINT_KEYS, plan
from daemon.core.qdrant_store import QdrantStore
from daemon.errors import CollectionRetiredError
from daemon.outbox.queue import read_chunk_states
from db.outbox import OutboxRepository
from db.scans import ScanRepository

KINDS = ("missing", "orphaned", "stale", "wrong_model", "missing_sparse", "wrong_sparse")
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


def classify(state: ChunkState | None, payload: dict[str, Any] | None, projection: Projection) -> str | None:
    """The kind of drift between a chunk and its point, or None if they agree (plan()'s
    drift; a chunk no point can be made of is drift too, which its dead letter explains)."""
    return plan(state, payload, projection).drift


async def merge_by_id(
    chunks: AsyncIterable[tuple[str, ChunkState]], points: AsyncIterable[tuple[str, dict[str, Any]]]
) -> AsyncIterator[tuple[str, ChunkState | None, dict[str, Any] | None]]:
    """Merge the two sides, each in ascending id order, into (id, chunk state,
    point payload) with None for the side that has no such id.

    Ids compare as their canonical strings: PostgreSQL's uuid order and Qdrant's
    are both the order of the 128-bit value, which lower-case hex keeps."""
    chunk_iter, point_iter = aiter(chunks), aiter(points)
    chunk = await anext(chunk_iter, None)
    point = await anext(point_iter, None)
    while chunk is not None or point is not None:
        if point is None or (chunk is not None and chunk[0] < point[0]):
            yield chunk[0], chunk[1], None
            chunk = await anext(chunk_iter, None)
        elif chunk is None or point[0] < chunk[0]:
            yield point[0], None, point[1]
            point = await anext(point_iter, None)
        else:
            yield chunk[0], chunk[1], point[1]
            chunk = await anext(chunk_iter, None)
            point = await anext(point_iter, None)


async def _each(items: Iterable) -> AsyncIterator:
    for item in items:
        yield item


def range_end(chunk_ids: list[str], more_chunks: bool, point_ids: list[str], more_points: bool) -> str | None:
    """The last id of a range after a checkpoint, given what one read of each side
    returned (ascending ids after the checkpoint, and whether that side may hold
    more): the lower of the last ids read of the sides that may hold more, since
    both sides are known completely up to it. None: both sides were read to
    their end, and the range runs to the highest id (the pass is complete)."""
    ends = [ids[-1] for ids, more in ((chunk_ids, more_chunks), (point_ids, more_points)) if more and ids]
    return min(ends) if ends else None


def bound_range(chunks: list[tuple[str, Any]], more_chunks: bool, points: list[tuple[str, Any]], more_points: bool,
                ) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]], str | None]:
    """(the chunks, the points, the end) of one range, from one read of each side:
    what was read past the end is left for the next range, which reads it again."""
    end = range_end([c[0] for c in chunks], more_chunks, [p[0] for p in points], more_points)
    if end is None:
        return chunks, points, None
    return [c for c in chunks if c[0] <= end], [p for p in points if p[0] <= end], end


@dataclass
class RangeCheck:
    """One checked range of ids: (after, end], end None meaning to the highest id."""

    after: UUID | None
    end: UUID | None
    report: ReconcileReport

    @property
    def complete(self) -> bool:
        """The range reached the highest id: a pass that took it is complete."""
        return self.end is None


class Reconciler:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        qdrant: AsyncQdrantClient,
        collection: str,
        projection: Projection,
        *,
        scope: Scope = Scope(),
        page_size: int = 2000,
        qdrant_page_size: int = SERVER_QDRANT_PAGE,
        trust_pending: bool = True,
        deep: bool = False,
    ) -> None:
        self.pool = pool
        self.scans = ScanRepository(pool)
        self.outbox = OutboxRepository(pool)
        self.qdrant = qdrant
        self.collection = collection
        self.projection = projection  # what each point must hold beside its chunk (QdrantStore.projection)
        self.model_id = projection.model_id
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
        await self._judge(merge_by_id(self._chunks(), self._points()), report, repair, progress)
        report.seconds = time.perf_counter() - started
        return report

    async def check_range(self, after: UUID | None, size: int, repair: Repair | None = None) -> RangeCheck:
        """Check the ids after `after` (None: from the lowest) up to a bounded end:
        at most `size` chunks and about as many points, each side read once (one
        keyset page, one scroll from `after`), so neither many chunks nor many
        orphan points make one range large. The next range starts after its end."""
        started = time.perf_counter()
        rows = await self.scans.chunk_page(after, size, **self.scope.sql())
        chunks = [(str(state.chunk_id), state) for state in map(ChunkState.from_row, rows)]
        points, more_points = await self._points_after(after, size)
        chunks, points, end = bound_range(chunks, len(rows) == size, points, more_points)
        report = ReconcileReport(self.collection, self.model_id, self.scope.sql())
        await self._judge(merge_by_id(_each(chunks), _each(points)), report, repair)
        report.seconds = time.perf_counter() - started
        return RangeCheck(after, UUID(end) if end is not None else None, report)

    async def _judge(self, pairs: AsyncIterator[tuple[str, ChunkState | None, dict[str, Any] | None]],
                     report: ReconcileReport, repair: Repair | None,
                     progress: Callable[[int], None] | None = None) -> None:
        """Judge each merged pair by the plan, and confirm (and repair) the drift in batches."""
        candidates: dict[UUID, str] = {}
        async for pid, state, payload in pairs:
            if state is not None:
                report.chunks += 1
                if progress:
                    progress(1)
            if payload is not None:
                report.points += 1
            kind = classify(state, payload, self.projection)
            if kind is not None:
                candidates[UUID(pid)] = kind
                if len(candidates) >= CONFIRM_BATCH:
                    await self.confirm(candidates, report, repair)
                    candidates = {}
        if candidates:
            await self.confirm(candidates, report, repair)

    async def _chunks(self) -> AsyncIterator[tuple[str, ChunkState]]:
        after = None
        while True:
            rows = await self.scans.chunk_page(after, self.page_size, **self.scope.sql())
            for row in rows:
                state = ChunkState.from_row(row)
                yield str(state.chunk_id), state
            if len(rows) < self.page_size:
                return
            after = rows[-1]["chunk_id"]

    async def _points(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        offset, previous = None, ""
        while True:
            batch, offset = await self._scroll(offset, self.qdrant_page_size)
            for pid, payload in in_id_order(batch, previous):
                previous = pid
                yield pid, payload
            if offset is None:
                return

    async def _points_after(self, after: UUID | None, size: int) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
        """The points with ids after `after`, about `size` of them, and whether more follow.
        A scroll's offset is the first id it returns, so the point at `after` itself
        (checked by the range before) is read once more and dropped."""
        if after is None:
            batch, offset = await self._scroll(None, size)
            return in_id_order(batch), offset is not None
        batch, offset = await self._scroll(str(after), size + 1)
        return in_id_order(batch, str(after)), offset is not None

    async def _scroll(self, offset: str | None, limit: int) -> tuple[list, Any]:
        return await self.qdrant.scroll(
            self.collection,
            scroll_filter=self.scope.qdrant_filter(),
            limit=limit,
            offset=offset,
            with_payload=self.point_keys,
            with_vectors=False,
        )

    async def confirm(self, candidates: dict[UUID, str], report: ReconcileReport, repair: Repair | None) -> None:
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
            # a hash that may no longer describe the payload: the repair rewrites it whole
            await QdrantStore(self.qdrant, self.collection, self.collection).mark_for_rewrite(
                [str(cid) for cid, kind in drift.items() if kind == "stale"])
            report.repaired += await repair(drift)

    async def _still_drifted(self, candidates: dict[UUID, str]) -> tuple[dict[UUID, str], set[UUID]]:
        ids = list(candidates)
        states = await read_chunk_states(self.pool, ids)
        records = await self.qdrant.retrieve(self.collection, [str(i) for i in ids], with_payload=self.point_keys)
        pending = await self.outbox.pending_chunks(ids)
        payloads = {UUID(str(r.id)): r.payload or {} for r in records}
        drift: dict[UUID, str] = {}
        in_flight: set[UUID] = set()
        for cid in ids:
            kind = classify(states.get(cid), payloads.get(cid), self.projection)
            if kind is None:
                continue
            if cid in pending and self.trust_pending:
                in_flight.add(cid)
            else:
                drift[cid] = kind
        return drift, in_flight


def in_id_order(batch: list, after: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(id, payload) of each scrolled point with an id above `after`, checked to come
    in ascending order: the merge is only as right as that order."""
    out = []
    previous = after
    for p in batch:
        pid = p.id if isinstance(p.id, str) else str(UUID(int=p.id))
        if pid == after:
            continue
        if pid <= previous:
            raise RuntimeError(
                f"Qdrant scrolled {pid} after {previous}: points are not in id order, so a "
                "streaming comparison is impossible against this Qdrant"
            )
        previous = pid
        out.append((pid, p.payload or {}))
    return out


async def count_chunks(pool: AsyncConnectionPool, scope: Scope = Scope()) -> int:
    """For progress bars: how many chunks a scan of this scope will pass."""
    return await ScanRepository(pool).count_chunks(**scope.sql())


def enqueue_repair(pool: AsyncConnectionPool, while_live: str | None = None) -> Repair:
    """Repair through the normal path: one outbox event per drifted chunk, which
    the daemon applies (re-embedding, re-payloading or deleting as needed).
    while_live: only while the catalog calls this collection live, else
    CollectionRetiredError (a reindex switched it; the verifier's case)."""
    outbox = OutboxRepository(pool)

    async def repair(drift: dict[UUID, str]) -> int:
        enqueued = await outbox.enqueue_chunks(list(drift), while_live=while_live)
        if drift and not enqueued:
            raise CollectionRetiredError(
                f"Qdrant collection {while_live!r} is no longer the live collection of its alias (a reindex "
                "switched it); the verifier stopped repairing it. Restart outboxd with the model the live "
                "collection uses (see `outboxd status`)."
            )
        return enqueued

    return repair
