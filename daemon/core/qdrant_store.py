"""The Qdrant side: the collection, its model fingerprint, and batched writes.

Point id = chunk id. Every write waits for Qdrant to confirm it (wait=True),
because the outbox acknowledges an event only after that confirmation.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import orjson
from qdrant_client import AsyncQdrantClient, models

from daemon.config import Settings
from daemon.embedding.embedder import Embedding, ModelFingerprint
from daemon.errors import ConfigError, ModelMismatchError, ServiceUnavailableError
from daemon.telemetry import span

log = logging.getLogger(__name__)

FINGERPRINT_KEY = "outboxd_model"
INDEXED_FIELDS = ("document_id", "source_id", "content_hash")

# Local mode ignores payload indexes and says so on every create; we create them
# for the day the same collection lives on a server.
warnings.filterwarnings("ignore", message="Payload indexes have no effect in the local Qdrant")


def make_client(settings: Settings) -> AsyncQdrantClient:
    if settings.qdrant_url:
        key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        return AsyncQdrantClient(url=settings.qdrant_url, api_key=key, timeout=int(settings.qdrant_timeout))
    if settings.local_qdrant_path == ":memory:":
        return AsyncQdrantClient(location=":memory:")
    return AsyncQdrantClient(path=settings.local_qdrant_path)


def embedding_checks(client: AsyncQdrantClient, embedder) -> dict[str, Callable[[], Awaitable[None]]]:
    """/readyz checks of a process that embeds and writes: Qdrant answers, the model is loaded."""

    async def qdrant() -> None:
        await client.get_collections()

    async def model() -> None:
        if embedder.fingerprint is None:
            raise ServiceUnavailableError("the embedding model is not loaded yet")

    return {"qdrant": qdrant, "model": model}


def describe_target(settings: Settings) -> str:
    return settings.qdrant_url or f"local mode at {settings.local_qdrant_path}"


def physical_name(alias: str, fingerprint: ModelFingerprint) -> str:
    return f"{alias}__{fingerprint.id[:12]}"


class QdrantSink:
    """Readers use `alias` (OUTBOXD_COLLECTION), a Qdrant alias of the physical
    collection built for one model. The daemon writes to the physical
    collection whose fingerprint it checked, never through the alias, so a
    later switch of the alias to another model's collection cannot receive
    this model's vectors."""

    def __init__(self, client: AsyncQdrantClient, alias: str) -> None:
        self.client = client
        self.alias = alias
        self.collection = alias  # the physical collection, known after ensure_collection

    async def resolve(self) -> str | None:
        """The physical collection behind the alias; a plain collection of that
        name (made by hand or by another tool) stands for itself."""
        aliases = {a.alias_name: a.collection_name for a in (await self.client.get_aliases()).aliases}
        if self.alias in aliases:
            return aliases[self.alias]
        return self.alias if await self.client.collection_exists(self.alias) else None

    async def ensure_collection(self, fingerprint: ModelFingerprint, live: str | None = None) -> None:
        """Create the collection and alias for this model, or refuse a collection
        that holds another model's vectors. `live` is the collection the catalog
        says is live for the alias; it wins over where the alias points (during
        a reindex the alias moves last)."""
        target = live or await self.resolve()
        if live is not None and not await self.client.collection_exists(live):
            log.warning(
                "the live collection is missing in Qdrant; recreating it empty. Run `outboxd reconcile "
                "--repair` to refill it from PostgreSQL",
                extra={"collection": live},
            )
            self.collection = live
            await self.create_physical(fingerprint)
            await self.point_alias()
            return
        if target is None:
            self.collection = physical_name(self.alias, fingerprint)
            await self.create_physical(fingerprint)
            await self.point_alias()
            log.info(
                "collection created",
                extra={"alias": self.alias, "collection": self.collection, "model": str(fingerprint)},
            )
            return
        self.collection = target
        recorded = await self.recorded_fingerprint()
        if recorded is None:
            count = (await self.client.count(self.collection, exact=True)).count
            if count:
                raise ConfigError(
                    f"Qdrant collection {self.alias!r} holds {count} points but no outboxd model "
                    "fingerprint, so outboxd cannot tell which model made them. Point OUTBOXD_COLLECTION "
                    "at a new collection name, or delete this collection to rebuild it from PostgreSQL."
                )
            await self.client.update_collection(self.collection, metadata={FINGERPRINT_KEY: fingerprint.as_dict()})
            return
        if recorded != fingerprint:
            window = f" OUTBOXD_MAX_SEQ_LENGTH={recorded.max_seq_length}" if recorded.max_seq_length else ""
            raise ModelMismatchError(
                f"Qdrant collection {self.alias!r} holds vectors of {recorded}, but outboxd is "
                f"configured with {fingerprint}. Mixing them would make search meaningless. To keep this "
                f"collection, set OUTBOXD_MODEL={recorded.name}{window} OUTBOXD_NORMALIZE={recorded.normalized}; "
                "to move to the new model without downtime, run `outboxd reindex` with the new settings; "
                "or set OUTBOXD_COLLECTION to a new name to build a separate collection from PostgreSQL."
            )

    async def point_alias(self) -> None:
        """Point the alias at self.collection in one atomic Qdrant operation:
        readers see the old collection or the new one, never neither."""
        ops: list[Any] = []
        aliases = {a.alias_name for a in (await self.client.get_aliases()).aliases}
        if self.alias in aliases:
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.alias)))
        ops.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=self.collection, alias_name=self.alias)
            )
        )
        await self.client.update_collection_aliases(change_aliases_operations=ops)

    async def create_physical(self, fingerprint: ModelFingerprint) -> None:
        if await self.client.collection_exists(self.collection):
            return
        await self.client.create_collection(
            self.collection,
            vectors_config=models.VectorParams(size=fingerprint.dimension, distance=models.Distance.COSINE),
            metadata={FINGERPRINT_KEY: fingerprint.as_dict()},
        )
        for field in INDEXED_FIELDS:
            await self.client.create_payload_index(self.collection, field, models.PayloadSchemaType.KEYWORD)

    async def recorded_fingerprint(self) -> ModelFingerprint | None:
        info = await self.client.get_collection(self.collection)
        meta = (info.config.metadata or {}).get(FINGERPRINT_KEY)
        return ModelFingerprint.from_dict(meta) if meta else None

    async def payloads(self, ids: list[UUID], *, without: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Current payload of each existing point, by point id (less the keys in `without`)."""
        if not ids:
            return {}
        selector = models.PayloadSelectorExclude(exclude=without) if without else True
        records = await self.client.retrieve(
            self.collection, [str(i) for i in ids], with_payload=selector, with_vectors=False
        )
        return {str(r.id): (r.payload or {}) for r in records}

    async def vectors_by_hash(self, hashes: list[str], model_id: str) -> dict[str, Embedding]:
        """Vectors this model already made for these texts (any point with the same
        content_hash), so identical text is not encoded again."""
        if not hashes:
            return {}
        points, _ = await self.client.scroll(
            self.collection,
            scroll_filter=models.Filter(
                must=[
                    models.FieldCondition(key="content_hash", match=models.MatchAny(any=hashes)),
                    models.FieldCondition(key="embedding_model", match=models.MatchValue(value=model_id)),
                ]
            ),
            limit=len(hashes) * 4,  # a hash may stand on several points; missing ones are just encoded
            with_payload=["content_hash", "truncated"],
            with_vectors=True,
        )
        return {
            p.payload["content_hash"]: Embedding(list(p.vector), bool(p.payload.get("truncated")))
            for p in points
            if p.payload and p.vector is not None
        }

    async def write(
        self,
        upserts: list[models.PointStruct],
        payload_updates: list[tuple[str, dict[str, Any]]],
        deletes: list[str],
    ) -> None:
        """One batched request, confirmed before it returns."""
        ops: list[Any] = []
        if upserts:
            ops.append(models.UpsertOperation(upsert=models.PointsList(points=upserts)))
        # identical changes (a document's new title on all its chunks) become one operation
        same: dict[bytes, tuple[dict[str, Any], list[str]]] = {}
        for point_id, payload in payload_updates:
            same.setdefault(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS), (payload, []))[1].append(point_id)
        for payload, point_ids in same.values():
            ops.append(models.SetPayloadOperation(set_payload=models.SetPayload(payload=payload, points=point_ids)))
        if deletes:
            ops.append(models.DeleteOperation(delete=models.PointIdsList(points=deletes)))
        if ops:
            with span("qdrant.write", histogram="qdrant_seconds", operations=len(ops)):
                await self.client.batch_update_points(self.collection, ops, wait=True)
