"""The Qdrant side: the collection, its model fingerprint, and batched writes.

Point id = chunk id. Every write waits for Qdrant to confirm it (wait=True),
because an event is acknowledged only after that confirmation.

Several daemons and consumers may start at once against one server: creating
the collection, its payload indexes and the alias is check-then-act, so an
"already exists" from a concurrent starter counts as success, and the result
is checked afterwards (the alias must end up on a collection of this model).
"""
from __future__ import annotations

import logging
import uuid
import warnings
from collections.abc import Callable, Collection, Mapping
from typing import Any

import grpc
import orjson
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import UnexpectedResponse

from daemon.core.chunk_state import METADATA_HASH
from daemon.core.collection_shape import INDEXES, CollectionShape, Difference
from daemon.core.plan import VERSION_KEY
from daemon.embedding.embedder import Embedding, ModelFingerprint
from daemon.embedding.fingerprint import check_fingerprint
from daemon.errors import ConfigError
from daemon.telemetry import span

log = logging.getLogger(__name__)

FINGERPRINT_KEY = "outboxd_model"
UID_KEY = "outboxd_uid"  # a random id per collection outboxd creates, kept in the catalog too (which Qdrant holds it)
NO_CHUNK = "00000000-0000-0000-0000-000000000000"  # the nil UUID: gen_random_uuid() never makes it

# Local mode ignores payload indexes and says so on every create; we create them
# for the day the same collection lives on a server.
warnings.filterwarnings("ignore", message="Payload indexes have no effect in the local Qdrant")


def physical_name(alias: str, fingerprint: ModelFingerprint) -> str:
    return f"{alias}__{fingerprint.id[:12]}"


def already_exists(exc: BaseException) -> bool:
    """A concurrent starter won the race: HTTP 409, gRPC ALREADY_EXISTS, or local mode's ValueError."""
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code == 409 or "already exists" in str(exc).lower()
    if isinstance(exc, ValueError):
        return "already exists" in str(exc)
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.ALREADY_EXISTS


class Upserts:
    """Points to upsert, column-wise: handed to Qdrant as one Batch, without a
    model object per point."""

    __slots__ = ("ids", "payloads", "vectors")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.vectors: list[list[float]] = []
        self.payloads: list[dict[str, Any]] = []

    def add(self, point_id: str, vector: list[float], payload: dict[str, Any]) -> None:
        self.ids.append(point_id)
        self.vectors.append(vector)
        self.payloads.append(payload)

    def __len__(self) -> int:
        return len(self.ids)

    def split(self, keep: Callable[[str], bool]) -> tuple[Upserts, Upserts]:
        """(the points keep() refuses, the points it keeps)."""
        parts = Upserts(), Upserts()
        for i, point_id in enumerate(self.ids):
            parts[keep(point_id)].add(point_id, self.vectors[i], self.payloads[i])
        return parts

    def operation(self, update_filter: models.Filter | None = None, *, update_only: bool = False
                  ) -> models.UpsertOperation:
        batch = models.Batch.model_construct(ids=self.ids, vectors=self.vectors, payloads=self.payloads)
        mode = models.UpdateMode.UPDATE_ONLY if update_only else None
        return models.UpsertOperation(upsert=models.PointsBatch.model_construct(
            batch=batch, update_filter=update_filter, update_mode=mode))


def holds_older(version: int) -> models.Filter:
    """A point that holds an older version than this, or none (written before versions)."""
    return models.Filter(should=[models.IsEmptyCondition(is_empty=models.PayloadField(key=VERSION_KEY)),
                                 models.FieldCondition(key=VERSION_KEY, range=models.Range(lt=version))])


