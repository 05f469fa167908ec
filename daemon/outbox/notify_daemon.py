"""`outboxd run`, the notify transport: an outbox service whose batches go
through the apply core, so events are embedded and written to Qdrant in this
process. Its Kafka counterpart, which publishes instead, is consumers.relay."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import suppress
from uuid import UUID

from qdrant_client import AsyncQdrantClient

from daemon.config import Settings
from daemon.core.apply import Applier, ApplyResult
from daemon.core.batch import Targets
from daemon.core.catalog import Catalog
from daemon.core.qdrant_connect import describe_target, embedding_checks, make_client
from daemon.core.qdrant_store import QdrantStore
from daemon.embedding.embedder import Embedder
from daemon.errors import CollectionRetiredError
from daemon.outbox.queue import Event
from daemon.outbox.service import OutboxService


class NotifyDaemon(OutboxService):
    """Owns what it creates; an embedder or Qdrant client passed in (tests, an
    embedding application) is used but left open for its owner."""

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
        self._owns_embedder = embedder is None
        self._owns_qdrant = qdrant is None
        self.embedder = embedder or Embedder(settings)
        self.qdrant = qdrant or make_client(settings)
        self.store = QdrantStore(self.qdrant, settings.collection)
        self.applier = Applier(self.embedder, self.store, reuse_vectors=settings.reuse_stored_vectors)
        self._encode_seen = self.embedder.encode_seconds

    async def start_sink(self) -> str | None:
        """Load the model and check that the live collection is this model's."""
        s = self.settings
        if self.embedder.fingerprint is None:  # an embedding endpoint may not be up yet
            await self.until_reachable("the embedding model", self.embedder.load)
        fingerprint = self.embedder.fingerprint
        catalog = Catalog(self.pool)
        live = await catalog.live(s.collection)
        await self.until_reachable(
            f"Qdrant ({describe_target(s)})",
            lambda: self.store.ensure_collection(fingerprint, live.name if live else None),
        )
        if live is None:
            live = await catalog.register_live(self.store.collection, s.collection, fingerprint)
        if live.name != self.store.collection:  # another daemon registered another model first
            raise CollectionRetiredError(
                f"the live collection of {s.collection!r} is {live.name!r} ({live.fingerprint}), not "
                f"{self.store.collection!r}; start outboxd with OUTBOXD_MODEL={live.model_name}"
            )
        return self.store.collection

    async def deliver(self, targets: Targets, events: dict[UUID, list[Event]]) -> ApplyResult:
        result = await self.applier.apply(targets)
        # the model's time since the last batch ended (one encode stage serves every worker)
        total = self.embedder.encode_seconds
        if total > self._encode_seen:
            self.metrics.encode_seconds.record(total - self._encode_seen)
        self._encode_seen = total
        return result

    async def close_sink(self) -> None:
        if self._owns_qdrant:
            with suppress(Exception):
                await self.qdrant.close()
        if self._owns_embedder:
            await self.embedder.close()

    def describe(self) -> dict:
        s = self.settings
        return {"collection": s.collection, "qdrant": describe_target(s), "model": str(self.embedder.fingerprint)}

    def stats_extra(self) -> dict:
        return {"encode_seconds": round(self.embedder.encode_seconds, 3), "cache_hits": self.embedder.cache_hits}

    def readiness_checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return super().readiness_checks() | embedding_checks(self.qdrant, self.embedder)


Daemon = NotifyDaemon  # the name tests and embedding applications have used
