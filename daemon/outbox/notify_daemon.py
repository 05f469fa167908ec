"""The notify transport's service (`outboxd run`): the outbox loop
(daemon.outbox.service) with the apply core as its sink, so events are embedded
and written to Qdrant in this process. The Kafka transport's counterpart is
consumers.relay."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import suppress

from qdrant_client import AsyncQdrantClient

from daemon.core.apply import Applier, ApplyResult
from daemon.core.catalog import Catalog
from daemon.config import Settings
from daemon.embedding.embedder import Embedder
from daemon.errors import CollectionRetiredError
from daemon.core.qdrant_store import QdrantSink, describe_target, embedding_checks, make_client
from daemon.outbox.service import Supervisor
from daemon.outbox.claim_loop import BatchSink


class Daemon(Supervisor):
    """The notify transport: embed and write to Qdrant in this process. Owns what
    it creates; an embedder or Qdrant client passed in (tests, an embedding
    application) is used but left open for its owner."""

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
        self.qdrant_sink = QdrantSink(self.qdrant, settings.collection)
        self.applier = Applier(self.embedder, self.qdrant_sink, reuse_vectors=settings.reuse_stored_vectors)
        self._encode_seen = self.embedder.encode_seconds

    async def start_sink(self) -> tuple[BatchSink, str | None]:
        """Load the model and check that the live collection is this model's."""
        s = self.settings
        fingerprint = self.embedder.fingerprint or await self.embedder.load()
        catalog = Catalog(self.pool)
        live = await catalog.live(s.collection)
        await self._until_reachable(
            f"Qdrant ({describe_target(s)})",
            lambda: self.qdrant_sink.ensure_collection(fingerprint, live.name if live else None),
        )
        if live is None:
            live = await catalog.register_live(self.qdrant_sink.collection, s.collection, fingerprint)
        if live.name != self.qdrant_sink.collection:  # another daemon registered another model first
            raise CollectionRetiredError(
                f"the live collection of {s.collection!r} is {live.name!r} ({live.fingerprint}), not "
                f"{self.qdrant_sink.collection!r}; start outboxd with OUTBOXD_MODEL={live.model_name}"
            )
        return self.applier, self.qdrant_sink.collection

    async def close_sink(self) -> None:
        if self._owns_qdrant:
            with suppress(Exception):
                await self.qdrant.close()
        if self._owns_embedder:
            self.embedder.close()

    def describe(self) -> dict:
        s = self.settings
        return {"collection": s.collection, "qdrant": describe_target(s), "model": str(self.embedder.fingerprint)}

    def stats_extra(self) -> dict:
        return {"encode_seconds": round(self.embedder.encode_seconds, 3), "cache_hits": self.embedder.cache_hits}

    def observe_batch(self, result: ApplyResult) -> None:
        # the model's time since the last batch ended (one encode thread serves every worker)
        total = self.embedder.encode_seconds
        if total > self._encode_seen:
            self.metrics.encode_seconds.record(total - self._encode_seen)
        self._encode_seen = total

    def readiness_checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return super().readiness_checks() | embedding_checks(self.qdrant, self.embedder)
