"""Hybrid retrieval over the converged collection: semantic and keyword
candidates fused into one ranking, answered with PostgreSQL's current text.
The keywords come from Qdrant's own BM25 vector (native hybrid: both searches
and their fusion run in the server, in one request) or from PostgreSQL's full
text (fused here).

    from daemon.hybrid_search import SearchFilters, hybrid_search

    hits = await hybrid_search(pool, qdrant, "chunks", embedder, "how do I retry a deadlock",
                               limit=5, filters=SearchFilters(document_type="guide"))
    for hit in hits:
        print(f"{hit.score:.3f} {hit.title}: {hit.text[:80]}")

`pool` is a psycopg_pool.AsyncConnectionPool on the content database,
`qdrant` an AsyncQdrantClient, "chunks" the collection alias
(OUTBOXD_COLLECTION) and `embedder` a loaded daemon.embedding.embedder.Embedder
configured like the daemon that writes the collection.

1. The query is embedded with the collection's own model: the embedder's
   fingerprint must equal the one the collection records (ModelMismatchError,
   a ConfigError, otherwise; vectors of two models are not comparable).
2. keywords="qdrant" (what "auto" means where the collection has the bm25
   sparse vector): one Query API request to the collection the alias points
   at (resolved per call, so a reindex switch is followed) prefetches the
   `candidates` nearest points by the dense vector and the `candidates` best
   by BM25 (the server makes the query's sparse vector from its text), both
   under the filters, and fuses them server-side: "rrf" (reciprocal rank
   fusion) or "dbsf" (distribution-based score fusion). Readers of the
   collection get the same search with qdrant-client alone (docs/search.md).
   keywords="postgres" (what "auto" means in local mode, or on a collection
   without the sparse vector; said once per process): Qdrant returns the
   `candidates` nearest points, PostgreSQL the `candidates` best full-text
   matches (websearch_to_tsquery over chunks.search_vector, ranked with
   ts_rank), both under the filters, and the two lists are fused here:
   "weighted" min-max normalises each list's scores to [0, 1] and adds them
   with weights vector_weight and 1 - vector_weight (a chunk missing from a
   list scores 0 there); "rrf" adds 1 / (60 + rank) from each list.
   keywords="none": the dense search alone.
3. fusion=None takes rrf for Qdrant's keywords and weighted for PostgreSQL's.
4. The fused candidates are read from PostgreSQL as they are now: a chunk
   deleted or emptied since Qdrant indexed it, or no longer passing the
   filters, is dropped (the next candidate takes its place), and every hit
   carries the current text, title and url, never a stale copy.
"""
from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from uuid import UUID

from qdrant_client import models

from daemon.core.catalog import CollectionView, view
from daemon.core.collection_shape import SPARSE_VECTOR
from daemon.core.qdrant_store import BM25_MODEL
from daemon.embedding.fingerprint import check_fingerprint
from daemon.errors import ConfigError
from db.reads import SearchReads

log = logging.getLogger(__name__)

RRF_K = 60
FUSIONS = ("weighted", "rrf", "dbsf")
Fusion = Literal["weighted", "rrf", "dbsf"]
KEYWORDS = ("auto", "qdrant", "postgres", "none")
Keywords = Literal["auto", "qdrant", "postgres", "none"]
# the fusions each source of keywords takes: Qdrant's are the server's own
FUSIONS_OF = {"qdrant": ("rrf", "dbsf"), "postgres": ("weighted", "rrf"), "none": FUSIONS}
_said_fallback: set[str] = set()  # collections whose fallback to PostgreSQL's keywords was logged


