"""The catalog in PostgreSQL of collections and the model that made each, and
the one place that says which physical collection is live behind an alias.

Writers follow the catalog, readers follow the Qdrant alias: the daemon
acknowledges events only for the collection the catalog says is live for its
alias, so a reindex can retire a collection without racing running daemons.
resolve() answers "which collection, made by which model" for every command
that needs it, as an immutable CollectionView: nobody re-points a store.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg_pool import AsyncConnectionPool

from daemon.core.qdrant_store import has_sparse, identity, resolve_alias
from daemon.embedding.embedder import ModelFingerprint
from daemon.errors import CollectionElsewhereError
from db.catalog import CatalogRepository


@dataclass(frozen=True, slots=True)
class CollectionRecord:
    name: str
    alias: str
    model_name: str
    dimension: int
    normalized: bool
    max_seq_length: int | None
    fingerprint_id: str
    status: str
    created_at: datetime
    updated_at: datetime
    variant: str | None = None
    qdrant_uid: str | None = None  # the id written into the collection's metadata in Qdrant
    qdrant_location: str | None = None  # where it was last seen: a server URL or a local-mode folder

    @property
    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint(self.model_name, self.dimension, self.normalized, self.max_seq_length, self.variant)


def not_here(record: CollectionRecord, here: str, found: str | None) -> CollectionElsewhereError:
    """The one message for a live collection this Qdrant does not hold: `found` is
    the id of the same-named collection that it holds instead (None: it holds none)."""
    where = f" in Qdrant at {record.qdrant_location}" if record.qdrant_location else ""
    seen = (f"holds a collection of that name with another id ({found}, not {record.qdrant_uid}): "
            "not the one outboxd built" if found else "does not have it")
    return CollectionElsewhereError(
        f"the live collection of {record.alias!r} is {record.name!r}, built{where}, but the Qdrant this process "
        f"is configured for ({here}) {seen}. If QDRANT_URL (or OUTBOXD_QDRANT__PATH) is wrong, fix it: nothing "
        "was written. If this is the right Qdrant and the collection was lost (a new server, a lost volume), "
        "run `outboxd reconcile --repair --recreate-missing` once: it creates the collection empty here and "
        "enqueues every chunk, which the daemons then rebuild from PostgreSQL."
    )


def live_of(records: list[CollectionRecord], alias: str) -> CollectionRecord | None:
    """The live record of the alias among these (a listing already read)."""
    return next((r for r in records if r.alias == alias and r.status == "live"), None)


@dataclass(frozen=True, slots=True)
class Home:
    """Which Qdrant holds a collection: the id in its metadata, and where it was seen."""

    uid: str
    location: str


@dataclass(frozen=True, slots=True)
class CollectionView:
    """One physical collection as outboxd sees it: where the alias points, what the
    catalog says of it, and the model fingerprint its vectors were made with (the
    collection's own record in Qdrant where it can be read, else the catalog's)."""

    alias: str
    name: str | None  # the physical collection; None: there is none yet
    exists: bool  # in Qdrant
    fingerprint: ModelFingerprint | None
    status: str | None  # the catalog's: live, building, retired; None: not in the catalog
    alias_target: str | None  # where the Qdrant alias points now (what readers see)
    record: CollectionRecord | None = None  # the catalog's row, where there is one
    uid: str | None = None  # the id the collection's metadata in Qdrant holds
    sparse: bool = False  # it has the bm25 sparse vector (native hybrid search)

    def check_home(self, here: str) -> None:
        """Refuse (78) a Qdrant that is not where the catalog's live collection was
        built: it lacks the collection, or holds one of that name with another id."""
        record = self.record
        if record is None or record.status != "live":
            return
        if not self.exists:
            raise not_here(record, here, None)
        if record.qdrant_uid is not None and self.uid != record.qdrant_uid:
            raise not_here(record, here, self.uid or "none")

    @property
    def retired(self) -> bool:
        return self.status == "retired"


async def view(qdrant, alias: str, record: CollectionRecord | None) -> CollectionView:
    """The collection behind `record` (the catalog's), else behind the alias."""
    alias_target = await resolve_alias(qdrant, alias)
    name = record.name if record is not None else alias_target
    exists = bool(name) and await qdrant.collection_exists(name)
    info = await qdrant.get_collection(name) if exists else None
    fingerprint, uid = identity(info) if info is not None else (None, None)
    if fingerprint is None and record is not None:
        fingerprint = record.fingerprint
    return CollectionView(alias, name, exists, fingerprint, record.status if record else None, alias_target,
                          record, uid, sparse=info is not None and has_sparse(info))


def _row(name: str, alias: str, fp: ModelFingerprint, home: "Home | None" = None) -> dict:
    """The catalog row's fields for a collection made by `fp` (living at `home`)."""
    return dict(
        qdrant_uid=home.uid if home else None,
        qdrant_location=home.location if home else None,
        name=name,
        alias=alias,
        model_name=fp.name,
        dimension=fp.dimension,
        normalized=fp.normalized,
        max_seq_length=fp.max_seq_length,
        fingerprint_id=fp.id,
        variant=fp.variant,
    )


class Catalog:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool
        self.db = CatalogRepository(pool)

    async def live(self, alias: str) -> CollectionRecord | None:
        row = await self.db.live(alias)
        return CollectionRecord(**row) if row else None

    async def retired(self, alias: str) -> list[CollectionRecord]:
        """The alias's retired collections, the most recently retired first (the rollback target)."""
        return sorted((r for r in await self.records(alias) if r.status == "retired"),
                      key=lambda r: r.updated_at, reverse=True)

    async def resolve(self, alias: str, qdrant) -> CollectionView:
        """The live collection of the alias: the catalog's, else where the alias points."""
        return await view(qdrant, alias, await self.live(alias))

    async def register_live(self, name: str, alias: str, fp: ModelFingerprint, home: "Home") -> CollectionRecord:
        """Record `name` as live unless the alias already has a live collection;
        returns whichever is live now."""
        await self.db.register_live(**_row(name, alias, fp, home))
        live = await self.live(alias)
        assert live is not None
        return live

    async def upsert(self, name: str, alias: str, fp: ModelFingerprint, status: str,
                     home: "Home | None" = None) -> CollectionRecord:
        return CollectionRecord(**await self.db.upsert(**_row(name, alias, fp, home), status=status))

    async def record_home(self, name: str, home: "Home", *, replace: bool = False) -> str:
        """Where `name` lives: reached under another URL, adopted (a row without an
        id keeps the first one offered), or recreated (replace). The id recorded now."""
        return await self.db.record_home(name, qdrant_uid=home.uid, qdrant_location=home.location,
                                         replace=replace)

    async def records(self, alias: str | None = None) -> list[CollectionRecord]:
        return [CollectionRecord(**r) for r in await self.db.records(alias)]

    async def switch_live(self, alias: str, name: str) -> None:
        """Retire the alias's live collection and make `name` live, atomically."""
        await self.db.switch_live(alias, name)

    async def forget(self, name: str) -> bool:
        return await self.db.forget(name)
