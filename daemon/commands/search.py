"""`outboxd search QUERY`: hybrid retrieval (Qdrant + PostgreSQL full text)
from the command line, through daemon.hybrid_search.hybrid_search."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from uuid import UUID

from daemon.commands.common import open_services, print_json, print_table
from daemon.errors import EXIT_OK, EXIT_USAGE
from daemon.hybrid_search import FUSIONS, Hit, SearchFilters, hybrid_search

EXCERPT_CHARS = 100


def _weight(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


_weight.__name__ = "float"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return value


_positive.__name__ = "int"


def _metadata_value(text: str):
    """A JSON number, boolean or quoted string as that; anything else as a string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (str, int, float, bool)) else text


def _metadata(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, _metadata_value(value)


_metadata.__name__ = "KEY=VALUE"


def register(sub, parents) -> None:
    p = sub.add_parser(
        "search",
        parents=parents,
        help="hybrid search: semantic (Qdrant) and keyword (PostgreSQL) results, fused",
        description="Embed QUERY with the collection's model, take the best candidates from Qdrant and "
        "from PostgreSQL full-text search (websearch syntax: \"quoted phrase\", or, -word), fuse the two "
        "rankings and print the best chunks with their current text from PostgreSQL.",
    )
    p.add_argument("query", metavar="QUERY", help="what to look for")
    p.add_argument("--limit", type=_positive, default=10, metavar="N", help="results to show (default: 10)")
    p.add_argument("--candidates", type=_positive, default=50, metavar="N",
                   help="candidates taken from each search before fusing (default: 50)")
    p.add_argument("--fusion", choices=FUSIONS, default="weighted",
                   help="weighted: normalised scores, weighted (default); rrf: reciprocal rank fusion")
    p.add_argument("--vector-weight", type=_weight, default=0.7, metavar="W",
                   help="weight of the semantic score in weighted fusion; keyword gets 1 - W (default: 0.7)")
    p.add_argument("--source", type=UUID, metavar="ID", help="only chunks of this source")
    p.add_argument("--document", type=UUID, metavar="ID", help="only chunks of this document")
    p.add_argument("--document-type", metavar="T", help="only chunks of documents of this document_type")
    p.add_argument("--metadata", type=_metadata, action="append", default=[], metavar="KEY=VALUE",
                   help="only chunks whose metadata KEY equals VALUE (a JSON number, boolean or quoted "
                   "string, else text; a dotted KEY names a nested field); repeatable, all must match")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=execute)


def execute(args, settings) -> int:
    if not args.query.strip():
        print("outboxd search: the query is empty", file=sys.stderr)
        return EXIT_USAGE
    try:
        filters = SearchFilters(
            source_id=args.source,
            document_id=args.document,
            document_type=args.document_type,
            metadata=dict(args.metadata),
        )
    except ValueError as exc:
        print(f"outboxd search: {exc}", file=sys.stderr)
        return EXIT_USAGE
    hits = asyncio.run(_search(args, settings, filters))
    if args.json:
        print_json(
            {
                "query": args.query,
                "fusion": args.fusion,
                "vector_weight": args.vector_weight if args.fusion == "weighted" else None,
                "filters": {
                    "source_id": args.source,
                    "document_id": args.document,
                    "document_type": args.document_type,
                    "metadata": filters.metadata,
                },
                "hits": [h.as_dict() for h in hits],
            }
        )
    else:
        _print(args, hits)
    return EXIT_OK


async def _search(args, settings, filters: SearchFilters) -> list[Hit]:
    from daemon.embedding.embedder import Embedder

    embedder = Embedder(settings)
    try:
        async with open_services(settings) as (pool, client):
            await embedder.load()
            return await hybrid_search(
                pool,
                client,
                settings.collection,
                embedder,
                args.query,
                limit=args.limit,
                candidates=args.candidates,
                fusion=args.fusion,
                vector_weight=args.vector_weight,
                filters=filters,
            )
    finally:
        embedder.close()


def excerpt(text: str, chars: int = EXCERPT_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[: chars - 1].rstrip() + "…"


def _print(args, hits: list[Hit]) -> None:
    how = "reciprocal rank fusion" if args.fusion == "rrf" else f"weighted, vector {args.vector_weight:g}"
    rows = [
        {
            "rank": i,
            "score": f"{h.score:.4f}",
            "vector rank": h.vector_rank,
            "keyword rank": h.keyword_rank,
            "title": h.title,
            "excerpt": excerpt(h.text),
        }
        for i, h in enumerate(hits, start=1)
    ]
    title = f"{len(hits)} result{'s' if len(hits) != 1 else ''} for {args.query!r} ({how})"
    print_table(rows, ["rank", "score", "vector rank", "keyword rank", "title", "excerpt"], title=title)
