"""The apply core: make Qdrant hold exactly what PostgreSQL says, for a set of chunks.

A transport hands it one Target per chunk, already coalesced (the latest state
winning, so duplicated and reordered events are harmless). For each chunk it
does the least work that converges:

- chunk gone, or text empty/whitespace  -> delete the point
- point missing, text changed, or the point was made by another model
                                        -> embed and upsert
- only payload fields differ            -> set the changed sections, no embedding
- nothing differs                       -> nothing

and sends all of it to Qdrant as one confirmed batch. It knows nothing about
transports: where targets carry versions (Kafka), a point that already reflects
a newer version is left alone and written points record theirs.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from daemon.core.batch import Outcome, Target
from daemon.core.chunk_state import METADATA_HASH, ChunkState
from daemon.core.qdrant_store import QdrantStore, Upserts
from daemon.embedding.embedder import Embedder
from daemon.errors import InvalidChunkError
from daemon.telemetry import span

log = logging.getLogger(__name__)

# payload key: the event version a point reflects, where the targets carry versions (Kafka)
VERSION_KEY = "version"
# what is read of a point before writing it: enough to tell what changed, never the payload's
# bulk (text and metadata: equal content_hash, equal text; equal metadata_hash, equal metadata)
BULK_KEYS = {"text": "content_hash", "metadata": METADATA_HASH}  # bulky key -> the key that stands for it
COMPARED_KEYS = ["document_id", "source_id", "chunk_index", "token_count", "content_hash", "title", "url",
                 "document_type", "embedding_model", METADATA_HASH, VERSION_KEY]


@dataclass
class ApplyResult(Outcome):
    upserted: int = 0
    payload_only: int = 0
    deleted: int = 0
    unchanged: int = 0
    embedded: int = 0
    reused: int = 0  # vectors of identical text found in Qdrant instead of encoded
    older: int = 0  # targets older than the version their point already reflects (Kafka)

    def ops(self) -> dict[str, int]:
        return {"upsert": self.upserted, "payload": self.payload_only, "delete": self.deleted,
                "unchanged": self.unchanged, "older": self.older}

    def embedding_kinds(self) -> dict[str, int]:
        """How each written chunk's vector was obtained (the embeddings metric)."""
        return {
            "computed": self.embedded,
            "reused": self.reused,
            "cache_hit": max(0, self.upserted - self.embedded - self.reused),  # cache, or the same text in the batch
            "payload_only": self.payload_only,
            "unchanged": self.unchanged,
        }


class Applier:
    def __init__(self, embedder: Embedder, store: QdrantStore, *, reuse_vectors: bool = False) -> None:
        self.embedder = embedder
        self.store = store
        self.reuse_vectors = reuse_vectors

    @property
    def model_id(self) -> str:
        assert self.embedder.fingerprint is not None, "load the model before applying"
        return self.embedder.fingerprint.id

    async def apply(self, targets: Mapping[UUID, Target | ChunkState | None]) -> ApplyResult:
        """Converge these chunks' points. A bare state (or None: gone) is a
        target without a version, as reindex and embedding applications pass them."""
        targets = {cid: t if isinstance(t, Target) else Target(t) for cid, t in targets.items()}
        result = ApplyResult()
        versioned = any(t.version is not None for t in targets.values())
        point_ids = {chunk_id: str(chunk_id) for chunk_id in targets}  # each id made a string once
        existing = await self.store.payloads(list(point_ids.values()), keys=COMPARED_KEYS)
        deletes: list[str] = []
        to_embed: dict[str, tuple[str, dict[str, Any]]] = {}  # point id -> (text, payload)
        payload_updates: list[tuple[str, dict[str, Any]]] = []
        for chunk_id, target in targets.items():
            point_id = point_ids[chunk_id]
            current = existing.get(point_id)
            applied = current.get(VERSION_KEY) if current else None
            if target.version is not None and isinstance(applied, int) and applied > target.version:
                result.older += 1  # replayed after a newer event (a relay that lost its lease, a rewound group)
                continue
            if target.removes_point:
                deletes.append(point_id)
                result.written[chunk_id] = target.state_hash
                continue
            state = target.state
            try:
                payload = state.payload(self.model_id)
            except InvalidChunkError as exc:
                result.failed[chunk_id] = str(exc)
                continue
            if versioned:
                payload[VERSION_KEY] = target.version
            result.written[chunk_id] = state.state_hash
            if (
                current is None
                or current.get("content_hash") != state.content_hash
                or current.get("embedding_model") != self.model_id
            ):
                to_embed[point_id] = (state.text, payload)
            elif changed := self._changed(current, payload):
                # set only what changed, not overwrite: "truncated" belongs to the vector and
                # stays, and one title or metadata change is then the same update for every chunk
                payload_updates.append((point_id, changed))
                result.payload_only += 1
            else:
                result.unchanged += 1

        upserts = await self._embed(to_embed, result) if to_embed else None
        await self.store.write(upserts, payload_updates, deletes)
        result.deleted = len(deletes)
        return result

    @staticmethod
    def _changed(current: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        """The payload keys to set: those that differ, a bulky one judged by the key
        that stands for it. A point without metadata_hash (written before it
        existed, or marked by a reconcile repair) gets its whole payload."""
        if METADATA_HASH not in current:
            return dict(payload)
        return {
            k: v for k, v in payload.items()
            if current.get(BULK_KEYS.get(k, k)) != payload[BULK_KEYS.get(k, k)] and k != "text"
        }

    async def _embed(self, to_embed: dict[str, tuple[str, dict[str, Any]]], result: ApplyResult) -> Upserts:
        texts = {payload["content_hash"]: text for text, payload in to_embed.values()}
        reused = {}
        if self.reuse_vectors:
            unknown = [h for h in texts if not self.embedder.cached(h)]
            reused = await self.store.vectors_by_hash(unknown, self.model_id)
        wanted = {h: t for h, t in texts.items() if h not in reused}
        with span("embed", texts=len(wanted)):
            vectors, result.embedded = await self.embedder.embed(wanted)
        vectors.update(reused)
        result.reused = len(reused)
        upserts = Upserts()
        for point_id, (_text, payload) in to_embed.items():
            emb = vectors[payload["content_hash"]]
            payload["truncated"] = emb.truncated
            upserts.add(point_id, emb.vector, payload)
        result.upserted = len(upserts)
        return upserts