@dataclass(frozen=True)
class SearchFilters:
    """Restrict both searches (and the final answer) to chunks of one source,
    one document, one document_type, and/or with chunk metadata key == value.
    A dotted metadata key ("a.b") names a nested object's field. Values are
    JSON scalars: strings, numbers (1 matches 1.0) and booleans."""

    source_id: UUID | None = None
    document_id: UUID | None = None
    document_type: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # chunk metadata key == value

    def __post_init__(self) -> None:
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not all(key.split(".")) or any(c in key for c in "[]"):
                raise ValueError(f"metadata filter key {key!r}: use a field name, or a dotted path like a.b")
            if not isinstance(value, (str, int, float, bool)) or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(
                    f"metadata filter {key}: {value!r} is not a string, number or boolean"
                )
        self._nested_metadata()  # refuses contradictory keys such as "a" and "a.b"

    def _nested_metadata(self) -> dict[str, Any]:
        nested: dict[str, Any] = {}
        for key, value in self.metadata.items():
            *parents, leaf = key.split(".")
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"metadata filter {key!r} contradicts a filter on {part!r}")
            if leaf in node:
                raise ValueError(f"metadata filter {key!r} contradicts another filter on the same field")
            node[leaf] = value
        return nested

    def restriction(self) -> dict[str, Any]:
        """The same restriction for PostgreSQL's side (db.reads.SearchReads): each filter or
        None, the metadata as the nested object the chunk's metadata must contain."""
        return {
            "source_id": self.source_id,
            "document_id": self.document_id,
            "document_type": self.document_type,
            "metadata": self._nested_metadata() if self.metadata else None,
        }

    def qdrant_filter(self) -> models.Filter | None:
        """The same restriction on the points' payload (see chunk_state.ChunkState.payload)."""
        must: list[models.FieldCondition] = []
        if self.source_id is not None:
            must.append(_match("source_id", str(self.source_id)))
        if self.document_id is not None:
            must.append(_match("document_id", str(self.document_id)))
        if self.document_type is not None:
            must.append(_match("document_type", self.document_type))
        for key, value in self.metadata.items():
            must.append(_match(f"metadata.{key}", value))
        return models.Filter(must=must) if must else None


def _match(key: str, value: Any) -> models.FieldCondition:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # A range, not a keyword match, so that 1 and 1.0 are equal, as in jsonb.
        return models.FieldCondition(key=key, range=models.Range(gte=value, lte=value))
    return models.FieldCondition(key=key, match=models.MatchValue(value=value))


@dataclass(frozen=True)
class Hit:
    chunk_id: UUID
    document_id: UUID
    source_id: UUID
    title: str
    url: str | None
    document_type: str | None
    chunk_index: int
    text: str  # current text from PostgreSQL
    score: float
    vector_rank: int | None  # 1-based rank in the semantic candidates, None if absent
    keyword_rank: int | None  # 1-based rank in the full-text candidates, None if absent

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("chunk_id", "document_id", "source_id"):
            d[key] = str(d[key])
        return d


class Hits(list):
    """The hits, best first, and how they were found: where the keywords came from
    ("qdrant", "postgres", "none") and the fusion that ranked them."""

    def __init__(self, hits: list[Hit], keywords: str, fusion: str) -> None:
        super().__init__(hits)
        self.keywords = keywords
        self.fusion = fusion


# --- fusion: pure functions over ranked lists ------------------------------------------------
@dataclass(frozen=True)
class Fused:
    id: Hashable
    score: float
    vector_rank: int | None
    keyword_rank: int | None


def normalise(scores: Sequence[float]) -> list[float]:
    """Min-max to [0, 1]: the best becomes 1.0 and the worst 0.0. A list whose
    scores are all equal (a single element, say) is all 1.0: each is the best."""
    if not scores:
        return []
    low, high = min(scores), max(scores)
    if high == low:
        return [1.0] * len(scores)
    return [(s - low) / (high - low) for s in scores]


def _ranks(ids: Sequence[Hashable]) -> dict[Hashable, int]:
    """1-based rank of each id, best first; a repeated id keeps its best rank."""
    ranks: dict[Hashable, int] = {}
    for rank, id_ in enumerate(ids, start=1):
        ranks.setdefault(id_, rank)
    return ranks


def _ordered(scores: dict[Hashable, float], vrank: dict, krank: dict) -> list[Fused]:
    def key(id_):
        ranks = [r for r in (vrank.get(id_), krank.get(id_)) if r is not None]
        return (-scores[id_], min(ranks), str(id_))

    return [Fused(i, scores[i], vrank.get(i), krank.get(i)) for i in sorted(scores, key=key)]


