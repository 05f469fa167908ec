"""What a process that writes points needs, in one piece: the embedder, the
Qdrant client, the collection store and the apply core on top of them. The
notify daemon and the Kafka consumer both hold one. It owns what it creates;
an embedder or client passed in (tests, an embedding application) is used but
left open for its owner."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

from qdrant_client import AsyncQdrantClient

from daemon.config import Settings
from daemon.core.apply import Applier
from daemon.core.catalog import CollectionRecord, view
from daemon.core.collection_shape import CollectionShape
from daemon.core.qdrant_connect import describe_target, embedding_checks, make_client, probe
from daemon.core.qdrant_store import QdrantStore
from daemon.embedding.embedder import Embedder, ModelFingerprint

UntilReachable = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]  # Service.until_reachable: fn's result


class QdrantWriter:
    def __init__(
        self, settings: Settings, *, embedder: Embedder | None = None, qdrant: AsyncQdrantClient | None = None
    ) -> None:
        self.settings = settings
        self._owns_embedder = embedder is None
        self._owns_qdrant = qdrant is None
        self.embedder = embedder or Embedder(settings)
        self.qdrant = qdrant or make_client(settings)
        self.store = QdrantStore(self.qdrant, settings.collection, shape=CollectionShape.of(settings))
        self.applier = Applier(self.embedder, self.store, reuse_vectors=settings.reuse_stored_vectors)

    async def load_model(self, until_reachable: UntilReachable) -> ModelFingerprint:
        """The model's fingerprint, loading it first (an embedding endpoint may not be up yet)."""
        if self.embedder.fingerprint is None:
            await until_reachable("the embedding model", self.embedder.load)
        return self.embedder.fingerprint

    async def ensure_collection(
        self, until_reachable: UntilReachable, live: CollectionRecord | None = None, *, recreate_missing: bool = False
    ) -> tuple[str, str | None]:
        """Reach Qdrant, load the model, then check or create the collection for
        it, and check that this process may write there; the physical name and
        the id in its metadata (daemon.core.catalog: which Qdrant holds it).
        `live`: the catalog's live collection, which this Qdrant must hold
        (recreate_missing: create it empty where it is missing). Qdrant is asked
        first, so a refused key or certificate, or a server that is not Qdrant,
        ends the start at once instead of after the model has loaded."""
        here = describe_target(self.settings)
        qdrant = f"Qdrant ({here})"
        await until_reachable(qdrant, lambda: probe(self.qdrant, self.settings))
        fingerprint = await self.load_model(until_reachable)

        async def ensure() -> str | None:
            seen = await view(self.qdrant, self.settings.collection, live) if live is not None else None
            return await self.store.ensure_collection(fingerprint, seen, here=here, recreate_missing=recreate_missing)

        uid = await until_reachable(qdrant, ensure)
        await until_reachable(qdrant, self.store.check_writable)
        # what the points hold beside the chunk, settled now: a collection without the
        # configured sparse vector is named at start, not at the first batch
        await until_reachable(qdrant, lambda: self.store.projection(fingerprint.id))
        return self.store.collection, uid

    def readiness_checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return embedding_checks(self.qdrant, self.embedder)

    def stats(self) -> dict:
        return {"encode_seconds": round(self.embedder.encode_seconds, 3), "cache_hits": self.embedder.cache_hits}

    def describe(self) -> dict:
        s = self.settings
        return {"collection": s.collection, "qdrant": describe_target(s), "model": str(self.embedder.fingerprint)}

    async def close(self) -> None:
        if self._owns_qdrant:
            with suppress(Exception):
                await self.qdrant.close()
        if self._owns_embedder:
            with suppress(Exception):
                await self.embedder.close()
