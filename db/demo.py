"""What `outboxd demo` and the shipped corpus write and read in the content
tables (db/sql/demo.sql), as an application would: the capture triggers see
ordinary writes. Each method is one short transaction; the demo's edits are
three, as an application would commit them."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from db.gateway import fetch, transaction


class DemoContent:
    """Sources, documents and chunks of the sample corpus, through a pool."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def insert_corpus(self, source: dict[str, Any], documents: list[dict[str, Any]]) -> dict[str, Any]:
        """One source, its documents and their chunks, in one transaction.

        source: source_type, url, metadata. Each document: title, url, document_type,
        metadata, content (what its content_hash is of) and chunks, each with text,
        token_count and metadata (chunk_index is its place in the list, from 0).
        Returns {"source_id": UUID, "documents": [{"id": UUID, "chunk_ids": [UUID, ...]}, ...]},
        the documents in the order given."""
        async with transaction(self.pool) as tx:
            (row,) = await tx.fetch("corpus_insert_source", source_type=source["source_type"], url=source["url"],
                                    metadata=Jsonb(source["metadata"]))
            source_id: UUID = row["id"]
            written = []
            for doc in documents:
                (row,) = await tx.fetch(
                    "corpus_insert_document", source_id=source_id, title=doc["title"], url=doc["url"],
                    document_type=doc["document_type"], metadata=Jsonb(doc["metadata"]), content=doc["content"],
                    total_chunks=len(doc["chunks"]),
                )
                chunk_ids = []
                for index, chunk in enumerate(doc["chunks"]):
                    (inserted,) = await tx.fetch(
                        "corpus_insert_chunk", document_id=row["id"], chunk_index=index, text=chunk["text"],
                        token_count=chunk["token_count"], metadata=Jsonb(chunk["metadata"]),
                    )
                    chunk_ids.append(inserted["id"])
                written.append({"id": row["id"], "chunk_ids": chunk_ids})
        return {"source_id": source_id, "documents": written}

    async def document_count(self) -> int:
        return (await fetch(self.pool, "demo_document_count"))[0]["n"]

    async def corpus_counts(self) -> dict[str, int]:
        """documents, chunks, and pending outbox events."""
        return (await fetch(self.pool, "demo_corpus_counts"))[0]

    async def progress(self) -> tuple[int, int]:
        """(chunks with text, those of them with an event still pending)."""
        row = (await fetch(self.pool, "demo_progress"))[0]
        return row["chunks"], row["pending"]

    async def documents(self) -> list[dict[str, Any]]:
        """Documents with at least one chunk of text (id, title, url, chunks), to choose the ones to edit."""
        return await fetch(self.pool, "demo_documents")

    async def retext_chunk(self, document_id: UUID, chunk_index: int,
                           new_text: Callable[[str], str]) -> dict[str, Any]:
        """Give the document's chunk at chunk_index (or its first chunk) new_text(its text), in one
        transaction; returns the chunk as it was (id, chunk_index, text) and the text it got (new_text)."""
        async with transaction(self.pool) as tx:
            (chunk,) = await tx.fetch("demo_chunk_to_edit", document_id=document_id, chunk_index=chunk_index)
            text = new_text(chunk["text"])
            await tx.fetch("demo_set_chunk_text", text=text, id=chunk["id"])
        return {**chunk, "new_text": text}

    async def retitle_document(self, document_id: UUID, title: str) -> list[UUID]:
        """Set the document's title, in one transaction; returns its chunks with text, whose payloads follow."""
        async with transaction(self.pool) as tx:
            await tx.fetch("demo_set_document_title", title=title, id=document_id)
            rows = await tx.fetch("demo_document_chunks", document_id=document_id)
        return [r["id"] for r in rows]

    async def delete_document(self, document_id: UUID) -> None:
        """Delete the document; its chunks go with it (ON DELETE CASCADE), and the triggers capture that."""
        await fetch(self.pool, "demo_delete_document", id=document_id)
