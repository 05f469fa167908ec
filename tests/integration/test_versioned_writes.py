"""Versioned writes (QdrantStore.write): a point takes a write only over an older
version or none, decided by Qdrant itself at the moment it applies the write, so
a writer that planned its write before a pause cannot put an older state back.
Against the session's Qdrant (its server, else local mode)."""
from __future__ import annotations

import uuid

import pytest
from qdrant_client import models

from daemon.core.plan import VERSION_KEY
from daemon.core.qdrant_store import QdrantStore, Upserts

pytestmark = [pytest.mark.integration]


@pytest.fixture
async def store(qdrant, collection):
    await qdrant.create_collection(collection, vectors_config=models.VectorParams(size=2, distance="Cosine"))
    return QdrantStore(qdrant, collection, collection)


def ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


async def held(store: QdrantStore, point_ids: list[str]) -> dict[str, int | None]:
    records = await store.client.retrieve(store.collection, point_ids, with_payload=True)
    return {str(r.id): (r.payload or {}).get(VERSION_KEY) for r in records}


async def put(store: QdrantStore, versions: dict[str, int | None]) -> int:
    upserts = Upserts()
    for point_id, version in versions.items():
        upserts.add(point_id, [1.0, 0.0], {} if version is None else {VERSION_KEY: version})
    return await store.write(upserts, [], [], {k: v for k, v in versions.items() if v is not None})


async def test_an_older_version_never_lands_over_a_newer_one(store):
    a, b, c = ids(3)
    await put(store, {a: 5, b: None})
    assert await put(store, {a: 3, b: 4, c: 2}) == 1  # a holds 5: left; b held no version; c is new
    assert await held(store, [a, b, c]) == {a: 5, b: 4, c: 2}
    assert await put(store, {a: 7}) == 0
    assert (await held(store, [a]))[a] == 7


async def test_a_point_the_shared_condition_left_out_is_written_on_its_own(store):
    """One batch: a's write (12) over its 10, b's (5) over its 1. The batch's shared condition
    (older than 5) leaves a out; a is then written alone on its own version."""
    a, b = ids(2)
    await put(store, {a: 10, b: 1})
    assert await put(store, {a: 12, b: 5}) == 0
    assert await held(store, [a, b]) == {a: 12, b: 5}


async def test_a_delete_removes_only_an_older_state(store):
    a, b, c, d = ids(4)
    await put(store, {a: 8, b: 2, c: None, d: 20})
    newer = await store.write(None, [], [a, b, c, d], {a: 6, b: 9, c: 9, d: 30})
    assert newer == 1  # a holds 8, newer than its delete (6): it stays
    assert await held(store, [a, b, c, d]) == {a: 8}
    await store.write(None, [], [a], {a: 9})
    assert await held(store, [a]) == {}


async def test_unversioned_writes_are_unconditional(store):
    a, = ids(1)
    await put(store, {a: 50})
    upserts = Upserts()
    upserts.add(a, [0.0, 1.0], {"title": "written without a version"})
    assert await store.write(upserts, [], []) == 0
    assert await held(store, [a]) == {a: None}
