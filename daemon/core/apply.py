"""The apply core: make Qdrant hold exactly what PostgreSQL says, for a set of chunks.

A transport hands it one Target per chunk, already coalesced (the latest state
winning, so duplicated and reordered events are harmless). It reads the small
keys of their points, asks daemon.core.plan what each chunk needs (delete,
embed and upsert, set some payload keys, write a point again with the vector
it holds, or nothing), embeds only the texts that changed, and sends all of it
to Qdrant as one confirmed batch. It knows
nothing about transports: where targets carry versions (the chunk's version,
read with its state), a point that already reflects a newer version is left
alone, written points record theirs, and Qdrant makes each write only over an
older version (QdrantStore.write), so a write that was planned before a pause
cannot land over a newer one.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from daemon.core.batch import Outcome, Target
from daemon.core.chunk_state import BOOKKEEPING, ChunkState
from daemon.core.plan import POINT_KEYS, Action, plan
from daemon.core.qdrant_store import QdrantStore, Upserts
from daemon.embedding.embedder import Embedder
from daemon.telemetry import span

log = logging.getLogger(__name__)


@dataclass
class ApplyResult(Outcome):
    upserted: int = 0
    payload_only: int = 0
    deleted: int = 0
    unchanged: int = 0
    embedded: int = 0
    reused: int = 0  # vectors of identical text found in Qdrant instead of encoded
    older: int = 0  # targets older than the version their point already reflects (left as it was)
    rewritten: int = 0  # points written again with the dense vector they hold (sparse vector, layout)

    def ops(self) -> dict[str, int]:
        return {"upsert": self.upserted, "payload": self.payload_only, "delete": self.deleted,
                "unchanged": self.unchanged, "older": self.older, "rewrite": self.rewritten}

    def embedding_kinds(self) -> dict[str, int]:
        """How each written chunk's vector was obtained (the embeddings metric)."""
        return {
            "computed": self.embedded,
            "reused": self.reused,
            "cache_hit": max(0, self.upserted - self.embedded - self.reused),  # cache, or the same text in the batch
            "payload_only": self.payload_only + self.rewritten,
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
        projection = await self.store.projection(self.model_id)
        point_ids = {chunk_id: str(chunk_id) for chunk_id in targets}  # each id made a string once
        existing = await self.store.payloads(list(point_ids.values()), keys=POINT_KEYS)
        deletes: list[str] = []
        to_embed: dict[str, tuple[str, dict[str, Any]]] = {}  # point id -> (text, payload)
        payload_updates: list[tuple[str, dict[str, Any]]] = []
        versions: dict[str, int] = {}  # point id -> the version its write carries
        holds: dict[str, str] = {}  # point id -> the text (content hash) a versioned payload update assumes
        rewrites: dict[str, tuple[UUID, Target]] = {}  # point id -> its chunk; written again with its vector

        def set_keys(point_id: str, target: Target, keys: dict[str, Any]) -> None:
            payload_updates.append((point_id, keys))
            if target.version is not None:
                holds[point_id] = target.state.content_hash
            result.payload_only += 1

        for chunk_id, target in targets.items():
            point_id = point_ids[chunk_id]
            todo = plan(target.state, existing.get(point_id), projection, target.version, target.deleted)
            if todo.action is Action.REJECT:
                result.failed[chunk_id] = todo.error
                continue
            if todo.action is Action.OLDER:
                result.older += 1  # replayed after a newer event (a relay that lost its lease, a rewound group)
                continue
            result.written[chunk_id] = target.state_hash
            if target.version is not None and todo.action is not Action.NOTHING:
                versions[point_id] = target.version
            if todo.action is Action.DELETE:
                deletes.append(point_id)
            elif todo.action is Action.UPSERT:
                to_embed[point_id] = (target.state.text, todo.payload)
            elif todo.action is Action.REWRITE:
                rewrites[point_id] = (chunk_id, target)
            elif todo.action is Action.SET:
                set_keys(point_id, target, todo.payload)
            elif target.state is not None and target.state.has_text:
                result.unchanged += 1

        upserts = Upserts()
        if rewrites:
            held = await self.store.vectors(list(rewrites), keys=POINT_KEYS)
            for point_id, (chunk_id, target) in rewrites.items():
                vector, point = held.get(point_id, (None, None))
                # planned again on the point as read with its vector: a vector is only kept with the text it embeds
                todo = plan(target.state, point, projection, target.version, target.deleted)
                if todo.action is Action.REWRITE:
                    todo.payload[BOOKKEEPING]["truncated"] = vector.truncated
                    upserts.add(point_id, vector.vector, todo.payload, target.state.text)
                    result.rewritten += 1
                elif todo.action is Action.UPSERT:
                    to_embed[point_id] = (target.state.text, todo.payload)
                elif todo.action is Action.OLDER:
                    del result.written[chunk_id]
                    versions.pop(point_id, None)
                    result.older += 1
                elif todo.action is Action.SET:  # the point moved on meanwhile, to a layout a set serves
                    set_keys(point_id, target, todo.payload)
                else:
                    versions.pop(point_id, None)
                    result.unchanged += 1
        if to_embed:
            await self._embed(to_embed, result, upserts)
        result.older += await self.store.write(upserts, payload_updates, deletes, versions,
                                               seen=[p for p in versions if p in existing], holds=holds)
        result.deleted = len(deletes)
        return result

    async def _embed(self, to_embed: dict[str, tuple[str, dict[str, Any]]], result: ApplyResult, upserts: Upserts) -> None:
        texts = {payload[BOOKKEEPING]["content_hash"]: text for text, payload in to_embed.values()}
        reused = {}
        if self.reuse_vectors:
            unknown = [h for h in texts if not self.embedder.cached(h)]
            reused = await self.store.vectors_by_hash(unknown, self.model_id)
        wanted = {h: t for h, t in texts.items() if h not in reused}
        with span("embed", texts=len(wanted)):
            vectors, result.embedded = await self.embedder.embed(wanted)
        vectors.update(reused)
        result.reused = len(reused)
        for point_id, (text, payload) in to_embed.items():
            emb = vectors[payload[BOOKKEEPING]["content_hash"]]
            payload[BOOKKEEPING]["truncated"] = emb.truncated
            upserts.add(point_id, emb.vector, payload, text)
        result.upserted += len(to_embed)
