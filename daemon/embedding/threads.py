"""Threads for the local backends: how many forward threads a CPU gets, and a
daemon thread as an awaitable (a model load or an export that interpreter
exit need not wait for)."""
from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any

CPU_WORKERS = 4  # forward threads on a CPU at most (one per core up to this; the cores shared among them)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_workers(threads: int | None = None) -> tuple[int, int]:
    """(forward threads, operator threads each) on a CPU: one forward thread per
    core up to CPU_WORKERS, the cores shared among them; `threads` (a setting)
    means one forward thread with that many."""
    if threads:
        return 1, threads
    n = cores()
    workers = max(1, min(n, CPU_WORKERS))
    return workers, max(1, n // workers)


def run_in_thread(fn: Callable[..., Any], *args: Any, name: str = "outboxd-load") -> "asyncio.Future[Any]":
    """fn(*args) on a fresh daemon thread, as an awaitable: a model load or an
    export that interpreter exit need not wait for (the loop's default executor
    would be joined at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            ok, value = False, exc
        else:
            ok, value = True, result
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop is gone
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
