"""Move an alias to a collection built with another model, with no read downtime.

1. build   the new collection from PostgreSQL, page by page in chunk-id order,
           with a checkpoint (resumable); the running daemon keeps the live
           collection current meanwhile
2. catch up reconcile the new collection against PostgreSQL and apply what
           changed during the build, until a round finds nothing
3. writers the catalog makes the new collection live: running daemons of the
           old model stop acknowledging (their events wait for the new model)
4. catch up once more, for what the old daemons acknowledged before step 3
5. verify  reconcile: no drift beyond events still pending
6. readers the Qdrant alias moves to the new collection in one atomic operation

The old collection stays, retired, for `outboxd reindex --rollback`, which is a
reindex back to it (a catch-up, since it is already built).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4

from psycopg_pool import AsyncConnectionPool
from qdrant_client import AsyncQdrantClient

from daemon.admin.reconcile import SERVER_QDRANT_PAGE, Reconciler, Repair
from daemon.admin.scan import CheckpointedScan
from daemon.core.apply import Applier
from daemon.core.catalog import Catalog, Home, view
from daemon.core.chunk_state import ChunkState
from daemon.core.collection_shape import CollectionShape
from daemon.core.qdrant_store import QdrantStore, physical_name, read_identity
from daemon.embedding.embedder import Embedder
from daemon.errors import ConfigError
from daemon.outbox.queue import read_chunk_states
from db.scans import ScanRepository

log = logging.getLogger(__name__)

CATCH_UP_ROUNDS = 5


@dataclass
class ReindexResult:
    alias: str
    previous: str | None
    collection: str
    model: str
    built: int = 0
    caught_up: int = 0
    rounds: int = 0
    in_flight: int = 0
    status: str = "switched"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Reindexer:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        qdrant: AsyncQdrantClient,
        alias: str,
        embedder: Embedder,
        *,
        page_size: int = 256,
        qdrant_page_size: int = SERVER_QDRANT_PAGE,
        progress: Callable[[int], None] | None = None,
        qdrant_location: str = "",
        shape: CollectionShape | None = None,
        rebuild: bool = False,
    ) -> None:
        self.shape = shape  # the [qdrant] configuration the new collection is created with
        # a new collection for the same model: what Qdrant fixes at creation (the shard number) changed
        self.rebuild = rebuild
        self.qdrant_location = qdrant_location  # where the collections live (daemon.core.qdrant_connect.location)
        self.pool = pool
        self.qdrant = qdrant
        self.alias = alias
        self.embedder = embedder
        self.page_size = page_size
        self.qdrant_page_size = qdrant_page_size
        self.progress = progress or (lambda n: None)
        self.catalog = Catalog(pool)

    async def run(self) -> ReindexResult:
        started = time.perf_counter()
        fp = self.embedder.fingerprint
        live = await self.catalog.live(self.alias)
        if live is None:
            raise ConfigError(
                f"nothing to reindex: no live collection is recorded for {self.alias!r}. Start the daemon "
                "once (`outboxd run`) to create it, or check OUTBOXD_COLLECTION"
            )
        (await view(self.qdrant, self.alias, live)).check_home(self.qdrant_location)
        target = physical_name(self.alias, fp)
        if self.rebuild:  # the same model's collection, built again under a name of its own
            target = f"{target}_{uuid4().hex[:8]}"
        result = ReindexResult(self.alias, live.name, target, str(fp))
        if live.fingerprint_id == fp.id and not self.rebuild:
            result.status = "already live"
            return result

        await self.catalog.upsert(target, self.alias, fp, "building")
        store = QdrantStore(self.qdrant, self.alias, collection=target, shape=self.shape)
        await store.create_physical(fp)
        uid = (await read_identity(self.qdrant, target))[1]
        await self.catalog.record_home(target, Home(uid, self.qdrant_location), replace=True)
        applier = Applier(self.embedder, store)
        log.info("reindex: building", extra={"collection": target, "model": str(fp)})

        result.built = await self._build(applier, f"reindex:{target}")
        # Under steady writes a round may never come back clean; the rounds after
        # the switch below take what is left.
        await self._catch_up_rounds(applier, result, trust_pending=False)
        await self.catalog.switch_live(self.alias, target)
        log.info("reindex: writers switched", extra={"collection": target, "retired": live.name})
        # From here on a pending event will be applied to the new collection by the
        # new model's daemon, so only what the old daemons acknowledged is left.
        if not await self._catch_up_rounds(applier, result, trust_pending=True):
            raise RuntimeError(f"reindex could not catch up {target!r} in {CATCH_UP_ROUNDS} rounds")

        verify = await Reconciler(self.pool, self.qdrant, target, await store.projection(fp.id),
                                  qdrant_page_size=self.qdrant_page_size).run()
        if verify.drift:
            raise RuntimeError(f"reindex verification found {verify.drift} drifted chunks: {verify.counts}")
        result.in_flight = verify.in_flight
        if verify.in_flight:
            result.notes.append(f"{verify.in_flight} chunk(s) have events pending for the new model's daemon")

        await store.point_alias()
        log.info("reindex: readers switched", extra={"alias": self.alias, "collection": target})
        result.seconds = round(time.perf_counter() - started, 3)
        return result

    async def _build(self, applier: Applier, job: str) -> int:
        """Apply every chunk to the new collection, resuming from the checkpoint."""
        scan = CheckpointedScan(self.pool, job, self.page_size)
        chunks = ScanRepository(self.pool)

        async def page(after: UUID | None, limit: int) -> tuple[int, UUID | None]:
            rows = await chunks.chunk_page(after, limit)
            if not rows:
                return 0, after
            applied = await applier.apply({r["chunk_id"]: ChunkState.from_row(r) for r in rows})
            if applied.failed:
                log.warning("reindex: chunks the daemon cannot write either", extra={"failed": len(applied.failed)})
            last = rows[-1]["chunk_id"]
            await scan.save(last, len(rows))
            return len(rows), last

        return (await scan.run(page, advance=self.progress)).scanned

    async def _catch_up_rounds(self, applier: Applier, result: ReindexResult, *, trust_pending: bool) -> bool:
        """Reconcile the new collection and apply its drift directly, until a
        round finds none (True) or the rounds run out (False). Before the switch
        pending events do not excuse drift: the old model's daemon applies them
        to the old collection, not to this one."""
        for _ in range(CATCH_UP_ROUNDS):
            result.rounds += 1
            reconciler = Reconciler(
                self.pool,
                self.qdrant,
                applier.store.collection,
                await applier.store.projection(applier.model_id),
                trust_pending=trust_pending,
                qdrant_page_size=self.qdrant_page_size,
            )
            report = await reconciler.run(self._apply_repair(applier))
            result.caught_up += report.drift
            if report.drift == 0:
                return True
        return False

    def _apply_repair(self, applier: Applier) -> Repair:
        async def repair(drift: dict[UUID, str]) -> int:
            states = await read_chunk_states(self.pool, list(drift))
            await applier.apply({cid: states.get(cid) for cid in drift})
            return len(drift)

        return repair


async def retired_collection(pool: AsyncConnectionPool, alias: str):
    """The most recently retired collection of the alias (the rollback target)."""
    retired = await Catalog(pool).retired(alias)
    return retired[0] if retired else None
