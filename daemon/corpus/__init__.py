"""The shipped corpus: about thirty short original documents (databases, the
outbox pattern, vector search, Kafka, PostgreSQL, cooking, astronomy,
gardening, the history of computing, and more) for demos, search-quality tests
and trying outboxd out. It is part of the package (corpus.json), written for
this project and licensed with it.

    from daemon.corpus import load_corpus
    from db.gateway import make_pool

    async with make_pool(DATABASE_URL, application_name="corpus", min_size=1, max_size=1) as pool:
        ids = await load_corpus(pool)

Each paragraph becomes one chunk; the capture triggers enqueue them, and
`outboxd run --drain` embeds them.
"""
from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from psycopg_pool import AsyncConnectionPool

from db.demo import DemoContent

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


async def load_corpus(pool: AsyncConnectionPool) -> dict[str, Any]:
    """Insert the corpus through `pool` in one transaction: one source, its
    documents (title, url, document_type, metadata {"topic", "corpus"}) and
    one chunk per paragraph (chunk_index from 0, token_count = words,
    metadata {"topic", "paragraph"}).

    Returns the ids:

        {"source_id": UUID,
         "documents": {slug: {"id": UUID, "title": str, "document_type": str,
                              "topic": str, "chunk_ids": [UUID, ...]}, ...},
         "chunk_count": int}
    """
    data = _data()
    source = data["source"]
    shipped = data["documents"]
    written = await DemoContent(pool).insert_corpus(
        {"source_type": source["source_type"], "url": source["url"], "metadata": source["metadata"]},
        [
            {
                "title": doc["title"],
                "url": document_url(doc["slug"]),
                "document_type": doc["document_type"],
                "metadata": {"topic": doc["topic"], "corpus": source["metadata"]["corpus"]},
                "content": "\n\n".join(doc["paragraphs"]),
                "chunks": [{"text": text, "token_count": len(text.split()), "metadata": chunk_metadata(doc, i)}
                           for i, text in enumerate(doc["paragraphs"])],
            }
            for doc in shipped
        ],
    )
    documents = {
        doc["slug"]: {
            "id": ids["id"],
            "title": doc["title"],
            "document_type": doc["document_type"],
            "topic": doc["topic"],
            "chunk_ids": ids["chunk_ids"],
        }
        for doc, ids in zip(shipped, written["documents"], strict=True)
    }
    return {
        "source_id": written["source_id"],
        "documents": documents,
        "chunk_count": sum(len(d["chunk_ids"]) for d in documents.values()),
    }
