"""The encode stage the local backends (torch, ONNX) share: it keeps the device busy.

    caller (event loop)  --texts-->  tokenizer thread  --padded batches (2 at most)-->  forward thread
          ^                                                                                  |
          +------------------------- vectors, in the caller's order ------------------------+

- Tokenization: the Rust tokenizer (`tokenizers.Tokenizer.encode_batch`: parallel,
  outside the GIL), once per text, cut to the window the way sentence-transformers
  cuts it (truncation inside the tokenizer, so the final [SEP] stays). A text is
  `truncated` when the tokenizer had to cut it: the same tokenization that fed
  the model, never a second one.
- Batching: everything waiting is one *generation*: the texts of every encode()
  call that arrived while the previous generation was being encoded, merged,
  sorted by token length and cut into forward batches (at most `max_batch` texts
  and, when set, `max_tokens` padded tokens; a longer text goes alone). Length
  sorting keeps padding (wasted work) low; generations keep latency bounded (a
  long text is never passed over for ever by newer short ones).
- Pipelining: the tokenizer thread tokenizes new calls as they come and pads the
  next batches (two at most) while the forward thread runs the current one, and
  the event loop stays free for the callers' Qdrant writes, leases and health
  checks. Python work per text is a few numpy calls, not loops over tokens.
- Forward threads: one by default; on a CPU the backends run one per core with a
  single-threaded forward pass each (`workers`): small batches parallelise badly
  inside an operator, and on 2 cores two single-threaded passes side by side
  measured 1.3-1.5x (torch) and 1.05-1.1x (ONNX Runtime) one two-threaded pass.
- encode() is a coroutine; vectors come back in the caller's order. A caller
  cancelled before its texts are forwarded drops them (rows of a cancelled
  caller are cut out of a batch before its forward pass).
- close() returns at once: every caller still waiting fails with
  EncoderClosedError (transient: the daemon retries those events, without
  counting an attempt), and the threads stop after the forward pass in flight.
  Both threads are daemon threads, so interpreter exit never waits for an encode;
  and since a thread that comes back from torch or ONNX Runtime while the
  interpreter is finalising aborts the process ("terminate called without an
  active exception", exit 134), an atexit hook interrupts the forward pass in
  flight at its next operator (see `interrupt`) and gives it a moment to unwind.
- encoded_seconds(): the seconds the forward thread spent in forward passes (the
  device's busy time), for the encode_seconds metric.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.embedding.backend import Encoded
from daemon.embedding.tokens import pad, plan_batches, window_tokenizer
from daemon.errors import DependencyDown

log = logging.getLogger(__name__)

PREPARED_BATCHES = 2  # padded batches the tokenizer thread keeps ready (one more per extra forward thread)
TOKENIZE_CHUNK = 4096  # texts per encode_batch call (bounds how long one call holds the thread)
EXIT_GRACE = 5.0  # seconds interpreter exit gives an interrupted forward pass to unwind (one operator)


# forward(input_ids, attention_mask) -> float32 vectors (n, dimension); both int64 (n, L)
Forward = Callable[[np.ndarray, np.ndarray], np.ndarray]


class EncoderClosedError(DependencyDown):
    """The encoder was closed (shutdown) before these texts were encoded. Transient:
    the events are retried by the next process without counting an attempt."""

    def __init__(self, message: str = "the encoder was closed (shutting down) before these texts were encoded") -> None:
        super().__init__(message, "embedding")


class ForwardInterrupted(Exception):
    """Raised inside a forward pass that `interrupt` stopped (interpreter exit)."""


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


_live_stages: "weakref.WeakSet[EncodeStage]" = weakref.WeakSet()


@atexit.register
def _interrupt_at_exit() -> None:  # pragma: no cover - exercised in a subprocess by the tests
    """Interpreter exit: stop every stage without waiting for its encode, but let a
    forward pass in flight unwind first (a thread that re-enters Python from torch's
    or ONNX Runtime's C++ while the interpreter finalises aborts the process)."""
    stages = list(_live_stages)
    for stage in stages:
        stage.close(interrupt=True)
    deadline = time.monotonic() + EXIT_GRACE
    for stage in stages:
        stage._join(max(0.0, deadline - time.monotonic()))


class EncodeStage:
    """One tokenizer thread and one forward thread in front of a model.

    tokenizer: a tokenizers.Tokenizer (copied here: its truncation and padding
    are set for the stage and must not be changed by anyone else).
    forward: runs on the forward thread only; (input_ids, attention_mask) -> vectors.
    interrupt: called (from another thread) at interpreter exit to make a forward
    pass in flight raise soon (torch: a pre-hook on the model's modules; ONNX
    Runtime: RunOptions.terminate). Optional.
    lowercase: lower-case texts before tokenizing (a folder's do_lower_case).
    """

    def __init__(
        self,
        tokenizer: Any,
        forward: Forward,
        *,
        window: int,
        dimension: int,
        max_batch: int,
        max_tokens: int | None = None,
        interrupt: Callable[[], None] | None = None,
        lowercase: bool = False,
        workers: int = 1,
        name: str = "encode",
    ) -> None:
        if max_batch < 1 or workers < 1:
            raise ValueError("max_batch and workers must be at least 1")
        self._tokenizer = window_tokenizer(tokenizer, window)
        pad_token = (tokenizer.padding or {}).get("pad_token")
        self._pad_id = (tokenizer.token_to_id(pad_token) if pad_token else None) or 0
        self._forward = forward
        self._interrupt = interrupt
        self._lowercase = lowercase  # the model folder's do_lower_case (sentence_bert_config.json)
        self.dimension = dimension
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.name = name
        self.workers = workers
        self._depth = PREPARED_BATCHES + workers - 1

        self._cond = threading.Condition()
        self._pending: list[_Request] = []  # arrived, not yet tokenized
        self._ready: list[_Tokenized] = []  # tokenized, waiting for the next generation
        self._plan: deque[list[_Tokenized]] = deque()  # the current generation's batches, not yet padded
        self._batches: deque[_Batch] = deque()  # padded, waiting for the forward thread
        self._live: set[_Request] = set()  # every request not yet resolved or failed
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._busy = 0.0  # seconds during which at least one forward pass ran (a union, never > wall time)
        self._running = 0  # forward passes running now
        self._busy_since = 0.0
        self._forward_threads = 0
        self.forward_calls = 0  # forward passes run (tests, benchmarks)

    # --- the caller's side --------------------------------------------------------
    async def encode(self, texts: list[str]) -> Encoded:
        if self._closed:
            raise EncoderClosedError()
        if not texts:
            return Encoded(np.zeros((0, self.dimension), dtype=np.float32), [])
        loop = asyncio.get_running_loop()
        request = _Request(list(texts), loop, loop.create_future())
        with self._cond:
            if self._closed:
                raise EncoderClosedError()
            self._start()
            self._pending.append(request)
            self._live.add(request)
            self._cond.notify_all()
        try:
            return await request.future
        except asyncio.CancelledError:
            request.cancelled = True  # rows not yet forwarded are dropped
            with self._cond:
                self._live.discard(request)
            raise

    def waiting(self) -> int:
        """Texts tokenized and waiting for a forward pass: the depth of the encode queue."""
        with self._cond:
            return len(self._ready) + sum(map(len, self._plan)) + sum(len(b.items) for b in self._batches)

    def encoded_seconds(self) -> float:
        with self._cond:
            if self._running:
                return self._busy + time.perf_counter() - self._busy_since
            return self._busy

    def close(self, *, interrupt: bool = False) -> None:
        """Fail every waiting caller with EncoderClosedError and stop the threads
        once the forward pass in flight (if any) returns; never waits for it.
        interrupt: also stop that forward pass at its next operator (exit)."""
        with self._cond:
            self._closed = True
            requests = list(self._live)
            for request in requests:
                request.finished = True
            self._live.clear()
            self._pending.clear()
            self._ready.clear()
            self._plan.clear()
            self._batches.clear()
            self._cond.notify_all()
        if interrupt and self._interrupt is not None and any(t.is_alive() for t in self._threads):
            try:
                self._interrupt()
            except Exception:  # pragma: no cover - best effort at exit
                pass
        error = EncoderClosedError()
        for request in requests:
            _call_on_loop(request, _fail, error)

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # --- threads --------------------------------------------------------------------
    def _start(self) -> None:  # under self._cond
        if self._threads:
            return
        self._threads = [
            threading.Thread(target=self._tokenize_loop, name=f"outboxd-{self.name}-tokenize", daemon=True)
        ] + [
            threading.Thread(target=self._forward_loop, name=f"outboxd-{self.name}-forward-{i}", daemon=True)
            for i in range(self.workers)
        ]
        self._forward_threads = self.workers
        _live_stages.add(self)
        for t in self._threads:
            t.start()

    def _tokenize_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._pending and not (
                    (self._plan or self._ready) and len(self._batches) < self._depth
                ):
                    self._cond.wait()
                if self._closed:
                    return
                arrived, self._pending = self._pending, []
            if arrived:
                self._tokenize(arrived)
                continue  # more may have arrived meanwhile: they join this generation
            self._prepare_next()

    def _tokenize(self, requests: list[_Request]) -> None:
        live = [r for r in requests if not r.dropped]
        texts = [t for r in live for t in r.texts]
        if self._lowercase:
            texts = [t.lower() for t in texts]
        try:
            encodings = []
            for start in range(0, len(texts), TOKENIZE_CHUNK):
                encodings.extend(self._tokenizer.encode_batch(texts[start : start + TOKENIZE_CHUNK]))
        except Exception as exc:  # not text, or the tokenizer failed: those callers fail
            self._fail_requests(live, exc)
            return
        tokenized: list[_Tokenized] = []
        it = iter(encodings)
        for request in live:
            for position in range(len(request.texts)):
                enc = next(it)
                if enc.overflowing:  # the tokenizer cut it to the window
                    request.truncated[position] = True
                tokenized.append(_Tokenized(request, position, enc.ids))
        with self._cond:
            if not self._closed:
                self._ready.extend(tokenized)
                self._cond.notify_all()

    def _prepare_next(self) -> None:
        """Pad the next batch of the generation (starting a new generation from
        everything tokenized when the current one is all handed over)."""
        with self._cond:
            if not self._plan:
                ready = [t for t in self._ready if not t.request.dropped]
                self._ready = []
                lengths = [len(t.ids) for t in ready]
                for idx in plan_batches(lengths, self.max_batch, self.max_tokens):
                    self._plan.append([ready[i] for i in idx])
            if not self._plan:
                return
            items = self._plan.popleft()
        items = [t for t in items if not t.request.dropped]
        if not items:
            return
        ids, mask = pad([t.ids for t in items], self._pad_id)
        with self._cond:
            if not self._closed:
                self._batches.append(_Batch(items, ids, mask))
                self._cond.notify_all()

    def _forward_loop(self) -> None:
        try:
            self._forward_batches()
        finally:  # until the last one ends, interpreter exit must interrupt their forward passes
            with self._cond:
                self._forward_threads -= 1
                last = self._forward_threads == 0
            if last:
                _live_stages.discard(self)

    def _forward_batches(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._batches:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._batches.popleft()
                self._cond.notify_all()  # room for the tokenizer thread to prepare another
            items, ids, mask = batch.items, batch.input_ids, batch.attention_mask
            keep = [r for r, t in enumerate(items) if not t.request.dropped]
            if not keep:
                continue
            if len(keep) < len(items):  # a caller was cancelled or failed: leave its rows out
                items = [items[r] for r in keep]
                ids, mask = ids[keep], mask[keep]
                width = int(mask.sum(axis=1).max())
                ids, mask = ids[:, :width], mask[:, :width]
            self._busy_start()
            try:
                vectors = self._forward(ids, mask)
            except ForwardInterrupted:
                self._busy_end()
                return
            except Exception as exc:
                self._busy_end()
                if self._closed:
                    return
                log.warning("forward pass failed", extra={"texts": len(items), "error": repr(exc)})
                self._fail_requests(list({t.request: None for t in items}), exc)
                continue
            self._busy_end()
            with self._cond:
                self.forward_calls += 1
            if self._closed:  # close() failed the callers already; stop after this pass
                return
            self._deliver(items, np.asarray(vectors, dtype=np.float32))

    def _busy_start(self) -> None:
        with self._cond:
            if self._running == 0:
                self._busy_since = time.perf_counter()
            self._running += 1

    def _busy_end(self) -> None:
        with self._cond:
            self._running -= 1
            if self._running == 0:
                self._busy += time.perf_counter() - self._busy_since

    def _deliver(self, items: list[_Tokenized], vectors: np.ndarray) -> None:
        rows: dict[_Request, tuple[list[int], list[int]]] = {}
        for r, t in enumerate(items):
            into = rows.setdefault(t.request, ([], []))
            into[0].append(t.position)
            into[1].append(r)
        done: list[_Request] = []
        with self._cond:  # forward threads may deliver rows of the same request at once
            for request, (positions, batch_rows) in rows.items():
                if request.dropped:
                    continue
                if request.vectors is None:
                    request.vectors = np.empty((len(request.texts), vectors.shape[1]), dtype=np.float32)
                request.vectors[positions] = vectors[batch_rows]
                request.remaining -= len(positions)
                if request.remaining == 0:
                    done.append(request)
                    self._live.discard(request)
                    request.finished = True
        for request in done:
            _call_on_loop(request, _resolve)

    def _fail_requests(self, requests: list[_Request], exc: BaseException) -> None:
        failed = []
        with self._cond:
            for request in requests:
                self._live.discard(request)
                if not request.finished:
                    request.finished = True
                    failed.append(request)
        for request in failed:
            _call_on_loop(request, _fail, exc)
