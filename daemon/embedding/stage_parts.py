"""The encode stage's small parts: its errors, what travels between its threads,
the batch planner and padding, and a daemon thread as an awaitable
(daemon.embedding.stage has the stage itself)."""
from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.embedding.backend import Encoded
from daemon.errors import DependencyDown

# forward(input_ids, attention_mask) -> float32 vectors (n, dimension); both int64 (n, L)
Forward = Callable[[np.ndarray, np.ndarray], np.ndarray]


class EncoderClosedError(DependencyDown):
    """The encoder was closed (shutdown) before these texts were encoded. Transient:
    the events are retried by the next process without counting an attempt."""

    def __init__(self, message: str = "the encoder was closed (shutting down) before these texts were encoded") -> None:
        super().__init__(message, "embedding")


class ForwardInterrupted(Exception):
    """Raised inside a forward pass that `interrupt` stopped (interpreter exit)."""


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


def window_tokenizer(tokenizer, window: int):
    """A copy of a Rust tokenizer that truncates to the window and does not pad
    (padding is per batch, by pad())."""
    tok = tokenizer.__class__.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length=window)
    return tok


def pad(rows: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64, right-padded to the longest row."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max()) if len(rows) else 0
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return ids, mask


def plan_batches(lengths: list[int], max_batch: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indexes into lengths, sorted by length, cut into batches of at most
    max_batch texts and (when set) max_tokens padded tokens (texts × the longest);
    a text longer than max_tokens goes alone."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        n = len(current) + 1
        if current and (n > max_batch or (max_tokens is not None and n * lengths[i] > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


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


@dataclass(eq=False)
class _Request:
    texts: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    vectors: np.ndarray | None = None
    truncated: list[bool] = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False  # set by the caller's loop; read by the threads (a bool store is atomic)
    finished: bool = False  # resolved or failed: nothing more to do for it

    def __post_init__(self) -> None:
        self.truncated = [False] * len(self.texts)
        self.remaining = len(self.texts)

    @property
    def dropped(self) -> bool:
        return self.cancelled or self.finished


@dataclass(eq=False)
class _Tokenized:
    """One text, tokenized: its request, its position there, its ids (≤ window)."""

    request: _Request
    position: int
    ids: list[int]


@dataclass(eq=False)
class _Batch:
    items: list[_Tokenized]
    input_ids: np.ndarray
    attention_mask: np.ndarray


def _resolve(request: _Request) -> None:  # on the caller's loop
    if not request.future.done():
        request.future.set_result(Encoded(request.vectors, request.truncated))


def _fail(request: _Request, exc: BaseException) -> None:  # on the caller's loop
    if not request.future.done():
        request.future.set_exception(exc)


def _call_on_loop(request: _Request, fn: Callable[..., None], *args: Any) -> None:
    try:
        request.loop.call_soon_threadsafe(fn, request, *args)
    except RuntimeError:  # that loop is closed: nobody is waiting any more
        pass
