"""The collection's configuration is the operator's: the [qdrant] settings shape
the collection outboxd creates; a daemon never changes one that exists;
`outboxd collection` shows the configured values beside the actual ones, names
each difference, and --apply makes those Qdrant can make in place."""
from __future__ import annotations

import asyncio
import json

import pytest
from qdrant_client import models

from daemon.core.collection_shape import CollectionShape
from daemon.core.settings import QdrantSettings
from tests.integration.test_exit_codes import outboxd, report
from tests.processes import base_env, daemon_env
from tests.support import add_document, drain, open_qdrant, physical_collection, qdrant_choice, require_server

pytestmark = [pytest.mark.integration]

SHAPED = {
    "OUTBOXD_QDRANT__HNSW_M": 8,
    "OUTBOXD_QDRANT__HNSW_EF_CONSTRUCT": 64,
    "OUTBOXD_QDRANT__ON_DISK": "true",
    "OUTBOXD_QDRANT__INDEXING_THRESHOLD": 1000,
    "OUTBOXD_QDRANT__QUANTIZATION": "scalar",
    "OUTBOXD_QDRANT__TENANT_KEY": "source_id",
    "OUTBOXD_QDRANT__SHARD_NUMBER": 2,
}


def collection_info(path, alias: str) -> models.CollectionInfo:
    async def read() -> models.CollectionInfo:
        client = open_qdrant(path)
        try:
            return await client.get_collection(await physical_collection(client, alias))
        finally:
            await client.close()

    return asyncio.run(read())


@pytest.mark.slow
def test_the_collection_is_created_as_configured_and_changed_only_by_the_operator(conn, dsn, collection, tmp_path):
    require_server()
    path = tmp_path / "qdrant"
    add_document(conn, ["a chunk about stars", "a chunk about the sea"], document_type="note")
    env = daemon_env(dsn, path, collection, **SHAPED)
    created = outboxd(["run", "--drain"], env, tmp_path, timeout=240)
    assert created.returncode == 0, report(created)

    info = collection_info(path, collection)
    actual = CollectionShape().actual(info)
    assert {k: actual[k] for k in ("hnsw_m", "hnsw_ef_construct", "on_disk", "indexing_threshold", "quantization",
                                   "tenant_key", "shard_number")} == {
        "hnsw_m": 8, "hnsw_ef_construct": 64, "on_disk": True, "indexing_threshold": 1000, "quantization": "scalar",
        "tenant_key": "source_id", "shard_number": 2}
    schema = {name: index.data_type.value for name, index in info.payload_schema.items()}
    assert schema == {"document_id": "uuid", "source_id": "uuid", "document_type": "keyword",
                      "outboxd.content_hash": "keyword"}
    check = outboxd(["collection", "--check"], env, tmp_path)
    assert check.returncode == 0 and "the collection is as configured" in check.stdout, report(check)
    found = outboxd(["search", "stars", "--json", "--limit", "1"], env, tmp_path, timeout=240)  # rescored
    assert found.returncode == 0, report(found)
    assert json.loads(found.stdout)["hits"][0]["text"] == "a chunk about stars", report(found)

    # The operator changes the settings: a daemon start leaves the collection as it is ...
    changed = {**env, "OUTBOXD_QDRANT__HNSW_M": "32", "OUTBOXD_QDRANT__QUANTIZATION": "none"}
    restarted = outboxd(["run", "--drain"], changed, tmp_path, timeout=240)
    assert restarted.returncode == 0, report(restarted)
    assert CollectionShape().actual(collection_info(path, collection))["hnsw_m"] == 8
    # ... the dry run names each difference and changes nothing ...
    dry = outboxd(["collection"], changed, tmp_path)
    assert dry.returncode == 0, report(dry)
    assert "differs: hnsw_m: configured 32, the collection has 8 (can change in place)" in dry.stdout, report(dry)
    assert "differs: quantization: configured none, the collection has scalar" in dry.stdout, report(dry)
    assert outboxd(["collection", "--check"], changed, tmp_path).returncode == 3
    status = outboxd(["status", "--json"], changed, tmp_path)
    configuration = json.loads(status.stdout)["qdrant"]["configuration"]
    assert configuration["actual"]["hnsw_m"] == 8 and configuration["configured"]["hnsw_m"] == 32, report(status)
    assert any(d.startswith("hnsw_m: configured 32") for d in configuration["differences"]), report(status)
    assert CollectionShape().actual(collection_info(path, collection))["quantization"] == "scalar"
    # ... and --apply makes them.
    applied = outboxd(["collection", "--apply", "--json"], changed, tmp_path)
    assert applied.returncode == 0, report(applied)
    assert {"hnsw_m", "quantization"} <= set(json.loads(applied.stdout)["applied"]), report(applied)
    after = CollectionShape().actual(collection_info(path, collection))
    assert (after["hnsw_m"], after["quantization"]) == (32, "none")
    assert outboxd(["collection", "--check"], changed, tmp_path).returncode == 0

    # What Qdrant fixes at creation is not applied in place: the message says it takes a reindex.
    reshard = {**changed, "OUTBOXD_QDRANT__SHARD_NUMBER": "3"}
    fixed = outboxd(["collection", "--apply"], reshard, tmp_path)
    assert fixed.returncode == 3, report(fixed)
    assert "shard_number: configured 3, the collection has 2 (fixed at creation" in fixed.stdout, report(fixed)
    assert "reindex" in fixed.stdout, report(fixed)


