"""A chunk as PostgreSQL has it now, and the Qdrant payload it projects to.

The payload is the documented contract readers filter on (docs/search.md):

    text           the chunk's text, its first [payload] text_chars characters (0: whole)
    text_cut       the text above is shorter than the chunk's
    document_id, source_id, chunk_index, title, url, document_type
    metadata       the chunk's metadata object
    outboxd        outboxd's bookkeeping, one object so that a reader leaves it out
                   of an LLM prompt in one step: content_hash, metadata_hash (stands
                   for the metadata, which may be large, so that telling what a
                   payload-only change changed needs only small keys, never the
                   point's bulk), embedding_model (the fingerprint id of the model
                   that made the vector), text_chars (what text was cut to),
                   token_count, truncated (the text was longer than the model's
                   window), version and sparse (what the point's
                   sparse vector was made with; None: it has none)

The langchain profile also puts the provenance keys inside metadata, where
LangChain's QdrantVectorStore looks for a Document's metadata.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import orjson

from daemon.errors import InvalidChunkError

PAYLOAD_TEXT_CHARS = 1000  # [payload] text_chars's default
# Deepest nesting of a chunk's metadata that outboxd accepts. Real metadata is a
# few levels deep; far deeper JSON cannot be serialised everywhere it must go (a
# Qdrant server parses JSON to a recursion limit of 128, Python's pickling in local
# mode fails near 500, orjson at 255), so it is refused by name instead.
MAX_METADATA_DEPTH = 64
BOOKKEEPING = "outboxd"  # payload key of the object that groups outboxd's own keys
METADATA_HASH = "metadata_hash"  # keys inside it
SPARSE = "sparse"
VERSION = "version"
PROVENANCE = ("document_id", "source_id", "chunk_index", "title", "url", "document_type")


@dataclass(frozen=True, slots=True)
class Projection:
    """What a chunk's point holds besides the chunk itself: which model made its
    vector, what its sparse vector is made with (None: it has none), and how the
    payload is laid out ([payload])."""

    model_id: str
    sparse: str | None = None
    text_chars: int = PAYLOAD_TEXT_CHARS
    profile: str = "outboxd"


def metadata_hash(metadata: Any) -> str:
    return hashlib.blake2b(orjson.dumps(metadata, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()


def json_depth(value: Any, limit: int) -> tuple[int, str]:
    """(depth, path of its deepest branch) of a JSON value, without recursion:
    stops early once past limit. A scalar is 0 deep, {} and [] are 1."""
    deepest, where = 0, ""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, dict):
            children = ((f"{path}.{k}", v) for k, v in item.items())
        elif isinstance(item, list):
            children = ((f"{path}[{i}]", v) for i, v in enumerate(item))
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest, where = depth, path
        if deepest > limit:
            break
        stack.extend((child, depth, p) for p, child in children)
    return deepest, where


@dataclass(frozen=True, slots=True)
class ChunkState:
    chunk_id: UUID
    document_id: UUID
    source_id: UUID
    chunk_index: int
    text: str
    token_count: int | None
    content_hash: str
    metadata: Any
    title: str
    url: str | None
    document_type: str | None
    state_hash: str

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "ChunkState":
        return cls(**row)

    @property
    def has_text(self) -> bool:
        """Empty or whitespace-only text has no meaning to embed: no point."""
        return bool(self.text and self.text.strip())

    def check_limits(self) -> None:
        """InvalidChunkError, naming the chunk, the field and the limit, for a
        chunk no payload can be made of (both the upsert and the payload-only
        path go through payload(), the Kafka relay through this)."""
        metadata = self.metadata
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidChunkError(
                f"chunk {self.chunk_id}: metadata is a JSON {type(metadata).__name__}, but the Qdrant "
                "payload needs an object so readers can filter on metadata.<key>; store an object "
                "(e.g. {\"items\": [...]}); the fix itself re-applies the chunk, or run "
                "`outboxd dead-letters retry --error metadata`"
            )
        if not metadata or not any(isinstance(v, (dict, list)) for v in metadata.values()):
            return  # flat metadata, the common case: one level deep, nothing to walk
        depth, path = json_depth(metadata, MAX_METADATA_DEPTH)
        if depth > MAX_METADATA_DEPTH:
            raise InvalidChunkError(
                f"chunk {self.chunk_id}: metadata is nested more than {MAX_METADATA_DEPTH} levels deep "
                f"(at metadata{path[:200]}), deeper than outboxd accepts (the limit is {MAX_METADATA_DEPTH}); "
                "flatten it (e.g. store deep structures as a JSON string); the fix itself re-applies the chunk, "
                "or run `outboxd dead-letters retry --error nested`"
            )

    def payload(self, projection: Projection) -> dict[str, Any]:
        """The point's payload (without `truncated`, which the embedding decides, nor a version)."""
        self.check_limits()
        limit = projection.text_chars
        cut = bool(limit) and len(self.text) > limit
        provenance = {
            "document_id": str(self.document_id),
            "source_id": str(self.source_id),
            "chunk_index": self.chunk_index,
            "title": self.title,
            "url": self.url,
            "document_type": self.document_type,
        }
        metadata = self.metadata if self.metadata is not None else {}
        if projection.profile == "langchain":
            # provenance wins over a metadata key of the same name: the reader asked for it there
            metadata = {**metadata, **provenance, "text_cut": cut}
        return {
            "text": self.text[:limit] if cut else self.text,
            "text_cut": cut,
            **provenance,
            "metadata": metadata,
            BOOKKEEPING: {
                "content_hash": self.content_hash,
                "text_chars": limit,
                METADATA_HASH: metadata_hash(metadata),
                "embedding_model": projection.model_id,
                "token_count": self.token_count,
                SPARSE: projection.sparse,
            },
        }
