"""The collection's configuration, as the operator sets it in [qdrant]: what a
collection outboxd creates gets (daemon start, reindex, a recreated one alike),
what an existing one has, and each difference between the two, named with
whether Qdrant can change it in place.

Pure: it builds qdrant-client models and reads CollectionInfo, and writes
nothing. QdrantStore creates and reshapes collections with it; `outboxd
collection` and `outboxd status` show it. A setting left unset is Qdrant's
default: applied by nobody, compared with nothing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qdrant_client import models

from daemon.core.chunk_state import BOOKKEEPING
from daemon.core.settings import PayloadSettings, QdrantSettings

DENSE = ""  # the model's vector is the collection's unnamed one: every reader's default
SPARSE_VECTOR = "bm25"  # the sparse vector's name
# the payload fields outboxd's own search and writes filter on, indexed as what they hold
INDEXES: dict[str, models.PayloadSchemaType] = {
    "document_id": models.PayloadSchemaType.UUID,
    "source_id": models.PayloadSchemaType.UUID,
    "document_type": models.PayloadSchemaType.KEYWORD,
    f"{BOOKKEEPING}.content_hash": models.PayloadSchemaType.KEYWORD,
}


@dataclass(frozen=True)
class Difference:
    """One setting whose configured value the collection does not have."""

    name: str  # the [qdrant] setting, or "index <field>"
    configured: Any
    actual: Any
    in_place: bool  # Qdrant changes it on the live collection; else it takes a reindex

    def __str__(self) -> str:
        how = "can change in place" if self.in_place else "fixed at creation: takes `outboxd reindex --rebuild`"
        return f"{self.name}: configured {show(self.configured)}, the collection has {show(self.actual)} ({how})"


def show(value: Any) -> str:
    """A setting's value as the operator writes it (unset, true, 16)."""
    return "unset" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _vectors(info: models.CollectionInfo) -> models.VectorParams:
    params = info.config.params.vectors
    return params if isinstance(params, models.VectorParams) else models.VectorParams(size=0, distance="Cosine")


def _hnsw(info: models.CollectionInfo, name: str) -> Any:
    own = _vectors(info).hnsw_config  # a vector's own HNSW settings override the collection's
    return getattr(own, name, None) if own is not None and getattr(own, name, None) is not None else (
        getattr(info.config.hnsw_config, name, None))


def _quantization(info: models.CollectionInfo) -> Any:
    return _vectors(info).quantization_config or info.config.quantization_config


def _quantization_kind(info: models.CollectionInfo) -> str:
    q = _quantization(info)
    return "scalar" if isinstance(q, models.ScalarQuantization) else (
        "binary" if isinstance(q, models.BinaryQuantization) else "none" if q is None else type(q).__name__)


def _always_ram(info: models.CollectionInfo) -> bool | None:
    q = _quantization(info)
    inner = getattr(q, "scalar", None) or getattr(q, "binary", None)
    return getattr(inner, "always_ram", None)


def _sparse(info: models.CollectionInfo) -> str:
    return "bm25" if SPARSE_VECTOR in (info.config.params.sparse_vectors or {}) else "none"


def _tenant_key(info: models.CollectionInfo) -> str | None:
    for name, index in (info.payload_schema or {}).items():
        if getattr(index.params, "is_tenant", None):
            return name
    return None


@dataclass(frozen=True)
class Knob:
    """One setting of the [qdrant] table that shapes a collection: how a
    collection's value is read, and whether Qdrant can change it in place."""

    name: str
    read: Callable[[models.CollectionInfo], Any]
    in_place: bool = True


