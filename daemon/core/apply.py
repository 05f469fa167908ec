"""The apply core: make Qdrant hold exactly what PostgreSQL says, for a set of chunks.

Transports (the notify daemon now, Kafka consumers later) hand it the current
state of each chunk they have events for, already coalesced: one target per
chunk, the latest state winning, so duplicated and reordered events are
harmless. For each chunk it then does the least work that converges:

- chunk gone, or text empty/whitespace  -> delete the point
- point missing, text changed, or the point was made by another model
                                        -> embed and upsert
- only payload fields differ            -> set the payload, no embedding
- nothing differs                       -> nothing

and sends all of it to Qdrant as one confirmed batch.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from qdrant_client import models

from daemon.core.chunk_state import ChunkState
from daemon.embedding.embedder import Embedder
from daemon.errors import InvalidChunkError, describe, is_transient
from daemon.core.qdrant_store import QdrantSink
from daemon.telemetry import span

log = logging.getLogger(__name__)

# payload key: the event version a point reflects, where a Kafka consumer wrote it
VERSION_KEY = "version"


@dataclass
class ApplyResult:
    # chunk id -> the state hash Qdrant now reflects (None: the chunk does not exist)
    written: dict[UUID, str | None] = field(default_factory=dict)
    # chunk id -> why this chunk cannot be applied (the chunk's fault, not the infrastructure's)
    failed: dict[UUID, str] = field(default_factory=dict)
    upserted: int = 0
    payload_only: int = 0
    deleted: int = 0
    unchanged: int = 0
    embedded: int = 0
    reused: int = 0  # vectors of identical text found in Qdrant instead of encoded
    older: int = 0  # events older than the version their point already reflects (Kafka)

    def embedding_kinds(self) -> dict[str, int]:
        """How each written chunk's vector was obtained (the embeddings metric)."""
        return {
            "computed": self.embedded,
            "reused": self.reused,
            "cache_hit": max(0, self.upserted - self.embedded - self.reused),  # cache, or the same text in the batch
            "payload_only": self.payload_only,
            "unchanged": self.unchanged,
        }

    def merge(self, other: "ApplyResult") -> None:
        self.written.update(other.written)
        self.failed.update(other.failed)
        for name in ("upserted", "payload_only", "deleted", "unchanged", "embedded", "reused", "older"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


async def isolate(
    apply_one: Callable[[UUID], Awaitable[ApplyResult]], chunk_ids: list[UUID], exc: Exception
) -> ApplyResult:
    """A batch failed for a reason that is not an outage: apply chunk by chunk so
    that only the chunk at fault is held back (invariant 6). An outage on the
    way is raised, to retry the whole batch."""
    if len(chunk_ids) == 1:
        return ApplyResult(failed={chunk_ids[0]: describe(exc)})
    log.warning("batch failed; applying its chunks one by one", extra={"error": describe(exc)})
    combined = ApplyResult()
    for chunk_id in chunk_ids:
        try:
            combined.merge(await apply_one(chunk_id))
        except Exception as one:
            if is_transient(one):
                raise
            combined.failed[chunk_id] = describe(one)
    return combined


class Applier:
    def __init__(self, embedder: Embedder, sink: QdrantSink, *, reuse_vectors: bool = False) -> None:
        self.embedder = embedder
        self.sink = sink
        self.reuse_vectors = reuse_vectors

    @property
    def model_id(self) -> str:
        assert self.embedder.fingerprint is not None, "load the model before applying"
        return self.embedder.fingerprint.id

    async def apply(
        self,
        targets: dict[UUID, ChunkState | None],
        events: object = None,
        *,
        versions: dict[UUID, int] | None = None,
    ) -> ApplyResult:
        """events (the outbox events behind the targets) is the BatchSink signature;
        not needed here. versions (Kafka consumers): the event version of each
        target; a point that already reflects a higher version is left alone, and
        written points record theirs in the payload."""
        result = ApplyResult()
        # not the text: equal content hashes mean equal text, and it is the payload's bulk
        existing = await self.sink.payloads(list(targets), without=["text"])
        if versions is not None:
            targets = self._drop_older(targets, versions, existing, result)
        deletes: list[str] = []
        live: dict[UUID, tuple[ChunkState, dict[str, Any]]] = {}
        for chunk_id, state in targets.items():
            if state is None or not state.has_text:
                deletes.append(str(chunk_id))
                result.written[chunk_id] = state.state_hash if state else None
                continue
            try:
                payload = state.payload(self.model_id)
            except InvalidChunkError as exc:
                result.failed[chunk_id] = str(exc)
                continue
            if versions is not None:
                payload[VERSION_KEY] = versions[chunk_id]
            live[chunk_id] = (state, payload)

        to_embed: dict[UUID, tuple[ChunkState, dict[str, Any]]] = {}
        payload_updates: list[tuple[str, dict[str, Any]]] = []
        for chunk_id, (state, payload) in live.items():
            current = existing.get(str(chunk_id))
            if (
                current is None
                or current.get("content_hash") != state.content_hash
                or current.get("embedding_model") != self.model_id
            ):
                to_embed[chunk_id] = (state, payload)
            elif changed := {k: v for k, v in payload.items() if k != "text" and current.get(k) != v}:
                # set only what changed, not overwrite: "truncated" belongs to the vector and
                # stays, and one title or metadata change is then the same update for every chunk
                payload_updates.append((str(chunk_id), changed))
                result.payload_only += 1
            else:
                result.unchanged += 1
            result.written[chunk_id] = state.state_hash

        upserts: list[models.PointStruct] = []
        if to_embed:
            texts = {state.content_hash: state.text for state, _ in to_embed.values()}
            reused = {}
            if self.reuse_vectors:
                unknown = [h for h in texts if not self.embedder.cached(h)]
                reused = await self.sink.vectors_by_hash(unknown, self.model_id)
            with span("embed", texts=len(texts) - len(reused)):
                vectors, result.embedded = await self.embedder.embed({h: t for h, t in texts.items() if h not in reused})
            vectors.update(reused)
            result.reused = len(reused)
            for chunk_id, (state, payload) in to_embed.items():
                emb = vectors[state.content_hash]
                upserts.append(
                    models.PointStruct(id=str(chunk_id), vector=emb.vector, payload={**payload, "truncated": emb.truncated})
                )
            result.upserted = len(upserts)

        await self.sink.write(upserts, payload_updates, deletes)
        result.deleted = len(deletes)
        return result

    @staticmethod
    def _drop_older(
        targets: dict[UUID, ChunkState | None],
        versions: dict[UUID, int],
        existing: dict[str, dict[str, Any]],
        result: ApplyResult,
    ) -> dict[UUID, ChunkState | None]:
        """Leave out targets older than what their point already reflects: events
        replayed after a newer one (a relay that lost its lease, a rewound group)."""
        kept = {}
        for chunk_id, state in targets.items():
            applied = existing.get(str(chunk_id), {}).get(VERSION_KEY)
            if isinstance(applied, int) and applied > versions[chunk_id]:
                result.older += 1
            else:
                kept[chunk_id] = state
        return kept
