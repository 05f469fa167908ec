"""The check-then-act race of N starters, made certain on a real Qdrant server.

Several daemons or consumers starting side by side each ask "does the
collection (alias) exist?" and then create it. A real server answers the
losers with its own 409 "already exists", but only when their checks happen
to land before the winner's create, which no test can arrange by timing. So
this wrapper holds each starter's check until all of them have made it
(a barrier), and changes nothing else: every answer, 409s included, is the
server's own. That timing is the one thing a real server cannot be made to do
on demand.
"""
from __future__ import annotations

import asyncio

from qdrant_client.http.exceptions import UnexpectedResponse


class RacingStarters:
    def __init__(self, client, starters: int) -> None:
        self._client = client
        self._barrier = asyncio.Barrier(starters)
        self.conflicts = 0  # the server's 409s

    def __getattr__(self, name):
        return getattr(self._client, name)

    async def _together(self) -> None:
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
        try:
            return await call
        except UnexpectedResponse as exc:
            if exc.status_code == 409:
                self.conflicts += 1
            raise

    async def create_collection(self, collection_name, **kw):
        return await self._counted(self._client.create_collection(collection_name, **kw))

    async def update_collection_aliases(self, change_aliases_operations, **kw):
        return await self._counted(
            self._client.update_collection_aliases(change_aliases_operations=change_aliases_operations, **kw)
        )
