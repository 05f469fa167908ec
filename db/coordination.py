"""What the daemons of one database coordinate through it: the continuous
verifier's lease of a collection (outboxd.verifier) and an embedding
endpoint's shared budget (outboxd.embedding_budget).

Each method runs one named query of sql/queries.sql, one short statement whose
row lock ends with it: never held across a Qdrant call or an embedding request.
Rows come back as dicts; daemon.outbox.verifier and daemon.outbox.shared_budget say
what they mean.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from uuid import UUID

import orjson
from psycopg_pool import AsyncConnectionPool

from db.gateway import fetch


@dataclass(frozen=True, slots=True)
class SharedBucket:
    """An endpoint's row of the shared budget: its key and the bucket's shape
    (None: that count is not limited), and how far ahead a turn may be reserved."""

    endpoint: str
    request_rate: float | None
    request_capacity: float | None
    token_rate: float | None
    token_capacity: float | None
    horizon: float


def _json(counts: Mapping[str, int]) -> str:
    return orjson.dumps(dict(counts)).decode()


class CoordinationRepository:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    # --- the verifier's lease of a collection ------------------------------------------
    async def take_verifier_lease(self, collection: str, worker: str, lease_seconds: float) -> dict:
        """Take or renew the lease; the verifier's row either way (held: whether this
        worker holds it now)."""
        (row,) = await fetch(self.pool, "verify_lease", collection=collection, worker=worker,
                             lease_seconds=lease_seconds)
        return row

    async def save_verifier_checkpoint(self, collection: str, worker: str, lease_seconds: float, *,
                                       after: UUID, checked: int, drift: Mapping[str, int]) -> dict | None:
        """Record a checked range and renew the lease; None: another worker holds it now."""
        rows = await fetch(self.pool, "verify_checkpoint", collection=collection, worker=worker,
                           lease_seconds=lease_seconds, after=after, checked=checked, drift=_json(drift))
        return rows[0] if rows else None

    async def complete_verifier_pass(self, collection: str, worker: str, lease_seconds: float, *,
                                     checked: int, drift: Mapping[str, int]) -> dict | None:
        """Record a full pass, the next to start at the lowest id; None: another worker holds the lease."""
        rows = await fetch(self.pool, "verify_pass_complete", collection=collection, worker=worker,
                           lease_seconds=lease_seconds, checked=checked, drift=_json(drift))
        return rows[0] if rows else None

    async def release_verifier_lease(self, collection: str, worker: str) -> None:
        """Hand the lease on now, where this worker holds it."""
        await fetch(self.pool, "verify_release", collection=collection, worker=worker)

    # --- an embedding endpoint's shared budget -----------------------------------------
    async def open_budget(self, bucket: SharedBucket) -> None:
        """The endpoint's row, made full where no daemon made it yet."""
        await fetch(self.pool, "embedding_budget_open", **asdict(bucket))

    async def take_budget(self, bucket: SharedBucket, tokens: int) -> dict | None:
        """One request's turn (taken, wait_seconds, paused, now, turn); None: the
        endpoint has no row (open_budget makes it)."""
        rows = await fetch(self.pool, "embedding_budget_take", **asdict(bucket), tokens=tokens)
        return rows[0] if rows else None

    async def pause_budget(self, bucket: SharedBucket, seconds: float) -> datetime | None:
        """Hold every daemon's turns back for `seconds` (a 429's Retry-After); the
        server's clock it paused at (None: the endpoint has no row)."""
        rows = await fetch(self.pool, "embedding_budget_pause", **asdict(bucket), seconds=seconds)
        return rows[0]["now"] if rows else None

    async def release_budget_turn(self, bucket: SharedBucket, tokens: int, turn: datetime) -> bool:
        """Give a reserved turn back where a pause covers it; whether it was."""
        return bool(await fetch(self.pool, "embedding_budget_release", **asdict(bucket), tokens=tokens, turn=turn))

    async def settle_budget(self, bucket: SharedBucket, tokens: int) -> None:
        """The endpoint counted `tokens` more than were taken (fewer, when negative)."""
        await fetch(self.pool, "embedding_budget_settle", **asdict(bucket), tokens=tokens)
