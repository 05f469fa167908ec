"""LISTEN on a dedicated connection and turn notifications into wake-ups.

NOTIFY is only a wake-up: the events are in the outbox table, and the workers
also poll, because notifications sent while no listener is connected are lost.
"""
from __future__ import annotations

import asyncio
import logging

from daemon.errors import Failure, describe
from daemon.runtime.backoff import RECONNECT, Backoff
from daemon.runtime.retry import Failed, Retry, Stopped
from db.gateway import connect_async
from db.outbox import listen

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds; then the attempt counts as failed and is retried with backoff


class Wakeup:
    """A broadcast signal. Take a ticket before looking for work, then wait on
    it (with the stop event: retry.wait_for_any): a wake-up that fires
    in between is not missed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def ticket(self) -> asyncio.Event:
        return self._event

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


class ListenEnded(ConnectionError):
    """The server ended the notifications without an error (a terminated backend can)."""


class Listener:
    def __init__(self, dsn: str, application_name: str, wakeup: Wakeup, *, backoff: Backoff = RECONNECT,
                 stop: asyncio.Event | None = None) -> None:
        self._dsn = dsn
        self._application_name = application_name
        self._wakeup = wakeup
        # any failure means: reconnect (the claim loops poll meanwhile); the stop ends the wait
        self._retry = Retry(backoff, stop=stop, retries=tuple(Failure), on_retry=self._lost)
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Listen until stopped (or cancelled), reconnecting with backoff and jitter."""
        try:
            await self._retry.call(self._listen)
        except Stopped:
            return

    async def _listen(self) -> None:
        try:
            async with await connect_async(self._dsn, application_name=self._application_name,
                                           timeout=CONNECT_TIMEOUT) as conn:
                await listen(conn)
                self.connected.set()
                self._retry.reset()  # connected: the next loss starts from the first delay
                # Anything committed while we were away sent its NOTIFY to nobody.
                self._wakeup.fire()
                async for _ in conn.notifies():
                    self._wakeup.fire()
        finally:
            self.connected.clear()
        raise ListenEnded("the server closed the LISTEN connection")

    def _lost(self, failed: Failed) -> None:
        log.warning("LISTEN connection lost; polling covers the gap",
                    extra={"error": describe(failed.error), "retry_in": round(failed.delay, 2)})
