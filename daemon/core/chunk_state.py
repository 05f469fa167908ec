"""A chunk as PostgreSQL has it now, and the Qdrant payload it projects to.

The payload is the documented contract readers filter on: document_id,
source_id, chunk_index, text (first 1000 characters), token_count,
content_hash, metadata, title, url, document_type, plus embedding_model (the
fingerprint id of the model that made the vector) and truncated (the text was
longer than the model's window).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from daemon.errors import InvalidChunkError

PAYLOAD_TEXT_CHARS = 1000


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

    def payload(self, model_id: str) -> dict[str, Any]:
        metadata = self.metadata if self.metadata is not None else {}
        if not isinstance(metadata, dict):
            raise InvalidChunkError(
                f"chunk {self.chunk_id}: metadata is a JSON {type(metadata).__name__}, but the Qdrant "
                "payload needs an object so readers can filter on metadata.<key>; store an object "
                "(e.g. {\"items\": [...]}); the fix itself re-applies the chunk, or run "
                "`outboxd dead-letters retry --error metadata`"
            )
        return {
            "document_id": str(self.document_id),
            "source_id": str(self.source_id),
            "chunk_index": self.chunk_index,
            "text": self.text[:PAYLOAD_TEXT_CHARS],
            "token_count": self.token_count,
            "content_hash": self.content_hash,
            "metadata": metadata,
            "title": self.title,
            "url": self.url,
            "document_type": self.document_type,
            "embedding_model": model_id,
        }
