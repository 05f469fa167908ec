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

from daemon.core.chunk_state import BOOKKEEPING, METADATA_HASH, Projection
from daemon.core.collection_shape import DENSE, INDEXES, SPARSE_VECTOR, CollectionShape, Difference
from daemon.core.plan import VERSION_KEY, bookkeeping
from daemon.embedding.embedder import Embedding, ModelFingerprint
from daemon.embedding.fingerprint import check_fingerprint
from daemon.errors import ConfigError
from daemon.telemetry import span

log = logging.getLogger(__name__)

FINGERPRINT_KEY = "outboxd_model"
UNSETTLED = object()
UID_KEY = "outboxd_uid"  # a random id per collection outboxd creates, kept in the catalog too (which Qdrant holds it)
NO_CHUNK = "00000000-0000-0000-0000-000000000000"  # the nil UUID: gen_random_uuid() never makes it
BM25_MODEL = "qdrant/bm25"  # the server's own BM25: it tokenises, stems and weighs the text itself

# Local mode ignores payload indexes and says so on every create; we create them
# for the day the same collection lives on a server.
warnings.filterwarnings("ignore", message="Payload indexes have no effect in the local Qdrant")


def is_local(client: Any) -> bool:
    """qdrant-client's local mode (no server: no server-side inference, no sparse vector made from text),
    behind an (Async)QdrantClient, and behind qdrant_connect.LocalQdrant's thread too."""
    for _ in range(3):  # LocalQdrant -> QdrantClient -> QdrantLocal
        client = getattr(client, "_client", None)
        if type(client).__name__ in ("QdrantLocal", "AsyncQdrantLocal"):
            return True
    return False