def weighted_fusion(
    vector: Sequence[tuple[Hashable, float]],
    keyword: Sequence[tuple[Hashable, float]],
    vector_weight: float = 0.7,
) -> list[Fused]:
    """Weighted score fusion of two ranked (id, score) lists, best first:
    w * normalised vector score + (1 - w) * normalised keyword score, a side
    where the id is absent counting 0. Ties go to the better rank."""
    _check_weight(vector_weight)
    vector, keyword = _dedupe(vector), _dedupe(keyword)
    vnorm = dict(zip((i for i, _ in vector), normalise([s for _, s in vector])))
    knorm = dict(zip((i for i, _ in keyword), normalise([s for _, s in keyword])))
    scores = {
        i: vector_weight * vnorm.get(i, 0.0) + (1.0 - vector_weight) * knorm.get(i, 0.0)
        for i in {**vnorm, **knorm}
    }
    return _ordered(scores, _ranks([i for i, _ in vector]), _ranks([i for i, _ in keyword]))


def rrf_fusion(vector: Sequence[Hashable], keyword: Sequence[Hashable], k: int = RRF_K) -> list[Fused]:
    """Reciprocal rank fusion of two ranked id lists, best first: the sum over
    the lists an id appears in of 1 / (k + rank). Scores are ignored."""
    vrank, krank = _ranks(vector), _ranks(keyword)
    scores = {i: sum(1.0 / (k + r[i]) for r in (vrank, krank) if i in r) for i in {**vrank, **krank}}
    return _ordered(scores, vrank, krank)


def fuse(
    vector: Sequence[tuple[Hashable, float]],
    keyword: Sequence[tuple[Hashable, float]],
    *,
    fusion: Fusion = "weighted",
    vector_weight: float = 0.7,
) -> list[Fused]:
    """Fuse two ranked (id, score) lists with the chosen method (client-side: weighted or rrf)."""
    if fusion == "weighted":
        return weighted_fusion(vector, keyword, vector_weight)
    if fusion == "rrf":
        return rrf_fusion([i for i, _ in vector], [i for i, _ in keyword])
    raise ValueError(f"fusion {fusion!r} is not one fused here: use one of {', '.join(FUSIONS_OF['postgres'])}")


def _dedupe(pairs: Sequence[tuple[Hashable, float]]) -> list[tuple[Hashable, float]]:
    seen: set = set()
    out = []
    for id_, score in pairs:
        if id_ not in seen:
            seen.add(id_)
            out.append((id_, float(score)))
    return out


def _check_weight(w: float) -> None:
    if not (0.0 <= w <= 1.0):
        raise ValueError(f"vector_weight must be between 0 and 1, not {w}")


# --- the search -----------------------------------------------------------------------------
async def check_model(qdrant, alias: str, embedder) -> CollectionView:
    """The physical collection behind `alias` (readers follow the alias), after
    checking that its vectors were made by the embedder's model; ModelMismatchError otherwise."""
    configured = embedder.fingerprint
    if configured is None:
        raise RuntimeError("the embedder is not loaded: await embedder.load() first")
    seen = await view(qdrant, alias, None)  # no catalog record: the collection readers see
    if not seen.exists:
        raise ConfigError(
            f"there is no Qdrant collection {alias!r} to search: start the daemon (`outboxd run`) once, "
            "or check OUTBOXD_COLLECTION and QDRANT_URL"
        )
    check_fingerprint(seen.fingerprint, configured, alias, seen.name)
    return seen


def keyword_source(keywords: Keywords, seen: CollectionView) -> str:
    """Where the keyword candidates come from: "qdrant", "postgres" or "none"."""
    if keywords not in KEYWORDS:
        raise ValueError(f"unknown keywords {keywords!r}: use one of {', '.join(KEYWORDS)}")
    if keywords == "qdrant" and not seen.sparse:
        raise ConfigError(
            f"the collection {seen.name!r} has no {SPARSE_VECTOR!r} sparse vector, so Qdrant cannot search its "
            "keywords: on a server, `outboxd collection --apply` adds it and `outboxd reconcile --repair` fills it "
            "(local mode has none); or take PostgreSQL's (keywords=\"postgres\")"
        )
    if keywords != "auto":
        return keywords
    if seen.sparse:
        return "qdrant"
    if seen.name not in _said_fallback:
        _said_fallback.add(seen.name)
        log.info("the collection has no BM25 vector (local mode, or not added yet): search takes its keywords from "
                 "PostgreSQL's full text", extra={"collection": seen.name})
    return "postgres"


