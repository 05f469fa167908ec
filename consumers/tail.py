"""`outboxd tail`: print the live chunk change stream, for operators.

A second consumer on the same base, reading without a consumer group (every
partition, nothing committed, no effect on other readers). Filters by document
or source apply to deletes too once the chunk's upsert was seen in this run
(a delete event carries only the chunk id); use --from-beginning to see all.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO
from uuid import UUID

import orjson

from consumers import contract
from consumers.settings import StreamSettings
from consumers.stream_consumer import StreamConsumer
from daemon.commands.options import reader_gone


class TailConsumer(StreamConsumer):
    role = "outboxd tail"

    def __init__(
        self,
        settings: StreamSettings,
        *,
        from_beginning: bool = False,
        documents: set[UUID] | None = None,
        sources: set[UUID] | None = None,
        as_json: bool = False,
        limit: int | None = None,
        out: TextIO = sys.stdout,
    ) -> None:
        super().__init__(settings, group=None, from_beginning=from_beginning, dead_letters=False)
        self.documents = documents or set()
        self.sources = sources or set()
        self.as_json = as_json
        self.limit = limit
        self.out = out
        self.printed = 0
        self._owner: dict[UUID, tuple[UUID, UUID]] = {}  # chunk -> (document, source), for filtering deletes

    async def handle(self, records: list[Any]) -> list[tuple[Any, str]]:
        for record in records:
            line = self.render(record)
            if line is None:
                continue
            try:
                print(line, file=self.out, flush=True)
            except BrokenPipeError:
                # the reader went away (`outboxd tail | head`): stop the stream; the
                # process then ends quietly like every command (daemon.cli)
                if not reader_gone((self.out,)):
                    raise
                self.stop.set()
                break
            self.printed += 1
            if self.limit is not None and self.printed >= self.limit:
                self.stop.set()
                break
        return []  # an operator's view: a bad message is shown, never parked

    def matches(self, chunk_id: UUID) -> bool:
        if not (self.documents or self.sources):
            return True
        owner = self._owner.get(chunk_id)
        return owner is not None and (owner[0] in self.documents or owner[1] in self.sources)

    def render(self, record: Any) -> str | None:
        where = f"{record.partition}/{record.offset}"
        if record.value is None:
            try:
                chunk_id, version = contract.tombstone_version(record.key, record.headers)
            except contract.BadMessage as exc:
                return f"{where} BAD {exc}"
            if not self.matches(chunk_id):
                return None
            if self.as_json:
                return orjson.dumps({"op": "tombstone", "chunk_id": str(chunk_id), "version": version}).decode()
            return f"{where} tombstone chunk={chunk_id} v={version}"
        try:
            event = contract.decode(record.value)
        except contract.BadMessage as exc:
            return f"{where} BAD {exc}"
        if isinstance(event, contract.ChunkUpserted):
            self._owner[event.chunk_id] = (event.chunk.document_id, event.chunk.source_id)
        if not self.matches(event.chunk_id):
            return None
        if self.as_json:
            return contract.encode(event).decode()
        head = f"{where} {event.changed_at:%Y-%m-%dT%H:%M:%S}Z {event.op:<6} chunk={event.chunk_id} v={event.version}"
        if isinstance(event, contract.ChunkUpserted):
            c = event.chunk
            text = " ".join(c.text.split())
            text = text[:60] + "…" if len(text) > 60 else text
            return f"{head} doc={c.document_id} #{c.chunk_index} {c.title!r}: {text}"
        return head
