"""The catalog of collections (outboxd.collections): one row per physical
Qdrant collection, with the alias it serves, the model fingerprint that made
its vectors, its status (live, building, retired) and where it lives.

Each method runs one named query of sql/queries.sql in its own short
autocommit statement, except switch_live, whose two statements are one short
transaction. Rows come back as dicts; daemon.core.catalog decides what they
mean.
"""
from __future__ import annotations

from psycopg_pool import AsyncConnectionPool

from db.gateway import fetch, transaction


class CatalogRepository:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def live(self, alias: str) -> dict | None:
        """The alias's live collection; None: it has none."""
        return next(iter(await fetch(self.pool, "live_collection", alias=alias)), None)

    async def records(self, alias: str | None = None) -> list[dict]:
        """Every collection of the alias (None: of every alias), by alias and age."""
        return await fetch(self.pool, "list_collections", alias=alias)

    async def register_live(self, name: str, alias: str, *, model_name: str, dimension: int, normalized: bool,
                            max_seq_length: int | None, fingerprint_id: str, variant: str | None,
                            qdrant_uid: str | None, qdrant_location: str | None) -> None:
        """Record the collection as live unless its alias has a live one already
        (then nothing changes: the caller reads which one is)."""
        await fetch(self.pool, "register_live_collection", name=name, alias=alias, model_name=model_name,
                    dimension=dimension, normalized=normalized, max_seq_length=max_seq_length,
                    fingerprint_id=fingerprint_id, variant=variant, qdrant_uid=qdrant_uid,
                    qdrant_location=qdrant_location)

    async def upsert(self, name: str, alias: str, *, status: str, model_name: str, dimension: int,
                     normalized: bool, max_seq_length: int | None, fingerprint_id: str, variant: str | None,
                     qdrant_uid: str | None, qdrant_location: str | None) -> dict:
        """Record the collection with this status (and home, where given), new or not; its row now."""
        rows = await fetch(self.pool, "upsert_collection", name=name, alias=alias, status=status,
                           model_name=model_name, dimension=dimension, normalized=normalized,
                           max_seq_length=max_seq_length, fingerprint_id=fingerprint_id, variant=variant,
                           qdrant_uid=qdrant_uid, qdrant_location=qdrant_location)
        return rows[0]

    async def record_home(self, name: str, *, qdrant_uid: str, qdrant_location: str, replace: bool) -> str:
        """Where the collection lives; a row without an id takes this one, replace:
        any row does. The id recorded now."""
        rows = await fetch(self.pool, "record_collection_home", name=name, qdrant_uid=qdrant_uid,
                           qdrant_location=qdrant_location, replace=replace)
        return rows[0]["qdrant_uid"]

    async def switch_live(self, alias: str, name: str) -> None:
        """Retire the alias's live collection and make `name` live, in one
        transaction (the alias never has two live ones). LookupError, and nothing
        changed, where `name` is not a collection of the alias."""
        async with transaction(self.pool) as tx:
            await tx.fetch("retire_live_collection", alias=alias)
            if not await tx.fetch("make_live_collection", alias=alias, name=name):
                raise LookupError(f"collection {name!r} is not in the catalog for alias {alias!r}")

    async def forget(self, name: str) -> bool:
        """Delete a retired collection's row; False: no such retired row."""
        return bool(await fetch(self.pool, "delete_collection_record", name=name))