KNOBS = (
    Knob("shard_number", lambda i: i.config.params.shard_number, in_place=False),
    Knob("replication_factor", lambda i: i.config.params.replication_factor),
    Knob("write_consistency_factor", lambda i: i.config.params.write_consistency_factor),
    Knob("on_disk", lambda i: bool(_vectors(i).on_disk)),
    Knob("on_disk_payload", lambda i: i.config.params.on_disk_payload),
    Knob("hnsw_m", lambda i: _hnsw(i, "m")),
    Knob("hnsw_ef_construct", lambda i: _hnsw(i, "ef_construct")),
    Knob("indexing_threshold", lambda i: i.config.optimizer_config.indexing_threshold),
    Knob("memmap_threshold", lambda i: i.config.optimizer_config.memmap_threshold),
    Knob("quantization", _quantization_kind),
    Knob("quantization_always_ram", _always_ram),
    Knob("tenant_key", _tenant_key),
    Knob("sparse", _sparse),  # added in place (create_vector_name, Qdrant 1.18) or dropped
)


@dataclass(frozen=True)
class CollectionShape:
    """What [qdrant] asks of a collection. The default asks nothing of its own
    (Qdrant's defaults) and writes with medium ordering."""

    settings: QdrantSettings = field(default_factory=QdrantSettings)
    payload: PayloadSettings = field(default_factory=PayloadSettings)
    local: bool = False  # qdrant-client's local mode: no sparse vector (the server computes BM25)

    @classmethod
    def of(cls, settings: Any) -> CollectionShape:
        """The shape a daemon.config.Settings asks for (local mode where it names no server)."""
        return cls(settings.qdrant, settings.payload, local=settings.qdrant.url is None)

    @property
    def ordering(self) -> models.WriteOrdering:
        return models.WriteOrdering(self.settings.write_ordering)

    @property
    def read_consistency(self) -> int | None:
        """How many replicas the reads that plan a write must find agreeing. A write
        Qdrant could not confirm at write_consistency_factor may still have landed on
        some replicas; planned from one of those, its retry would find nothing to do
        and acknowledge what the cluster never confirmed. Read from as many replicas
        as a write must reach, a point they disagree on is not taken as written.
        None (Qdrant's default: one replica) where one confirmation is all a write needs."""
        factor = self.settings.write_consistency_factor
        return factor if factor is not None and factor > 1 else None

    def wanted(self) -> dict[str, Any]:
        """The configured values of every knob that is set."""
        s = self.settings
        values = {k.name: getattr(s, k.name) for k in KNOBS if getattr(s, k.name) is not None}
        if self.local:
            values.pop("sparse", None)
        if s.quantization in (None, "none"):
            values.pop("quantization_always_ram", None)  # it describes quantized vectors only
        return values

    # --- creating a collection ------------------------------------------------
    def create_kwargs(self, dimension: int, *, sparse: bool = True) -> dict[str, Any]:
        """The arguments of create_collection beyond the name and metadata (sparse:
        False where no sparse vector can be made, in local mode)."""
        s = self.settings
        kwargs: dict[str, Any] = {
            "vectors_config": models.VectorParams(
                size=dimension, distance=models.Distance.COSINE, on_disk=s.on_disk
            ),
            "shard_number": s.shard_number,
            "replication_factor": s.replication_factor,
            "write_consistency_factor": s.write_consistency_factor,
            "on_disk_payload": s.on_disk_payload,
            "hnsw_config": self._hnsw_diff(),
            "optimizers_config": self._optimizers_diff(),
            "quantization_config": self._quantization_config(),
            "sparse_vectors_config": {SPARSE_VECTOR: self.sparse_params()} if sparse and s.sparse == "bm25" else None,
        }
        if isinstance(kwargs["quantization_config"], models.Disabled):
            kwargs["quantization_config"] = None  # a new collection has none to remove
        return {k: v for k, v in kwargs.items() if v is not None}

    @staticmethod
    def sparse_params() -> models.SparseVectorParams:
        # IDF from the collection's own documents, which the server keeps as points change
        return models.SparseVectorParams(modifier=models.Modifier.IDF)

    def indexes(self) -> dict[str, Any]:
        """Each indexed payload field and its schema: outboxd's, then the operator's
        payload_indexes; the tenant key's marked is_tenant."""
        schemas: dict[str, Any] = {**INDEXES, **{k: models.PayloadSchemaType(v)
                                                for k, v in self.settings.payload_indexes.items()}}
        key = self.settings.tenant_key
        if key is not None:
            params = models.UuidIndexParams if INDEXES[key] == models.PayloadSchemaType.UUID else (
                models.KeywordIndexParams)
            schemas[key] = params(type=INDEXES[key].value, is_tenant=True)
        return schemas

    # --- an existing collection ---------------------------------------------------
    def actual(self, info: models.CollectionInfo) -> dict[str, Any]:
        """Every knob's value in this collection."""
        return {k.name: k.read(info) for k in KNOBS}

    def differences(self, info: models.CollectionInfo) -> list[Difference]:
        """Each configured value the collection lacks, and each payload index that is missing or of another type."""
        actual = self.actual(info)
        in_place = {k.name: k.in_place for k in KNOBS}
        found = [
            Difference(name, value, actual[name], in_place[name])
            for name, value in self.wanted().items()
            if actual[name] != value
        ]
        schema = info.payload_schema or {}
        for name, wanted in self.indexes().items():
            kind = _index_type(wanted)
            have = schema.get(name)
            have_kind = have.data_type.value if have is not None else None
            if have_kind != kind:
                found.append(Difference(f"index {name}", kind, have_kind, True))
        return found

    def update_kwargs(self, differences: list[Difference]) -> dict[str, Any]:
        """The arguments of update_collection that make the in-place differences
        (payload indexes and the tenant key are made by create_payload_index)."""
        names = {d.name for d in differences if d.in_place}
        s = self.settings
        kwargs: dict[str, Any] = {}
        params = {n: getattr(s, n) for n in ("replication_factor", "write_consistency_factor", "on_disk_payload")
                  if n in names}
        if params:
            kwargs["collection_params"] = models.CollectionParamsDiff(**params)
        if "on_disk" in names:
            kwargs["vectors_config"] = {"": models.VectorParamsDiff(on_disk=s.on_disk)}
        if names & {"hnsw_m", "hnsw_ef_construct"}:
            kwargs["hnsw_config"] = self._hnsw_diff()
        if names & {"indexing_threshold", "memmap_threshold"}:
            kwargs["optimizers_config"] = self._optimizers_diff()
        if names & {"quantization", "quantization_always_ram"}:
            kwargs["quantization_config"] = self._quantization_config()
        return kwargs

    def _hnsw_diff(self) -> models.HnswConfigDiff | None:
        s = self.settings
        if s.hnsw_m is None and s.hnsw_ef_construct is None:
            return None
        return models.HnswConfigDiff(m=s.hnsw_m, ef_construct=s.hnsw_ef_construct)

    def _optimizers_diff(self) -> models.OptimizersConfigDiff | None:
        s = self.settings
        if s.indexing_threshold is None and s.memmap_threshold is None:
            return None
        return models.OptimizersConfigDiff(indexing_threshold=s.indexing_threshold,
                                           memmap_threshold=s.memmap_threshold)

    def _quantization_config(self) -> Any:
        s = self.settings
        if s.quantization is None:
            return None
        if s.quantization == "none":
            return models.Disabled.DISABLED
        if s.quantization == "scalar":
            return models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
                type=models.ScalarType.INT8, always_ram=s.quantization_always_ram))
        return models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=s.quantization_always_ram))

    def search_params(self) -> models.SearchParams | None:
        """Search with the quantized vectors first, rescored with the originals (where quantization is on)."""
        s = self.settings
        if s.quantization in (None, "none"):
            return None
        return models.SearchParams(quantization=models.QuantizationSearchParams(
            rescore=s.search_rescore, oversampling=s.search_oversampling))


def _index_type(schema: Any) -> str:
    """"uuid", "keyword", ...: of a schema type, or of index params (which carry their type)."""
    return (schema if isinstance(schema, models.PayloadSchemaType) else schema.type).value
