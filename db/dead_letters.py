"""Dead letters, for `outboxd dead-letters`: list them, send them back to
pending, or delete them. `selection` is the parameters of the named queries'
selection (ids, an error pattern, or all), as the command builds it."""
from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from db.gateway import fetch


class DeadLetters:
    """The outbox's dead letters, through a pool: each method is one short statement."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def listing(self, selection: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Every dead letter, or those the selection names."""
        rows = await fetch(self.pool, "dead_letters")
        if selection is None:
            return rows
        keep = set(await self.selected(selection))
        return [r for r in rows if r["id"] in keep]

    async def selected(self, selection: dict[str, Any]) -> list[int]:
        """The ids of the dead letters the selection names."""
        return [r["id"] for r in await fetch(self.pool, "select_dead_letters", **selection)]

    async def retry(self, selection: dict[str, Any]) -> list[int]:
        """Back to pending, attempts reset; the ids that went."""
        return [r["id"] for r in await fetch(self.pool, "retry_dead_letters", **selection)]

    async def purge(self, event_ids: list[int]) -> list[int]:
        """Delete exactly these dead letters; the ids that went."""
        if not event_ids:
            return []
        return [r["id"] for r in await fetch(self.pool, "purge_dead_letters", event_ids=event_ids)]