async def resolve_alias(client: AsyncQdrantClient, alias: str) -> str | None:
    """The physical collection behind the alias, as readers see it; a plain collection
    of that name (made by hand or by another tool) stands for itself."""
    async def behind() -> str | None:
        aliases = {a.alias_name: a.collection_name for a in (await client.get_aliases()).aliases}
        return aliases.get(alias)

    if (target := await behind()) is not None:
        return target
    if not await client.collection_exists(alias):
        return None
    # A server's "exists" also answers for an alias: one created by a concurrent
    # starter since the first look must not pass for a plain collection of its name.
    return await behind() or alias


async def read_identity(client: AsyncQdrantClient, collection: str) -> tuple[ModelFingerprint | None, str | None]:
    """What a collection's metadata says of it: the model fingerprint its vectors
    were made with, and the id outboxd gave it when it created it (None: none)."""
    return identity(await client.get_collection(collection))


def identity(info: models.CollectionInfo) -> tuple[ModelFingerprint | None, str | None]:
    """read_identity of a collection's info already read."""
    meta = info.config.metadata or {}
    fingerprint = meta.get(FINGERPRINT_KEY)
    return (ModelFingerprint.from_dict(fingerprint) if fingerprint else None), meta.get(UID_KEY)


async def read_fingerprint(client: AsyncQdrantClient, collection: str) -> ModelFingerprint | None:
    """The model fingerprint a collection records (None: it records none)."""
    return (await read_identity(client, collection))[0]


