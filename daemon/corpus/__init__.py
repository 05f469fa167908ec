"""The shipped corpus: about thirty short original documents (databases, the
outbox pattern, vector search, Kafka, PostgreSQL, cooking, astronomy,
gardening, the history of computing, and more) for demos, search-quality tests
and trying outboxd out. It is part of the package (corpus.json), written for
this project and licensed with it.

    import psycopg
    from daemon.corpus import load_corpus

    with psycopg.connect(DATABASE_URL) as conn:
        ids = load_corpus(conn)

Each paragraph becomes one chunk; the capture triggers enqueue them, and
`outboxd run --drain` embeds them.
"""
from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb

CORPUS_FILE = "corpus.json"


@cache
def _data() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath(CORPUS_FILE).read_text(encoding="utf-8"))


def corpus_documents() -> list[dict[str, Any]]:
    """The documents as shipped (slug, title, document_type, topic, paragraphs), without a database."""
    return [dict(d, paragraphs=list(d["paragraphs"])) for d in _data()["documents"]]


def document_url(slug: str) -> str:
    return f"{_data()['source']['url']}/{slug}"


def chunk_metadata(doc: dict[str, Any], index: int) -> dict[str, Any]:
    """chunks.metadata of paragraph `index` (0-based) of a corpus document."""
    return {"topic": doc["topic"], "paragraph": index + 1}


def load_corpus(conn: psycopg.Connection) -> dict[str, Any]:
    """Insert the corpus through `conn` in one transaction: one source, its
    documents (title, url, document_type, metadata {"topic", "corpus"}) and
    one chunk per paragraph (chunk_index from 0, token_count = words,
    metadata {"topic", "paragraph"}). Commits, unless the caller already has a
    transaction open on `conn` (then it is a savepoint of that transaction).

    Returns the ids:

        {"source_id": UUID,
         "documents": {slug: {"id": UUID, "title": str, "document_type": str,
                              "topic": str, "chunk_ids": [UUID, ...]}, ...},
         "chunk_count": int}
    """
    data = _data()
    source = data["source"]
    documents: dict[str, dict[str, Any]] = {}
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "INSERT INTO sources (source_type, url, status, metadata) VALUES (%s, %s, 'completed', %s) RETURNING id",
            (source["source_type"], source["url"], Jsonb(source["metadata"])),
        )
        source_id: UUID = cur.fetchone()[0]
        for doc in data["documents"]:
            paragraphs = doc["paragraphs"]
            cur.execute(
                "INSERT INTO documents (source_id, title, url, document_type, metadata, content_hash, "
                "total_chunks, status) VALUES (%s, %s, %s, %s, %s, public.content_sha256(%s), %s, 'completed') "
                "RETURNING id",
                (
                    source_id,
                    doc["title"],
                    document_url(doc["slug"]),
                    doc["document_type"],
                    Jsonb({"topic": doc["topic"], "corpus": source["metadata"]["corpus"]}),
                    "\n\n".join(paragraphs),
                    len(paragraphs),
                ),
            )
            doc_id: UUID = cur.fetchone()[0]
            chunk_ids = []
            for i, text in enumerate(paragraphs):
                cur.execute(
                    "INSERT INTO chunks (document_id, chunk_index, text, token_count, metadata) "
                    "VALUES (%s, %s, %s, %s, %s) RETURNING id",
                    (doc_id, i, text, len(text.split()), Jsonb(chunk_metadata(doc, i))),
                )
                chunk_ids.append(cur.fetchone()[0])
            documents[doc["slug"]] = {
                "id": doc_id,
                "title": doc["title"],
                "document_type": doc["document_type"],
                "topic": doc["topic"],
                "chunk_ids": chunk_ids,
            }
    return {
        "source_id": source_id,
        "documents": documents,
        "chunk_count": sum(len(d["chunk_ids"]) for d in documents.values()),
    }
