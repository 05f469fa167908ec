"""`outboxd search QUERY`: hybrid retrieval (Qdrant + PostgreSQL full text)
from the command line, through daemon.hybrid_search.hybrid_search."""
from __future__ import annotations

import json
from uuid import UUID

import click

from daemon.commands.options import json_option, settings_options

EXCERPT_CHARS = 100
FUSIONS = ("weighted", "rrf", "dbsf")  # daemon.hybrid_search.FUSIONS (not imported here: --help stays light)
KEYWORDS = ("auto", "qdrant", "postgres", "none")  # daemon.hybrid_search.KEYWORDS


def _metadata_value(text: str):
    """A JSON number, boolean or quoted string as that; anything else as a string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (str, int, float, bool)) else text


def parse_metadata(text: str) -> tuple[str, object]:
    """One --metadata KEY=VALUE."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, not {text!r}")
    return key, _metadata_value(value)


def _metadata(ctx, param, values: tuple[str, ...]) -> dict[str, object]:
    return dict(parse_metadata(text) for text in values)


@click.command(help="Embed QUERY with the collection's model, take the best candidates by meaning and by "
               "keywords, fuse the two rankings and print the best chunks with their current text from "
               "PostgreSQL. On a Qdrant server the keywords are the collection's own BM25 vector and the server "
               "fuses; in local mode (or with --keywords postgres) they come from PostgreSQL full-text search "
               "(websearch syntax: \"quoted phrase\", or, -word).")
@click.argument("query")
@click.option("--limit", type=click.IntRange(min=1), default=10, show_default=True, metavar="N",
              help="results to show")
@click.option("--candidates", type=click.IntRange(min=1), default=50, show_default=True, metavar="N",
              help="candidates taken from each search before fusing")
@click.option("--keywords", type=click.Choice(KEYWORDS), default="auto", show_default=True,
              help="where keyword candidates come from: qdrant (the collection's BM25 vector, fused by the server), "
              "postgres (full text, fused here), none (meaning alone); auto: qdrant where the collection has the "
              "BM25 vector, else postgres")
@click.option("--fusion", type=click.Choice(FUSIONS), default=None,
              help="rrf: reciprocal rank fusion; dbsf: distribution-based score fusion (qdrant's keywords); weighted: "
              "normalised scores, weighted (postgres's keywords) [default: rrf for qdrant, weighted for postgres]")
@click.option("--vector-weight", type=click.FloatRange(0.0, 1.0), default=0.7, show_default=True, metavar="W",
              help="weight of the semantic score in weighted fusion; keyword gets 1 - W")
@click.option("--source", type=click.UUID, metavar="ID", help="only chunks of this source")
@click.option("--document", type=click.UUID, metavar="ID", help="only chunks of this document")
@click.option("--document-type", metavar="T", help="only chunks of documents of this document_type")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", callback=_metadata,
              help="only chunks whose metadata KEY equals VALUE (a JSON number, boolean or quoted string, else "
              "text; a dotted KEY names a nested field); repeatable, all must match")
@json_option
@settings_options(qdrant=True)
def command(settings, query: str, limit: int, candidates: int, keywords: str, fusion: str | None, vector_weight: float,
            source: UUID | None, document: UUID | None, document_type: str | None, metadata: dict,
            as_json: bool) -> int:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    import asyncio

    from daemon.commands.common import print_json
    from daemon.hybrid_search import SearchFilters

    if not query.strip():
        raise click.UsageError("the query is empty")
    try:
        filters = SearchFilters(source_id=source, document_id=document, document_type=document_type,
                                metadata=metadata)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    options = {"limit": limit, "candidates": candidates, "keywords": keywords, "fusion": fusion,
               "vector_weight": vector_weight}
    try:
        hits = asyncio.run(_search(settings, query, filters, options))
    except ValueError as exc:  # a fusion that does not go with the keywords' source
        raise click.UsageError(str(exc)) from None
    fusion = hits.fusion
    if as_json:
        print_json(
            {
                "query": query,
                "keywords": hits.keywords,
                "fusion": fusion,
                "vector_weight": vector_weight if fusion == "weighted" else None,
                "filters": {
                    "source_id": source,
                    "document_id": document,
                    "document_type": document_type,
                    "metadata": filters.metadata,
                },
                "hits": [h.as_dict() for h in hits],
            }
        )
    else:
        _print(query, hits.keywords, fusion, vector_weight, hits)
    return 0


def query_settings(settings):
    """The settings a search loads its model with: torch on the CPU unless
    OUTBOXD_EMBEDDING__DEVICE names a device, and in fp32. One query takes milliseconds
    there, where starting CUDA takes seconds, and a lower precision is checked
    against fp32 on a sample of texts at every load; the vectors agree either way
    (the same fingerprint)."""
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.embedding.settings import SentenceTransformersSettings

    update: dict = {}
    if settings.embedding.device is None:
        update["device"] = "cpu"
    if isinstance(settings.embedding, SentenceTransformersSettings) and settings.embedding.precision != "fp32":
        update["precision"] = "fp32"
    if not update:
        return settings
    return settings.model_copy(update={"embedding": settings.embedding.model_copy(update=update)})


async def _search(settings, query: str, filters, options: dict) -> list:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.commands.common import open_services
    from daemon.core.collection_shape import CollectionShape
    from daemon.embedding.embedder import Embedder
    from daemon.hybrid_search import hybrid_search

    embedder = Embedder(query_settings(settings))
    try:
        async with open_services(settings) as (pool, client):
            await embedder.load()
            return await hybrid_search(pool, client, settings.collection, embedder, query, filters=filters,
                                       search_params=CollectionShape.of(settings).search_params(),
                                       sparse_options=settings.qdrant.bm25_options(), **options)
    finally:
        await embedder.close()


def excerpt(text: str, chars: int = EXCERPT_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[: chars - 1].rstrip() + "…"


def _print(query: str, keywords: str, fusion: str, vector_weight: float, hits: list) -> None:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.commands.common import print_table

    fused = {"rrf": "reciprocal rank fusion", "dbsf": "distribution-based score fusion"}.get(
        fusion, f"weighted, vector {vector_weight:g}")
    how = {"qdrant": f"Qdrant's BM25, {fused} in Qdrant", "postgres": f"PostgreSQL's full text, {fused}",
           "none": "meaning alone"}[keywords]
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
    title = f"{len(hits)} result{'s' if len(hits) != 1 else ''} for {query!r} ({how})"
    # fused in the server, a hit's rank in each prefetch is not returned: no columns for them
    ranks = ["vector rank", "keyword rank"] if keywords != "qdrant" else []
    print_table(rows, ["rank", "score", *ranks, "title", "excerpt"], title=title)