class QdrantStore:
    """Readers use `alias` (OUTBOXD_COLLECTION), a Qdrant alias of the physical
    collection built for one model. Writers write to the physical collection
    whose fingerprint they checked, never through the alias, so a later switch
    of the alias to another model's collection cannot receive this model's vectors."""

    def __init__(self, client: AsyncQdrantClient, alias: str, collection: str | None = None, *,
                 shape: CollectionShape | None = None) -> None:
        self.client = client
        self.alias = alias
        self.shape = shape or CollectionShape()  # how a collection it creates is configured, and writes ordered
        # the physical collection: given (a command that resolved it), or settled by ensure_collection
        self.collection = collection or alias
        self.recreated = False  # ensure_collection created the live collection anew: it must be rebuilt

    async def resolve(self) -> str | None:
        return await resolve_alias(self.client, self.alias)

    async def ensure_collection(self, fingerprint: ModelFingerprint, live: Any = None, *,
                                here: str = "", recreate_missing: bool = False) -> str | None:
        """Create the collection and alias for this model, or refuse a collection
        that cannot hold its vectors; the id in its metadata (None: it has none).
        `live` is the catalog's live collection for the alias as this Qdrant has
        it (a daemon.core.catalog.CollectionView; that module imports this one);
        it wins over where the alias points (during a reindex the alias moves
        last). A Qdrant that lacks it, or holds another collection of its name,
        is refused (CollectionElsewhereError) unless recreate_missing: then a
        missing one is created empty (the caller rebuilds it from PostgreSQL)."""
        if live is not None and live.name is not None:
            if not live.exists and recreate_missing:
                log.warning("the live collection is missing in Qdrant; recreating it empty",
                            extra={"collection": live.name})
                self.collection = live.name
                await self.create_physical(fingerprint)
                await self.point_alias()
                self.recreated = True
                return (await read_identity(self.client, self.collection))[1]
            live.check_home(here)
        target = live.name if live is not None and live.name is not None else await self.resolve()
        if target is None:
            self.collection = physical_name(self.alias, fingerprint)
            created = await self.create_physical(fingerprint)
            await self.create_alias()
            target = await self.resolve()  # another starter may have won with another model: checked below
            if created and target == self.collection:
                log.info(
                    "collection created",
                    extra={"alias": self.alias, "collection": self.collection, "model": str(fingerprint)},
                )
                return (await read_identity(self.client, self.collection))[1]
        self.collection = target
        await self.check_adoptable(fingerprint)
        if live is not None and await self.resolve() is None:
            # the collection is back (restored from a snapshot) but its alias went with the
            # deleted one: readers need it again
            log.warning("the alias was missing; pointing it at the live collection",
                        extra={"alias": self.alias, "collection": live.name})
            await self.create_alias()
        return (await read_identity(self.client, self.collection))[1]

    async def add_replicas(self, moves: list[models.ReplicateShard]) -> None:
        """Start each shard replication (daemon.core.cluster plans them); Qdrant copies in the background."""
        for move in moves:
            await self.client.cluster_collection_update(
                self.collection, models.ReplicateShardOperation(replicate_shard=move))

    async def write_uid(self, uid: str) -> None:
        """Give the collection the id the catalog keeps for it (a collection older than ids, or made by hand)."""
        await self.client.update_collection(self.collection, metadata={UID_KEY: uid})

    async def check_adoptable(self, fingerprint: ModelFingerprint) -> None:
        """The existing collection can hold this model's vectors (size, distance,
        fingerprint), else ConfigError naming the fix; an empty collection without
        a fingerprint (made by hand) is adopted."""
        info = await self.client.get_collection(self.collection)
        self._check_vectors(info, fingerprint)
        meta = (info.config.metadata or {}).get(FINGERPRINT_KEY)
        recorded = ModelFingerprint.from_dict(meta) if meta else None
        if recorded is None and not (await self.client.count(self.collection, exact=True)).count:
            await self.client.update_collection(self.collection, metadata={FINGERPRINT_KEY: fingerprint.as_dict()})
            return
        check_fingerprint(recorded, fingerprint, self.alias, self.collection)

    def _check_vectors(self, info: Any, fingerprint: ModelFingerprint) -> None:
        params = info.config.params.vectors
        fix = (
            "Delete that collection (outboxd rebuilds it from PostgreSQL) or set OUTBOXD_COLLECTION to a new "
            "name; outboxd then creates a collection that fits the model."
        )
        if not isinstance(params, models.VectorParams):
            raise ConfigError(
                f"Qdrant collection {self.collection!r} (alias {self.alias!r}) uses named vectors "
                f"({', '.join(sorted(params or {})) or 'none'}), but outboxd writes one unnamed vector per point. {fix}"
            )
        if params.size != fingerprint.dimension or params.distance != models.Distance.COSINE:
            raise ConfigError(
                f"Qdrant collection {self.collection!r} (alias {self.alias!r}) stores {params.size}-dimensional "
                f"vectors compared by {params.distance.value}, but the model {fingerprint.name} makes "
                f"{fingerprint.dimension}-dimensional vectors compared by Cosine, so every write would fail. {fix}"
            )

    async def create_alias(self) -> None:
        """Point the alias at self.collection where it points nowhere yet; a
        concurrent starter that created it first is no error (the caller checks
        where it points)."""
        try:
            await self.client.update_collection_aliases(change_aliases_operations=[self._create_alias_op()])
        except Exception as exc:
            if not already_exists(exc):
                raise

    async def point_alias(self) -> None:
        """Move the alias to self.collection in one atomic Qdrant operation:
        readers see the old collection or the new one, never neither."""
        ops: list[Any] = []
        aliases = {a.alias_name for a in (await self.client.get_aliases()).aliases}
        if self.alias in aliases:
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.alias)))
        ops.append(self._create_alias_op())
        await self.client.update_collection_aliases(change_aliases_operations=ops)

    def _create_alias_op(self) -> models.CreateAliasOperation:
        return models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=self.collection, alias_name=self.alias)
        )

    async def create_physical(self, fingerprint: ModelFingerprint) -> bool:
        """Create self.collection, configured as [qdrant] says, with its payload
        indexes; False where it already existed (made earlier, or by a concurrent
        starter a moment ago)."""
        created = True
        if await self.client.collection_exists(self.collection):
            created = False
        else:
            try:
                await self.client.create_collection(
                    self.collection,
                    metadata={FINGERPRINT_KEY: fingerprint.as_dict(), UID_KEY: uuid.uuid4().hex},
                    **self.shape.create_kwargs(fingerprint.dimension),
                )
            except Exception as exc:
                if not already_exists(exc):
                    raise
                created = False
        # Repeated so a starter that lost the race still has them; only the missing
        # ones, so that a start never retypes an index (`outboxd collection --apply` does).
        schema = (await self.client.get_collection(self.collection)).payload_schema or {}
        await self.create_indexes({k: v for k, v in self.shape.indexes().items() if k not in schema})
        return created

    async def create_indexes(self, indexes: dict[str, Any]) -> None:
        for name, schema in indexes.items():
            try:
                await self.client.create_payload_index(self.collection, name, schema, wait=True)
            except Exception as exc:
                if not already_exists(exc):
                    raise

    async def reshape(self, differences: list[Difference]) -> None:
        """Make the in-place differences between [qdrant] and the collection: one
        update of its parameters, then the payload indexes (a retyped one is
        rebuilt by Qdrant). Replicas a raised replication factor asks for are
        the cluster's to add (daemon.core.cluster)."""
        kwargs = self.shape.update_kwargs(differences)
        if kwargs:
            await self.client.update_collection(self.collection, **kwargs)
        names = {d.name for d in differences if d.in_place}
        wanted = self.shape.indexes()
        retyped = {k: v for k, v in wanted.items() if f"index {k}" in names
                   or (k == self.shape.settings.tenant_key and "tenant_key" in names)}
        for d in differences:  # the tenant key moved: the old one becomes a plain index again
            if d.name == "tenant_key" and d.actual is not None and d.actual in INDEXES:
                retyped[d.actual] = INDEXES[d.actual]
        await self.create_indexes(retyped)

    async def check_writable(self) -> None:
        """A write that changes nothing (deleting the nil UUID, which is never a
        chunk id), refused (403) where the API key may only read: such a key
        stops the start instead of failing every batch."""
        await self.client.delete(self.collection, models.PointIdsList(points=[NO_CHUNK]), wait=True)

    async def recorded_fingerprint(self) -> ModelFingerprint | None:
        return await read_fingerprint(self.client, self.collection)

    async def payloads(self, point_ids: list[str], *, keys: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Current payload of each existing point, by point id (only `keys`, where given)."""
        if not point_ids:
            return {}
        selector = keys if keys is not None else True
        records = await self.client.retrieve(self.collection, point_ids, with_payload=selector, with_vectors=False,
                                             consistency=self.shape.read_consistency)
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

    async def drop(self) -> None:
        """Delete the physical collection (a retired one the operator gave up on), where it exists."""
        if await self.client.collection_exists(self.collection):
            await self.client.delete_collection(self.collection)

    async def mark_for_rewrite(self, point_ids: list[str]) -> None:
        """Drop these points' metadata_hash, which may no longer describe their payload
        (edited by hand): the next apply writes the payload whole (plan's changed_keys)."""
        if point_ids:
            await self.client.delete_payload(self.collection, keys=[METADATA_HASH], points=point_ids, wait=True,
                                             ordering=self.shape.ordering)

    async def write(
        self, upserts: Upserts | None, payload_updates: list[tuple[str, dict[str, Any]]], deletes: list[str],
        versions: Mapping[str, int] | None = None, seen: Collection[str] = (), holds: Mapping[str, str] | None = None,
    ) -> int:
        """One batched request, confirmed before it returns. versions: the version of
        the state each versioned point's write carries (an upsert's payload holds it
        too); Qdrant makes such a write only where the point holds an older version or
        none, so a writer that wakes from a pause cannot put an older state back. The
        versioned writes share one condition (older than the batch's lowest version);
        a point it left out because it holds a version between that and its own is
        then written alone on its own condition. seen: the versioned points the
        writer found in Qdrant when it planned; they are only updated, never
        inserted, so one deleted since (its chunk is gone) is not brought back.
        holds: the content hash each versioned payload update assumes its point
        holds; an update (its payload carries its version) lands only on a point
        that still holds one of its group's texts and an older version, so a
        payload is never set beside another text's vector. Returns how many versioned writes found their point already holding a newer
        version (left as it was)."""
        versions = versions or {}
        ops: list[Any] = []
        plain, versioned = upserts.split(versions.__contains__) if upserts else (None, None)
        if plain:
            ops.append(plain.operation())
        if versioned:
            older = holds_older(min(versions[i] for i in versioned.ids))
            new, known = versioned.split(set(seen).__contains__)
            ops += [part.operation(older, update_only=part is known) for part in (new, known) if part]
        # identical changes (a document's new title on all its chunks) become one operation
        same: dict[bytes, tuple[dict[str, Any], list[str]]] = {}
        for point_id, payload in payload_updates:
            same.setdefault(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS), (payload, []))[1].append(point_id)
        holds = holds or {}
        for payload, point_ids in same.values():
            version = payload.get(VERSION_KEY)
            if version is None:
                ops.append(models.SetPayloadOperation(set_payload=models.SetPayload(payload=payload, points=point_ids)))
                continue
            where = models.Filter(
                must=[models.HasIdCondition(has_id=point_ids), models.FieldCondition(
                    key="content_hash", match=models.MatchAny(any=sorted({holds[p] for p in point_ids})))],
                should=holds_older(version).should)
            ops.append(models.SetPayloadOperation(set_payload=models.SetPayload(payload=payload, filter=where)))
        gone = [d for d in deletes if d not in versions]
        if gone:
            ops.append(models.DeleteOperation(delete=models.PointIdsList(points=gone)))
        gone_versioned = [d for d in deletes if d in versions]
        if gone_versioned:
            ops.append(self._delete_older(gone_versioned, min(versions[d] for d in gone_versioned)))
        if ops:
            with span("qdrant.write", histogram="qdrant_seconds", operations=len(ops)):
                await self.client.batch_update_points(self.collection, ops, wait=True, ordering=self.shape.ordering)
        if not versioned and not gone_versioned:
            return 0
        return await self._each_on_its_own(versioned or Upserts(), gone_versioned, versions, seen)

    def _delete_older(self, point_ids: list[str], version: int) -> models.DeleteOperation:
        where = models.Filter(must=[models.HasIdCondition(has_id=point_ids)], should=holds_older(version).should)
        return models.DeleteOperation(delete=models.FilterSelector(filter=where))

    async def _each_on_its_own(self, versioned: Upserts, deletes: list[str], versions: Mapping[str, int],
                               seen: Collection[str]) -> int:
        """After the shared condition: each point that still holds an older version
        than its own write is written alone, on its own version; how many hold a newer one."""
        held = {str(r.id): (r.payload or {}).get(VERSION_KEY) for r in await self.client.retrieve(
            self.collection, [*versioned.ids, *deletes], with_payload=[VERSION_KEY], with_vectors=False,
            consistency=self.shape.read_consistency)}
        newer = 0
        ops: list[Any] = []
        for i, point_id in enumerate(versioned.ids):
            version, have = versions[point_id], held.get(point_id)
            if isinstance(have, int) and have > version:
                newer += 1
            elif point_id in held and have != version:
                alone = models.PointStruct(id=point_id, vector=versioned.vectors[i], payload=versioned.payloads[i])
                mode = models.UpdateMode.UPDATE_ONLY if point_id in seen else None
                ops.append(models.UpsertOperation(upsert=models.PointsList(
                    points=[alone], update_filter=holds_older(version), update_mode=mode)))
        for point_id in deletes:
            have = held.get(point_id, None)
            if point_id not in held:
                continue
            if isinstance(have, int) and have >= versions[point_id]:
                newer += 1
            else:
                ops.append(self._delete_older([point_id], versions[point_id]))
        if ops:
            with span("qdrant.write", histogram="qdrant_seconds", operations=len(ops)):
                await self.client.batch_update_points(self.collection, ops, wait=True, ordering=self.shape.ordering)
        return newer
