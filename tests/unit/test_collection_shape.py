"""The collection's configuration (daemon.core.collection_shape) and its shards'
placement (daemon.core.cluster), as pure decisions: what a new collection gets,
which differences are named and which are in place, and which replications a
raised replication factor needs."""
from __future__ import annotations

import pytest
from pydantic import ValidationError
from qdrant_client import models

from daemon.core.cluster import Placement, Shard
from daemon.core.collection_shape import CollectionShape
from daemon.core.settings import QdrantSettings


def info(**params) -> models.CollectionInfo:
    """A collection as Qdrant describes it: defaults, with `params` on the collection's params."""
    return models.CollectionInfo(
        status=models.CollectionStatus.GREEN, optimizer_status=models.OptimizersStatusOneOf.OK,
        segments_count=1, payload_schema={},
        config=models.CollectionConfig(
            params=models.CollectionParams(vectors=models.VectorParams(size=384, distance=models.Distance.COSINE),
                                           shard_number=1, replication_factor=1, write_consistency_factor=1,
                                           on_disk_payload=True, **params),
            hnsw_config=models.HnswConfig(m=16, ef_construct=100, full_scan_threshold=10000),
            optimizer_config=models.OptimizersConfig(deleted_threshold=0.2, vacuum_min_vector_number=1000,
                                                     default_segment_number=0, flush_interval_sec=5),
            wal_config=models.WalConfig(wal_capacity_mb=32, wal_segments_ahead=0),
        ),
    )


def test_unset_settings_ask_nothing_but_bm25_and_a_new_collection_gets_qdrants_defaults():
    shape = CollectionShape()
    assert shape.wanted() == {"sparse": "bm25"}
    assert CollectionShape(local=True).wanted() == {}  # local mode makes no sparse vector
    assert shape.create_kwargs(384) == {
        "vectors_config": models.VectorParams(size=384, distance=models.Distance.COSINE),
        "sparse_vectors_config": {"bm25": models.SparseVectorParams(modifier=models.Modifier.IDF)}}
    assert shape.create_kwargs(384, sparse=False) == {
        "vectors_config": models.VectorParams(size=384, distance=models.Distance.COSINE)}
    found = {d.name: d for d in shape.differences(info())}
    assert list(found) == [
        "sparse", "index document_id", "index source_id", "index document_type", "index outboxd.content_hash"]
    assert found["sparse"].in_place  # create_vector_name adds it to the live collection


def test_a_readers_payload_indexes_are_part_of_every_collection():
    shape = CollectionShape(QdrantSettings(payload_indexes='{"metadata.topic": "keyword", "chunk_index": "integer"}'))
    assert shape.indexes()["metadata.topic"] == models.PayloadSchemaType.KEYWORD
    assert shape.indexes()["chunk_index"] == models.PayloadSchemaType.INTEGER
    assert {"index metadata.topic", "index chunk_index"} <= {d.name for d in shape.differences(info())}
    with pytest.raises(ValueError, match="keyword"):
        QdrantSettings(payload_indexes={"metadata.topic": "keywords"})
    with pytest.raises(ValueError, match="JSON"):
        QdrantSettings(payload_indexes="{metadata.topic: keyword}")


def test_each_setting_reaches_the_new_collection():
    shape = CollectionShape(QdrantSettings(shard_number=6, replication_factor=2, write_consistency_factor=2,
                                           on_disk=True, hnsw_m=32, indexing_threshold=0, quantization="binary",
                                           quantization_always_ram=False))
    kwargs = shape.create_kwargs(384)
    assert (kwargs["shard_number"], kwargs["replication_factor"], kwargs["write_consistency_factor"]) == (6, 2, 2)
    assert kwargs["vectors_config"].on_disk is True
    assert kwargs["hnsw_config"] == models.HnswConfigDiff(m=32)
    assert kwargs["optimizers_config"] == models.OptimizersConfigDiff(indexing_threshold=0)
    assert kwargs["quantization_config"].binary.always_ram is False


def test_differences_say_which_qdrant_changes_in_place():
    shape = CollectionShape(QdrantSettings(shard_number=3, replication_factor=2, hnsw_m=16, quantization="none"))
    found = {d.name: d for d in shape.differences(info())}
    assert "hnsw_m" not in found and "quantization" not in found  # as configured already
    assert found["shard_number"].in_place is False and "reindex" in str(found["shard_number"])
    assert found["replication_factor"].in_place is True
    update = shape.update_kwargs(list(found.values()))
    assert update == {"collection_params": models.CollectionParamsDiff(replication_factor=2)}


def test_the_tenant_key_is_indexed_as_a_tenant():
    indexes = CollectionShape(QdrantSettings(tenant_key="source_id")).indexes()
    assert indexes["source_id"] == models.UuidIndexParams(type=models.UuidIndexType.UUID, is_tenant=True)
    assert indexes["document_type"] == models.PayloadSchemaType.KEYWORD


def test_write_consistency_beyond_the_replicas_is_refused():
    with pytest.raises(ValidationError, match="no write could succeed"):
        QdrantSettings(write_consistency_factor=2)
    assert QdrantSettings(write_consistency_factor=2, replication_factor=2).write_consistency_factor == 2


def test_a_raised_replication_factor_adds_one_replica_per_shard_to_the_least_loaded_peers():
    placement = Placement(peers=[1, 2, 3], replication_factor=2, shards=[
        Shard(0, {1: "Active"}), Shard(1, {2: "Active"}), Shard(2, {3: "Active"})])
    assert len(placement.problems()) == 3
    moves = placement.replications()
    assert [(m.shard_id, m.from_peer_id) for m in moves] == [(0, 1), (1, 2), (2, 3)]
    targets = [m.to_peer_id for m in moves]
    assert sorted(targets) == [1, 2, 3] and all(m.to_peer_id != m.from_peer_id for m in moves)


def test_a_shard_without_an_active_replica_is_named_but_not_copied():
    placement = Placement(peers=[1, 2], replication_factor=2, shards=[Shard(0, {1: "Dead"}), Shard(1, {1: "Active",
                                                                                                     2: "Active"})])
    assert placement.replications() == []
    assert placement.problems() == ["shard 0 has 0 active replica(s) of 2 configured (peer 1: Dead)"]


def test_one_node_cannot_hold_two_replicas():
    placement = Placement(peers=[1], replication_factor=2, shards=[Shard(0, {1: "Active"})])
    assert placement.degraded() == [] and placement.replications() == []