async def hybrid_search(
    pool,
    qdrant,
    alias: str,
    embedder,
    query: str,
    *,
    limit: int = 10,
    candidates: int = 50,
    keywords: Keywords = "auto",
    fusion: Fusion | None = None,
    vector_weight: float = 0.7,
    filters: SearchFilters = SearchFilters(),
    search_params: models.SearchParams | None = None,
    sparse_options: dict[str, Any] | None = None,
) -> Hits:
    """The best `limit` chunks for `query`, fused from the `candidates` best
    of each search (see the module documentation). search_params: Qdrant's
    (CollectionShape.search_params: rescoring a quantized search);
    sparse_options: the BM25 options the collection's sparse vectors were made
    with (QdrantSettings.bm25_options), which the query's must match. Raises
    ModelMismatchError when the embedder's model is not the collection's,
    ConfigError when there is no collection (or keywords="qdrant" on one
    without the sparse vector), ValueError for an empty query or a bad argument."""
    if not query or not query.strip():
        raise ValueError("the search query is empty")
    if limit < 1 or candidates < 1:
        raise ValueError("limit and candidates must be at least 1")
    if fusion is not None and fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}: use one of {', '.join(FUSIONS)}")
    _check_weight(vector_weight)
    candidates = max(candidates, limit)

    seen = await check_model(qdrant, alias, embedder)
    source = keyword_source(keywords, seen)
    fusion = fusion or ("rrf" if source == "qdrant" else "weighted")
    if fusion not in FUSIONS_OF[source]:
        raise ValueError(f"fusion {fusion!r} does not go with {source}'s keywords: use one of "
                         f"{', '.join(FUSIONS_OF[source])}")
    reads = SearchReads(pool)
    if source == "qdrant":
        ranked = await _native_candidates(qdrant, seen.name, embedder, query, candidates, filters, search_params,
                                          fusion, sparse_options)
        fused = [Fused(i, score, None, None) for i, score in ranked]
    elif source == "postgres":
        vector, keyword = await asyncio.gather(
            _vector_candidates(qdrant, seen.name, embedder, query, candidates, filters, search_params),
            reads.keyword_candidates(query, limit=candidates, **filters.restriction()),
        )
        fused = fuse(vector, keyword, fusion=fusion, vector_weight=vector_weight)
    else:
        vector = await _vector_candidates(qdrant, seen.name, embedder, query, candidates, filters, search_params)
        fused = [Fused(i, score, rank, None) for rank, (i, score) in enumerate(vector, start=1)]
    current = await reads.current_chunks([f.id for f in fused], **filters.restriction())
    hits: list[Hit] = []
    for f in fused:
        row = current.get(f.id)
        if row is None:  # deleted, emptied or no longer matching since it was indexed
            continue
        hits.append(Hit(**row, score=f.score, vector_rank=f.vector_rank, keyword_rank=f.keyword_rank))
        if len(hits) == limit:
            break
    return Hits(hits, source, fusion)


async def _native_candidates(qdrant, collection, embedder, query, candidates, filters, search_params, fusion,
                             sparse_options) -> list[tuple[UUID, float]]:
    """Dense and BM25 prefetches under the same filter, fused by the server, in one request."""
    vector = await embedder.embed_query(query)
    where = filters.qdrant_filter()
    document = models.Document(text=query, model=BM25_MODEL, options=sparse_options or None)
    response = await qdrant.query_points(
        collection,
        prefetch=[
            models.Prefetch(query=vector, filter=where, params=search_params, limit=candidates),
            models.Prefetch(query=document, using=SPARSE_VECTOR, filter=where, limit=candidates),
        ],
        query=models.FusionQuery(fusion=models.Fusion.RRF if fusion == "rrf" else models.Fusion.DBSF),
        limit=candidates,
        with_payload=False,
        with_vectors=False,
    )
    return _chunk_ids(response.points)


async def _vector_candidates(qdrant, collection, embedder, query, candidates, filters,
                             search_params=None) -> list[tuple[UUID, float]]:
    vector = await embedder.embed_query(query)
    response = await qdrant.query_points(
        collection,
        query=vector,
        query_filter=filters.qdrant_filter(),
        search_params=search_params,
        limit=candidates,
        with_payload=False,
        with_vectors=False,
    )
    return _chunk_ids(response.points)


def _chunk_ids(points) -> list[tuple[UUID, float]]:
    out = []
    for point in points:
        try:
            out.append((UUID(str(point.id)), float(point.score)))
        except ValueError:  # not a chunk id: a point outboxd did not write
            continue
    return out

