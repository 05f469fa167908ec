"""`outboxd consume`: the consumer group that converges Qdrant from the topic.

Each batch (one partition's records) is coalesced per chunk, newest version
winning, and handed to the same apply core as the notify daemon
(daemon.core.apply.Applier): embed only changed text, set_payload for payload-only
changes, delete on delete or tombstone, one confirmed Qdrant request, and
leave alone a point that already reflects a newer version. The base commits
the offsets only after that returned.
"""
from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from typing import Any
from uuid import UUID

from consumers import contract
from consumers.settings import StreamSettings
from consumers.stream_consumer import StreamConsumer
from daemon.core.apply import ApplyResult
from daemon.core.batch import Target
from daemon.core.chunk_state import ChunkState
from daemon.core.writer import QdrantWriter
from daemon.embedding.embedder import Embedder

log = logging.getLogger(__name__)

# a tombstone from a producer that sets no version header deletes unconditionally
UNVERSIONED = sys.maxsize
DELETED_VERSIONS_KEPT = 100_000  # about 10 MB


class QdrantConsumer(StreamConsumer):
    role = "outboxd consume"

    def __init__(self, settings: StreamSettings, *, embedder: Embedder | None = None, qdrant=None) -> None:
        super().__init__(settings, group=settings.kafka.group, from_beginning=True)
        self.writer = QdrantWriter(settings, embedder=embedder, qdrant=qdrant)
        # A deleted point keeps no payload, so no version: the versions of recent
        # deletes are kept here, so a stale upsert published late by another relay
        # does not bring the point back (after a restart, the relay's verified ack
        # still corrects one that does).
        self.deleted = RecentVersions(DELETED_VERSIONS_KEPT)

    async def open(self) -> None:
        # No outbox database to share a budget through: an http endpoint's budget is this process's own.
        budget = self.writer.embedder.backend.budget
        if budget is not None:
            budget.progress = self.heartbeat.progress  # a request waiting its turn is pace, not a hang
        await self.writer.ensure_collection(self.until_reachable)

    def readiness_checks(self) -> dict:
        return super().readiness_checks() | self.writer.readiness_checks()

    async def shutdown(self) -> None:
        await self.writer.close()

    def stats_extra(self) -> dict[str, Any]:
        return self.writer.stats()

    async def handle(self, records: list[Any]) -> list[tuple[Any, str]]:
        rejected: list[tuple[Any, str]] = []
        targets: dict[UUID, Target] = {}
        records_of: dict[UUID, list[Any]] = {}
        for record in records:
            try:
                chunk_id, version, state = parse(record)
            except contract.BadMessage as exc:
                rejected.append((record, str(exc)))
                continue
            records_of.setdefault(chunk_id, []).append(record)
            if chunk_id not in targets or version >= targets[chunk_id].version:
                # a delete this process applied is a plan input: an upsert older than it leaves the point gone
                targets[chunk_id] = Target(state, version, self.deleted.get(chunk_id))
        result = ApplyResult()
        if targets:
            result.merge(await self.policy.deliver(self.writer.applier.apply, targets, ApplyResult))
        for chunk_id, reason in result.failed.items():
            rejected.extend((r, reason) for r in records_of[chunk_id])
        for chunk_id, target in targets.items():
            if target.state is None and chunk_id in result.written and target.version != UNVERSIONED:
                self.deleted.remember(chunk_id, target.version)
        # written, or left alone as older than the point or a delete: acknowledged; failed: parked above
        applied = sum(len(records_of[cid]) for cid in targets if cid not in result.failed)
        self.policy.record(result, acked=applied)
        return rejected


class RecentVersions(OrderedDict):
    """chunk id -> version, the most recent `size` kept."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def remember(self, chunk_id: UUID, version: int) -> None:
        self[chunk_id] = max(version, self.get(chunk_id, version))
        self.move_to_end(chunk_id)
        while len(self) > self.size:
            self.popitem(last=False)


def parse(record: Any) -> tuple[UUID, int, ChunkState | None]:
    """(chunk id, version, state or None for a delete) of one record; BadMessage
    says what is wrong with it."""
    if record.value is None:
        chunk_id, version = contract.tombstone_version(record.key, record.headers)
        return chunk_id, UNVERSIONED if version is None else version, None
    event = contract.decode(record.value)
    if record.key is not None and record.key != str(event.chunk_id).encode():
        raise contract.BadMessage(
            f"message key {record.key!r} is not the event's chunk id {event.chunk_id}: the producer must key "
            "every event by its chunk id so one chunk's changes stay in order"
        )
    if isinstance(event, contract.ChunkUpserted):
        return event.chunk_id, event.version, contract.state_from_event(event)
    return event.chunk_id, event.version, None
