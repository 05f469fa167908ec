"""The event contract of the `outboxd.chunks` topic, imported by the relay that
writes it and every consumer that reads it.

One message per changed chunk, keyed by chunk id (so all changes of one chunk
share a partition, in order). The value is JSON (orjson) of a ChunkUpserted or
a ChunkDeleted, told apart by "op". Events are self-contained: an upsert carries
the chunk's whole state at relay time, so consumers need no database access.
After a delete the relay also writes a tombstone (same key, null value) so a
compacted topic stays a replayable snapshot of every live chunk.

`schema` is the contract version: additive changes keep it, anything a
consumer could misread bumps it, and consumers reject versions they do not know.
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from daemon.core.chunk_state import ChunkState

SCHEMA_VERSION = 1
CONTENT_TYPE = b"application/json"
# headers every message carries, tombstones included (they have no value to read)
H_SCHEMA = "outboxd-schema"
H_VERSION = "outboxd-version"
H_EVENT_ID = "outboxd-event-id"


class Chunk(BaseModel):
    """A chunk's state as PostgreSQL had it when the relay read it: the fields the
    Qdrant payload is made of, plus the text to embed."""

    model_config = ConfigDict(frozen=True)

    document_id: UUID
    source_id: UUID
    chunk_index: int
    text: str
    token_count: int | None
    content_hash: str = Field(description="SHA-256 hex of the UTF-8 text: equal hashes, equal text")
    metadata: Any
    title: str
    url: str | None
    document_type: str | None
    state_hash: str = Field(description="hash of every field above: equal hashes, nothing changed")


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_: Literal[1] = Field(SCHEMA_VERSION, alias="schema")
    event_id: int = Field(description="the newest outbox event behind this message (unique per relay read)")
    version: int = Field(description="grows per chunk in the order states were read; newer wins")
    chunk_id: UUID
    changed_at: datetime = Field(description="commit-side time of the newest change behind this message")
    relayed_at: datetime


class ChunkUpserted(_Event):
    op: Literal["upsert"] = "upsert"
    chunk: Chunk


class ChunkDeleted(_Event):
    op: Literal["delete"] = "delete"


ChunkEvent = Annotated[ChunkUpserted | ChunkDeleted, Field(discriminator="op")]
_adapter: TypeAdapter[ChunkUpserted | ChunkDeleted] = TypeAdapter(ChunkEvent)


class BadMessage(ValueError):
    """A message that is not a chunk event this version understands."""


def encode(event: ChunkUpserted | ChunkDeleted) -> bytes:
    return orjson.dumps(event.model_dump(mode="json", by_alias=True))


def headers(event: ChunkUpserted | ChunkDeleted) -> list[tuple[str, bytes]]:
    return [
        ("content-type", CONTENT_TYPE),
        (H_SCHEMA, str(SCHEMA_VERSION).encode()),
        (H_VERSION, str(event.version).encode()),
        (H_EVENT_ID, str(event.event_id).encode()),
    ]


def decode(value: bytes) -> ChunkUpserted | ChunkDeleted:
    """Parse a message value; BadMessage says what was wrong."""
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"value is not JSON: {exc}") from None
    if isinstance(data, dict) and data.get("schema") not in (None, SCHEMA_VERSION):
        raise BadMessage(
            f"event schema {data.get('schema')!r} is not {SCHEMA_VERSION}, the one this outboxd understands; "
            "upgrade the consumer"
        )
    try:
        return _adapter.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors()[:5])
        raise BadMessage(f"not a chunk event: {problems}") from None


def header(headers: list[tuple[str, bytes]] | None, name: str) -> str | None:
    for key, value in headers or ():
        if key == name and value is not None:
            return value.decode("utf-8", "replace")
    return None


def tombstone_version(key: bytes | None, headers: list[tuple[str, bytes]] | None) -> tuple[UUID, int | None]:
    """The chunk id and version of a tombstone (null value); the version is None
    when a producer other than outboxd's relay wrote it without headers."""
    try:
        chunk_id = UUID(key.decode()) if key else None
    except (ValueError, UnicodeDecodeError):
        chunk_id = None
    if chunk_id is None:
        raise BadMessage(f"tombstone key {key!r} is not a chunk id")
    version = header(headers, H_VERSION)
    try:
        return chunk_id, int(version) if version is not None else None
    except ValueError:
        raise BadMessage(f"tombstone header {H_VERSION}={version!r} is not an integer") from None


def chunk_from_state(state: ChunkState) -> Chunk:
    return Chunk(**{name: getattr(state, name) for name in Chunk.model_fields})


def state_from_event(event: ChunkUpserted) -> ChunkState:
    """The ChunkState the apply core takes, from an event (no database read)."""
    return ChunkState(chunk_id=event.chunk_id, **event.chunk.model_dump())
