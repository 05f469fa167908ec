"""LISTEN on a dedicated connection and turn notifications into wake-ups.

NOTIFY is only a wake-up: the events are in the outbox table, and the workers
also poll, because notifications sent while no listener is connected are lost.
"""
from __future__ import annotations

import asyncio
import logging

from daemon.errors import describe
from daemon.runtime.backoff import RECONNECT, Backoff
from db.gateway import connect_async

log = logging.getLogger(__name__)

CHANNEL = "outboxd"  # the channel db/migrations' notify_outbox() uses
CONNECT_TIMEOUT = 10.0  # seconds; then the attempt counts as failed and is retried with backoff


class Wakeup:
    """A broadcast signal. Take a ticket before looking for work, then wait on
    it (with the stop event: batch_policy.wait_for_any): a wake-up that fires
    in between is not missed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def ticket(self) -> asyncio.Event:
        return self._event

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


class Listener:
    def __init__(self, dsn: str, application_name: str, wakeup: Wakeup, *, backoff: Backoff = RECONNECT) -> None:
        self._dsn = dsn
        self._application_name = application_name
        self._wakeup = wakeup
        self._backoff = backoff
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with backoff and jitter."""
        attempts = self._backoff.attempts()
        while True:
            try:
                async with await connect_async(self._dsn, application_name=self._application_name,
                                               timeout=CONNECT_TIMEOUT) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    attempts.reset()
                    # Anything committed while we were away sent its NOTIFY to nobody.
                    self._wakeup.fire()
                    async for _ in conn.notifies():
                        self._wakeup.fire()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: reconnect
                error = describe(exc)
            else:  # the server ended the stream without an error (a terminated backend can)
                error = "the server closed the LISTEN connection"
            self.connected.clear()
            delay = attempts.next_delay()
            log.warning("LISTEN connection lost; polling covers the gap", extra={"error": error, "retry_in": round(delay, 2)})
            await asyncio.sleep(delay)