def has_sparse(info: models.CollectionInfo) -> bool:
    """The collection has the sparse vector outboxd writes (made with create_collection, or added since)."""
    return SPARSE_VECTOR in (info.config.params.sparse_vectors or {})


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
    model object per point. Each keeps its whole text too, which the server
    makes the sparse vector of, where the collection has one."""

    __slots__ = ("ids", "payloads", "texts", "vectors")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.vectors: list[list[float]] = []
        self.payloads: list[dict[str, Any]] = []
        self.texts: list[str] = []

    def add(self, point_id: str, vector: list[float], payload: dict[str, Any], text: str) -> None:
        self.ids.append(point_id)
        self.vectors.append(vector)
        self.payloads.append(payload)
        self.texts.append(text)

    def __len__(self) -> int:
        return len(self.ids)

    def split(self, keep: Callable[[str], bool]) -> tuple[Upserts, Upserts]:
        """(the points keep() refuses, the points it keeps)."""
        parts = Upserts(), Upserts()
        for i, point_id in enumerate(self.ids):
            parts[keep(point_id)].add(point_id, self.vectors[i], self.payloads[i], self.texts[i])
        return parts

    def vectors_of(self, sparse: dict[str, Any] | None, i: int | None = None) -> Any:
        """The vectors of every point (of point i): the dense ones alone, or named,
        with the document the server makes each sparse vector of (`sparse`: its options)."""
        if sparse is None:
            return self.vectors if i is None else self.vectors[i]
        def document(text: str) -> models.Document:
            return models.Document(text=text, model=BM25_MODEL, options=sparse)
        if i is not None:
            return {DENSE: self.vectors[i], SPARSE_VECTOR: document(self.texts[i])}
        return {DENSE: self.vectors, SPARSE_VECTOR: [document(t) for t in self.texts]}

    def operation(self, sparse: dict[str, Any] | None, update_filter: models.Filter | None = None, *,
                  update_only: bool = False) -> models.UpsertOperation:
        batch = models.Batch.model_construct(ids=self.ids, vectors=self.vectors_of(sparse), payloads=self.payloads)
        mode = models.UpdateMode.UPDATE_ONLY if update_only else None
        return models.UpsertOperation(upsert=models.PointsBatch.model_construct(
            batch=batch, update_filter=update_filter, update_mode=mode))


def dense(vector: Any) -> list[float] | None:
    """The dense vector of a point read back: the vector itself, or the unnamed one among its named vectors."""
    if isinstance(vector, dict):
        vector = vector.get(DENSE)
    return list(vector) if vector is not None else None


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
        self._sparse: dict[str, Any] | None | object = UNSETTLED  # the options of the sparse vectors it writes

    async def projection(self, model_id: str) -> Projection:
        """What this store's points hold beside the chunk: the payload's layout, and
        a sparse vector where [qdrant] asks for one and the collection has it (read
        once; a collection that lacks it gets dense vectors, with a warning that
        names the fix)."""
        if self._sparse is UNSETTLED:
            self._sparse = await self._settle_sparse()
        payload = self.shape.payload
        sparse = self.shape.settings.sparse_id() if self._sparse is not None else None
        return Projection(model_id, sparse, payload.text_chars, payload.profile)

    async def _settle_sparse(self) -> dict[str, Any] | None:
        settings = self.shape.settings
        if settings.sparse == "none":
            return None
        if is_local(self.client):
            log.info("local mode makes no sparse vectors (BM25 is computed by a Qdrant server): the points carry "
                     "the dense vector only, and search takes its keywords from PostgreSQL")
            return None
        if not has_sparse(await self.client.get_collection(self.collection)):
            log.warning(
                "the collection has no sparse vector %r, so its points carry the dense vector only and readers get "
                "no native hybrid search; `outboxd collection --apply` adds it in place, then `outboxd reconcile "
                "--repair` gives every point its sparse vector (nothing is embedded again); or set "
                "OUTBOXD_QDRANT__SPARSE=none", SPARSE_VECTOR, extra={"collection": self.collection})
            return None
        return settings.bm25_options()

    def _settled(self) -> dict[str, Any] | None:
        assert self._sparse is not UNSETTLED, "await projection() before writing"
        return self._sparse  # type: ignore[return-value]

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
        self._sparse = UNSETTLED  # the collection may change below: what it has is read again
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
                    **self.shape.create_kwargs(fingerprint.dimension, sparse=not is_local(self.client)),
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
        if any(d.name == "sparse" for d in differences):
            if self.shape.settings.sparse == "bm25":  # the points get theirs from `reconcile --repair`
                await self.client.create_vector_name(self.collection, SPARSE_VECTOR, models.SparseVectorNameConfig(
                    sparse=models.SparseVectorConfig(modifier=self.shape.sparse_params().modifier)))
            else:
                await self.client.delete_vector_name(self.collection, SPARSE_VECTOR)
            self._sparse = UNSETTLED
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
        def held(key: str) -> models.Filter:
            return models.Filter(must=[
                models.FieldCondition(key=f"{key}content_hash", match=models.MatchAny(any=hashes)),
                models.FieldCondition(key=f"{key}embedding_model", match=models.MatchValue(value=model_id))])

        points, _ = await self.client.scroll(
            self.collection,
            # the top-level keys: a point laid out before the bookkeeping group
            scroll_filter=models.Filter(should=[held(f"{BOOKKEEPING}."), held("")]),
            limit=len(hashes) * 4,  # a hash may stand on several points; missing ones are just encoded
            with_payload=[BOOKKEEPING, "content_hash", "truncated"],
            with_vectors=True,
        )
        found = {}
        for p in points:
            vector, kept = dense(p.vector), bookkeeping(p.payload or {})
            if vector is not None and "content_hash" in kept:
                found[kept["content_hash"]] = Embedding(vector, bool(kept.get("truncated")))
        return found

    async def vectors(self, point_ids: list[str], keys: list[str]) -> dict[str, tuple[Embedding, dict[str, Any]]]:
        """The dense vector each existing point holds now, with these keys of its payload, by point id."""
        records = await self.client.retrieve(
            self.collection, point_ids, with_payload=[*keys, "truncated"], with_vectors=True,
            consistency=self.shape.read_consistency,
        )
        held = {}
        for r in records:
            vector, payload = dense(r.vector), r.payload or {}
            if vector is not None:
                held[str(r.id)] = (Embedding(vector, bool(bookkeeping(payload).get("truncated"))), payload)
        return held

    async def drop(self) -> None:
        """Delete the physical collection (a retired one the operator gave up on), where it exists."""
        if await self.client.collection_exists(self.collection):
            await self.client.delete_collection(self.collection)

    async def mark_for_rewrite(self, point_ids: list[str]) -> None:
        """Drop these points' metadata_hash, which may no longer describe their payload
        (edited by hand): the next apply writes the payload whole (plan's changed_keys)."""
        if point_ids:
            await self.client.delete_payload(self.collection, keys=[f"{BOOKKEEPING}.{METADATA_HASH}"],
                                             points=point_ids, wait=True,
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
        sparse = self._settled() if upserts else None
        ops: list[Any] = []
        plain, versioned = upserts.split(versions.__contains__) if upserts else (None, None)
        if plain:
            ops.append(plain.operation(sparse))
        if versioned:
            older = holds_older(min(versions[i] for i in versioned.ids))
            new, known = versioned.split(set(seen).__contains__)
            ops += [part.operation(sparse, older, update_only=part is known) for part in (new, known) if part]
        # identical changes (a document's new title on all its chunks) become one operation
        same: dict[bytes, tuple[dict[str, Any], list[str]]] = {}
        for point_id, payload in payload_updates:
            same.setdefault(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS), (payload, []))[1].append(point_id)
        holds = holds or {}
        for payload, point_ids in same.values():
            top = {k: v for k, v in payload.items() if k != BOOKKEEPING}
            group = payload.get(BOOKKEEPING)  # merged into the point's group: its other keys (truncated) stay
            version = (group or {}).get("version")
            where = None if version is None else models.Filter(
                must=[models.HasIdCondition(has_id=point_ids), models.FieldCondition(
                    key=f"{BOOKKEEPING}.content_hash", match=models.MatchAny(any=sorted({holds[p] for p in point_ids})))],
                should=holds_older(version).should)
            which = {"points": point_ids} if where is None else {"filter": where}
            # the group last: its version moves only once the rest has landed under the same condition
            ops += [models.SetPayloadOperation(set_payload=models.SetPayload(payload=keys, key=key, **which))
                    for keys, key in ((top, None), (group, BOOKKEEPING)) if keys]
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
        sparse = self._settled() if versioned else None
        held = {str(r.id): bookkeeping(r.payload or {}).get("version") for r in await self.client.retrieve(
            self.collection, [*versioned.ids, *deletes], with_payload=[VERSION_KEY], with_vectors=False,
            consistency=self.shape.read_consistency)}
        newer = 0
        ops: list[Any] = []
        for i, point_id in enumerate(versioned.ids):
            version, have = versions[point_id], held.get(point_id)
            if isinstance(have, int) and have > version:
                newer += 1
            elif point_id in held and have != version:
                alone = models.PointStruct(id=point_id, vector=versioned.vectors_of(sparse, i),
                                           payload=versioned.payloads[i])
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