@pytest.mark.slow
def test_an_index_of_an_older_type_is_retyped_by_apply_and_never_by_a_start(conn, dsn, collection, embedder,
                                                                            make_settings, tmp_path):
    """A collection made before ids were indexed as uuids keeps its keyword index
    across daemon starts; `outboxd collection --apply` retypes it, and filters still match."""
    require_server()
    path = tmp_path / "qdrant"
    doc, _ = add_document(conn, ["a chunk"])

    async def older_index() -> str:
        client = open_qdrant(path)
        try:
            await drain(make_settings(**qdrant_choice(path)), dsn, embedder, client)
            physical = await physical_collection(client, collection)
            await client.delete_payload_index(physical, "document_id", wait=True)
            await client.create_payload_index(physical, "document_id", models.PayloadSchemaType.KEYWORD, wait=True)
            await drain(make_settings(**qdrant_choice(path)), dsn, embedder, client)  # a start retypes nothing
            return physical
        finally:
            await client.close()

    physical = asyncio.run(older_index())
    assert collection_info(path, collection).payload_schema["document_id"].data_type.value == "keyword"
    env = daemon_env(dsn, path, collection)
    applied = outboxd(["collection", "--apply"], env, tmp_path)
    assert applied.returncode == 0 and "applied: index document_id" in applied.stdout, report(applied)

    async def matched() -> int:
        client = open_qdrant(path)
        try:
            found = await client.count(physical, exact=True, count_filter=models.Filter(must=[models.FieldCondition(
                key="document_id", match=models.MatchValue(value=str(doc)))]))
            return found.count
        finally:
            await client.close()

    assert collection_info(path, collection).payload_schema["document_id"].data_type.value == "uuid"
    assert asyncio.run(matched()) == 1


def test_local_mode_says_the_collection_settings_are_a_servers(conn, dsn, collection, embedder, make_settings,
                                                               tmp_path):
    path = tmp_path / "local"
    add_document(conn, ["a chunk"])

    async def converge() -> None:
        from qdrant_client import AsyncQdrantClient

        client = AsyncQdrantClient(path=str(path))
        try:
            await drain(make_settings(qdrant={"path": path, "url": None}), dsn, embedder, client)
        finally:
            await client.close()

    asyncio.run(converge())
    env = base_env(DATABASE_URL=dsn, OUTBOXD_COLLECTION=collection, OUTBOXD_QDRANT__PATH=str(path))
    result = outboxd(["collection", "--check"], env, tmp_path)
    assert result.returncode == 0, report(result)
    assert "local mode" in result.stdout, report(result)


def test_the_configuration_reaches_a_search():
    """With quantization, searches rescore with the original vectors (oversampled as configured)."""
    shape = CollectionShape(QdrantSettings(quantization="binary", search_oversampling=2.0))
    assert shape.search_params() == models.SearchParams(
        quantization=models.QuantizationSearchParams(rescore=True, oversampling=2.0))
    assert CollectionShape().search_params() is None


@pytest.mark.slow
def test_a_shard_number_change_is_a_rebuild_readers_never_miss(conn, dsn, collection, tmp_path):
    """shard_number is fixed at creation: `outboxd reindex --rebuild` builds a new
    collection of the same model with the configured shards, verifies it and moves
    the alias; the old one is kept for --rollback."""
    require_server()
    path = tmp_path / "qdrant"
    add_document(conn, [f"chunk number {i}" for i in range(6)])
    env = daemon_env(dsn, path, collection, OUTBOXD_QDRANT__SHARD_NUMBER=1)
    assert outboxd(["run", "--drain"], env, tmp_path, timeout=240).returncode == 0
    before = collection_info(path, collection)

    resharded = {**env, "OUTBOXD_QDRANT__SHARD_NUMBER": "2"}
    rebuilt = outboxd(["reindex", "--rebuild", "--json"], resharded, tmp_path, timeout=300)
    assert rebuilt.returncode == 0, report(rebuilt)
    result = json.loads(rebuilt.stdout)
    assert result["collection"] != result["previous"] and result["built"] == 6, result
    after = collection_info(path, collection)
    assert (before.config.params.shard_number, after.config.params.shard_number) == (1, 2)
    assert after.points_count == 6
    assert outboxd(["collection", "--check"], resharded, tmp_path).returncode == 0
    check = outboxd(["reconcile", "--check"], resharded, tmp_path, timeout=240)
    assert check.returncode == 0, report(check)
    assert outboxd(["reindex", "--rebuild", "--rollback"], resharded, tmp_path).returncode == 2
