"""An event loop of its own, in a daemon thread, that coroutines from any other
loop can run on and be awaited from.

The daemon's loop also runs claims, Qdrant writes (synchronous in qdrant-client's
local mode) and the rest; requests to an embedding endpoint whose answers are
read only when that loop is free leave the endpoint idle meanwhile. On a loop of
their own they go out and come back whatever the caller's loop is doing, and one
backend serves any number of caller loops (asyncio.run per call, tests).
Cancelling the caller cancels the work there.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro on the loop thread (started on first use) and await it here."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._started()))

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    try:
                        loop.run_forever()
                    finally:
                        loop.close()

                self._thread = threading.Thread(target=serve, name=self.name, daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop

    async def close(self, cleanup: Callable[[], Awaitable[None]] | None = None, timeout: float = 2.0) -> None:
        """Cancel what runs there, run cleanup there, stop the thread; returns
        within about 2 x timeout whatever the work in flight does."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or loop.is_closed():
            return

        async def shutdown() -> None:
            current = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is not current:
                    task.cancel()
            if cleanup is not None:
                await cleanup()

        try:
            done = asyncio.run_coroutine_threadsafe(shutdown(), loop)
            await asyncio.wait_for(asyncio.wrap_future(done), timeout=timeout)
        except (asyncio.TimeoutError, RuntimeError):  # a loop already stopping: the thread ends anyway
            pass
        finally:
            with contextlib.suppress(RuntimeError):  # closed already
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            await asyncio.to_thread(thread.join, timeout)
