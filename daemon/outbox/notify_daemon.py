"""`outboxd run`, the notify transport: an outbox service whose batches go
through the apply core, so events are embedded and written to Qdrant in this
process. Its Kafka counterpart, which publishes instead, is consumers.relay.
Beside the claim loops runs the continuous verifier (daemon.outbox.verifier),
a side task, when this daemon runs as a daemon (not --drain)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from uuid import UUID, uuid4

from qdrant_client import AsyncQdrantClient

from daemon.admin.backfill import backfill
from daemon.admin.reconcile import Reconciler, enqueue_repair
from daemon.config import Settings
from daemon.core.apply import ApplyResult
from daemon.core.batch import Targets
from daemon.core.catalog import Catalog, Home
from daemon.core.qdrant_connect import location
from daemon.core.writer import QdrantWriter
from daemon.embedding.embedder import Embedder
from daemon.embedding.fingerprint import settings_for
from daemon.errors import CollectionRetiredError
from daemon.outbox.shared_budget import share
from daemon.outbox.queue import Event
from daemon.outbox.service import OutboxService
from daemon.outbox.verifier import Verifier, VerifierLease

log = logging.getLogger(__name__)

REBUILD_PAGE = 5_000  # chunks enqueued per statement when a recreated collection is rebuilt


class NotifyDaemon(OutboxService):
    result_type = ApplyResult

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        *,
        embedder: Embedder | None = None,
        qdrant: AsyncQdrantClient | None = None,
    ) -> None:
        super().__init__(settings, dsn)
        self.writer = QdrantWriter(settings, embedder=embedder, qdrant=qdrant)
        self._encode_seen = self.writer.embedder.encode_seconds
        self._continuous = asyncio.Event()  # set once run() runs as a daemon: the verifier waits for it

    async def start_sink(self) -> str | None:
        """Take the embedding budget this database keeps for every daemon (an
        endpoint's, before its probe), load the model and check that the live
        collection is this model's."""
        s = self.settings
        await share(self.writer.embedder.backend, self.pool, progress=self.heartbeat.progress)
        catalog = Catalog(self.pool)
        live = await catalog.live(s.collection)
        # Only the embedded defaults (PostgreSQL and Qdrant both under the data directory)
        # recreate a lost live collection by themselves; with configured services a
        # missing one more likely means the wrong Qdrant, and the operator decides.
        collection, uid = await self.writer.ensure_collection(
            self.until_reachable, live, recreate_missing=not s.services_configured())
        home = Home(uid or uuid4().hex, location(s))
        if live is None:
            live = await catalog.register_live(collection, s.collection, self.writer.embedder.fingerprint, home)
        if live.name != collection:  # another daemon registered another model first
            raise CollectionRetiredError(
                f"the live collection of {s.collection!r} is {live.name!r} ({live.fingerprint}), not "
                f"{collection!r}; start outboxd with the settings that make its vectors: "
                f"{settings_for(live.fingerprint)}"
            )
        if self.writer.store.recreated:
            await catalog.record_home(collection, home, replace=True)
            rebuilt = await backfill(self.pool, None, None, REBUILD_PAGE, restart=True)
            log.warning("the live collection was recreated empty; every chunk is enqueued to rebuild it",
                        extra={"collection": collection, "enqueued": rebuilt["enqueued"]})
        elif (live.qdrant_uid, live.qdrant_location) != (uid, home.location):
            recorded = await catalog.record_home(collection, home)  # adopted, or reached under another URL
            if uid is None:  # a collection older than ids, or made by hand: it takes the catalog's
                await self.until_reachable("Qdrant", lambda: self.writer.store.write_uid(recorded))
        return collection

    def workers(self, *, drain: bool = False):
        if not drain:  # a drain catches up and exits; verifying is the running daemon's work
            self._continuous.set()
        return super().workers(drain=drain)

    def side_tasks(self):
        tasks = super().side_tasks()
        if self.settings.verify.enabled:
            tasks["verifier"] = self._verify
        return tasks

    async def _verify(self) -> None:
        await self._continuous.wait()
        await (await self.verifier()).run()

    async def verifier(self) -> Verifier:
        """The continuous verifier of this daemon's live collection (once started)."""
        s = self.settings
        projection = await self.writer.store.projection(self.writer.embedder.fingerprint.id)
        reconciler = Reconciler(self.pool, self.writer.qdrant, self.outbox.collection, projection)
        lease = VerifierLease(self.pool, s.collection, s.worker_name, s.verify.lease_seconds)
        repair = enqueue_repair(self.pool, while_live=self.outbox.collection)  # a reindex may retire it
        return Verifier(reconciler, lease, s.verify, self.metrics, repair, self.stop)

    async def deliver(self, targets: Targets, events: dict[UUID, list[Event]]) -> ApplyResult:
        result = await self.writer.applier.apply(targets)
        # the model's time since the last batch ended (one encode stage serves every worker)
        total = self.writer.embedder.encode_seconds
        if total > self._encode_seen:
            self.metrics.encode_seconds.record(total - self._encode_seen)
        self._encode_seen = total
        return result

    async def close_sink(self) -> None:
        await self.writer.close()

    def describe(self) -> dict:
        return self.writer.describe()

    def stats_extra(self) -> dict:
        return self.writer.stats()

    def readiness_checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return super().readiness_checks() | self.writer.readiness_checks()
