"""Where the vectors live: the `qdrant` table of daemon.config.Settings.

    QDRANT_URL=https://qdrant.internal:6333   (conventional; also OUTBOXD_QDRANT__URL)
    OUTBOXD_QDRANT__PREFER_GRPC=true          (or [qdrant] prefer_grpc = true in --config)

A Qdrant server (url, api_key, ca_file, the gRPC choice, the request timeout),
or qdrant-client's local mode in a folder (path); never both. The collection's
own configuration (shards, replicas, HNSW, quantization, what lives on disk:
the operator's choice, with Qdrant's own names) sits beside the connection:
daemon.core.collection_shape applies it when outboxd creates a collection (a
reindex's too) and compares it with what a collection has. Unset means
Qdrant's default, which outboxd then neither applies nor checks. Read by
daemon.core.qdrant_connect; kept apart from it so that building the settings
imports only pydantic.

Before they had a table of their own these settings were flat (OUTBOXD_QDRANT_PATH,
`qdrant_path` in the config file); those names still work, with a warning that
names the new one (daemon.config.Settings.renamed).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar, Literal

import orjson
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator

from daemon.settings.names import Table

PayloadIndexType = Literal["keyword", "integer", "float", "bool", "uuid", "datetime", "text"]


class QdrantSettings(Table):
    # the connection's fields, which were flat settings before this table existed (OUTBOXD_QDRANT_PATH)
    CONNECTION: ClassVar[tuple[str, ...]] = (
        "url", "api_key", "ca_file", "path", "timeout", "prefer_grpc", "grpc_port",
    )

    url: str | None = Field(
        None,
        validation_alias=AliasChoices("url", "QDRANT_URL"),
        description="Qdrant server URL. Unset: qdrant-client's local mode at --qdrant-path.",
    )
    api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("api_key", "QDRANT_API_KEY"),
        description="API key for the Qdrant server.",
    )
    ca_file: Path | None = Field(
        None,
        description="CA bundle (PEM) that signs the Qdrant server's certificate, for an https QDRANT_URL "
        "(default: SSL_CERT_FILE where set, else the system's CAs); REST and gRPC both use it.",
    )
    path: Path | None = Field(
        None, description="Local-mode storage folder (default: <data-dir>/qdrant); ':memory:' keeps nothing."
    )
    timeout: float = Field(30.0, gt=0, description="Seconds one Qdrant request may take.")
    prefer_grpc: bool = Field(
        False, description="Talk to the Qdrant server over gRPC (faster bulk writes) instead of REST."
    )
    grpc_port: int = Field(6334, ge=1, le=65535, description="The Qdrant server's gRPC port.")


    # --- the collection's own configuration (applied at creation; `outboxd collection` for one that exists)
    shard_number: int | None = Field(
        None, ge=1, description="Shards of a collection outboxd creates (Qdrant's default: one per node). Fixed "
        "at creation: changing it takes a reindex into a new collection.",
    )
    replication_factor: int | None = Field(
        None, ge=1, description="Copies of each shard on a cluster (Qdrant's default: 1). 2 keeps reads and "
        "writes answering while one node is down.",
    )
    write_consistency_factor: int | None = Field(
        None, ge=1, description="Replicas that must confirm a write before Qdrant (and so outboxd) acknowledges "
        "it (Qdrant's default: 1); at most the replication factor. Above 1, the reads that plan a write ask as "
        "many replicas, so a write that reached only some of them is made again.",
    )
    write_ordering: Literal["weak", "medium", "strong"] = Field(
        "medium", description="Qdrant's ordering of every write outboxd makes: medium routes the writes to one "
        "point through its shard's leader, so replicas apply them in the order outboxd made them; weak lets a "
        "later write reach a replica first; strong refuses writes while a shard's leader is down.",
    )
    on_disk: bool | None = Field(
        None, description="Keep the original vectors on disk (memory-mapped) instead of in RAM.",
    )
    on_disk_payload: bool | None = Field(
        None, description="Keep payloads on disk instead of in RAM (indexed fields stay fast).",
    )
    hnsw_m: int | None = Field(None, ge=0, description="HNSW graph edges per node (Qdrant's default: 16).")
    hnsw_ef_construct: int | None = Field(
        None, ge=4, description="HNSW neighbours considered while building the index (Qdrant's default: 100).",
    )
    indexing_threshold: int | None = Field(
        None, ge=0, description="KB of vectors a segment holds before Qdrant builds its HNSW index "
        "(Qdrant's default: 10000; 0 never indexes).",
    )
    memmap_threshold: int | None = Field(
        None, ge=0, description="KB of vectors a segment holds before Qdrant moves them to memory-mapped storage.",
    )
    quantization: Literal["none", "scalar", "binary"] | None = Field(
        None, description="Compress the vectors Qdrant searches first: scalar (int8, 4x smaller) or binary "
        "(1 bit, 32x smaller, for models that tolerate it); search rescores with the originals. none removes it.",
    )
    quantization_always_ram: bool = Field(
        True, description="Keep the quantized vectors in RAM while the originals may live on disk.",
    )
    tenant_key: Literal["source_id", "document_id", "document_type"] | None = Field(
        None, description="The payload field that partitions the collection between tenants (source_id is the "
        "natural one): indexed with is_tenant, so Qdrant stores each tenant's points together and a filtered "
        "search reads only its own.",
    )
    search_rescore: bool = Field(
        True, description="With quantization: rescore the candidates with the original vectors.",
    )
    search_oversampling: float | None = Field(
        None, ge=1.0, description="With quantization: candidates fetched per result before rescoring "
        "(Qdrant's default: 1.0).",
    )
    payload_indexes: dict[str, PayloadIndexType] = Field(
        default_factory=dict, description="Extra payload indexes, field -> type (keyword, integer, float, bool, "
        "uuid, datetime, text), e.g. {\"metadata.topic\": \"keyword\"}: created with every collection outboxd "
        "creates (every reindex too), so a reader's filter stays fast after a reindex.",
    )

    # --- the sparse vector: BM25, computed by the Qdrant server from each chunk's text
    sparse: Literal["bm25", "none"] = Field(
        "bm25", description="A sparse BM25 vector named bm25 beside the model's dense vector, computed by the "
        "Qdrant server from the chunk's whole text (IDF from the collection), so readers get native hybrid "
        "search. A server's only: local mode has none, and says so once. none: dense vectors only.",
    )
    bm25_language: str = Field(
        "english", min_length=1, description="The language of BM25's stemmer and stopwords (Qdrant's names: "
        "english, german, french, ...; none: neither).",
    )
    bm25_k: float | None = Field(None, gt=0, description="BM25's term frequency saturation (Qdrant's default: 1.2).")
    bm25_b: float | None = Field(
        None, ge=0, le=1, description="BM25's document length normalisation, 0 to 1 (Qdrant's default: 0.75).",
    )
    bm25_avg_len: float | None = Field(
        None, gt=0, description="The average chunk length in words that BM25 normalises by (Qdrant's default: 256).",
    )

    @field_validator("payload_indexes", mode="before")
    @classmethod
    def _indexes_from_json(cls, v: object) -> object:
        # OUTBOXD_QDRANT__PAYLOAD_INDEXES='{"metadata.topic": "keyword"}'
        if isinstance(v, (str, bytes)):
            try:
                return orjson.loads(v)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"not a JSON object of field -> index type ({exc})") from None
        return v

    def bm25_options(self) -> dict[str, Any]:
        """The options of the server's qdrant/bm25 model, as every document and query is sent with them."""
        options = {"language": self.bm25_language, "k": self.bm25_k, "b": self.bm25_b, "avg_len": self.bm25_avg_len}
        return {k: v for k, v in options.items() if v is not None}

    def sparse_id(self) -> str | None:
        """What a point's sparse vector was made with, as its payload records it (None: no sparse vector)."""
        if self.sparse == "none":
            return None
        options = orjson.dumps(self.bm25_options(), option=orjson.OPT_SORT_KEYS)
        return f"bm25-{hashlib.blake2b(options, digest_size=4).hexdigest()}"

    @model_validator(mode="after")
    def _consistency_within_replicas(self) -> QdrantSettings:
        w, r = self.write_consistency_factor, self.replication_factor
        if w is not None and w > (r or 1):
            raise ValueError(
                f"write_consistency_factor {w} asks more replicas to confirm a write than the replication factor "
                f"{r or 1} makes, so no write could succeed; lower OUTBOXD_QDRANT__WRITE_CONSISTENCY_FACTOR or "
                "raise OUTBOXD_QDRANT__REPLICATION_FACTOR"
            )
        return self


class PayloadSettings(Table):
    """What each point's payload holds beyond the documented keys (daemon.core.chunk_state)."""

    text_chars: int = Field(
        1000, ge=0, description="Characters of the chunk's text the payload's text holds (text_cut says where it "
        "holds fewer than the chunk has); 0: the whole text.",
    )
    profile: Literal["outboxd", "langchain"] = Field(
        "outboxd", description="langchain: the payload's metadata object also carries title, url, document_id, "
        "source_id, chunk_index, document_type and text_cut, which LangChain's QdrantVectorStore returns as a "
        "Document's metadata (with content_payload_key=\"text\").",
    )
