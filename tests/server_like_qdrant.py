"""A Qdrant client that answers the way a Qdrant server does where local mode
differs, for the paths no local-mode test reaches: several processes starting
against one server.

It wraps a real client (local mode) and, like the server:
- creating a collection that exists fails with HTTP 409 "already exists",
- creating an alias that exists fails with HTTP 409 (local mode silently moves it),
- `starters` callers that check "does it exist?" see the answer from before any
  of them created anything (a barrier holds each check until all have made it):
  the check-then-act race of N daemons started side by side, made certain.
"""
from __future__ import annotations

import asyncio

import httpx
from qdrant_client import models
from qdrant_client.http.exceptions import UnexpectedResponse


def conflict(what: str) -> UnexpectedResponse:
    body = f'{{"status":{{"error":"Wrong input: {what} already exists!"}},"time":0.0}}'.encode()
    return UnexpectedResponse(409, "Conflict", body, httpx.Headers())


class ServerLikeQdrant:
    def __init__(self, client, starters: int = 1) -> None:
        self._client = client
        self._barrier = asyncio.Barrier(starters) if starters > 1 else None
        self.conflicts = 0  # 409s answered

    def __getattr__(self, name):
        return getattr(self._client, name)

    async def _together(self) -> None:
        if self._barrier is not None:
            try:
                await asyncio.wait_for(self._barrier.wait(), 5)
            except (asyncio.TimeoutError, asyncio.BrokenBarrierError):
                pass  # fewer starters reached this check: no race to stage

    async def collection_exists(self, collection_name, **kw) -> bool:
        answer = await self._client.collection_exists(collection_name, **kw)
        await self._together()  # every starter has its (now stale) answer before anyone acts
        return answer

    async def get_aliases(self, **kw):
        answer = await self._client.get_aliases(**kw)
        await self._together()
        return answer

    async def _counted(self, call):
        """A real server behind the wrapped client (QDRANT_URL) answers its own 409s:
        count those too, since concurrent HTTP calls can all pass the check above."""
        try:
            return await call
        except UnexpectedResponse as exc:
            if exc.status_code == 409:
                self.conflicts += 1
            raise

    async def create_collection(self, collection_name, **kw):
        if await self._client.collection_exists(collection_name):
            self.conflicts += 1
            raise conflict(f"Collection `{collection_name}`")
        return await self._counted(self._client.create_collection(collection_name, **kw))

    async def update_collection_aliases(self, change_aliases_operations, **kw):
        existing = {a.alias_name for a in (await self._client.get_aliases()).aliases}
        for op in change_aliases_operations:
            if isinstance(op, models.DeleteAliasOperation):
                existing.discard(op.delete_alias.alias_name)
            elif isinstance(op, models.CreateAliasOperation) and op.create_alias.alias_name in existing:
                self.conflicts += 1
                raise conflict(f"Alias `{op.create_alias.alias_name}`")
        return await self._counted(
            self._client.update_collection_aliases(change_aliases_operations=change_aliases_operations, **kw)
        )
