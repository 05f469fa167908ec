"""The REST routes of tests.benchmarks.rest_shim served over a real socket, in
a process of its own, so several outboxd processes can share one Qdrant here.

    python -m tests.benchmarks.shim_server [--port 0] [--host 127.0.0.1]

Prints `listening on http://HOST:PORT` once it accepts connections, then
serves until SIGTERM/SIGINT.

Qdrant REST shim (qdrant-client's local engine in one process), not a Qdrant
server: stdlib ThreadingHTTPServer (HTTP/1.1, keep-alive) parses requests on
its threads and hands each to RestShim.handle, whose engine (qdrant-client's
local mode, in memory) runs them one at a time on one asyncio loop thread.
Only the endpoints outboxd uses. It makes the multi-process shape (N daemons,
N consumers, one Qdrant) measurable without a server; absolute numbers against
a real Qdrant (multi-threaded, in Rust) differ.

Besides the shim's routes: `GET /` answers like a server (title, version), so
the client's version check is quiet; `GET /_shim/stats` answers the requests
served, the engine's CPU seconds and this process's CPU seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import urlsplit

import httpx
import orjson

SHIM_TITLE = "qdrant - outboxd benchmark shim"
SHIM_VERSION = "1.19.0"
SHIM_LABEL = "Qdrant REST shim (qdrant-client's local engine in one process), not a Qdrant server"
SERVER_LABEL = SHIM_LABEL + "; its own process, over a socket"


def _server_shim():
    """RestShim with the few routes more that the harness's own set-up uses (upsert)."""
    from qdrant_client import models

    from tests.benchmarks.rest_shim import C, RestShim

    class ServerShim(RestShim):
        def __init__(self) -> None:
            super().__init__()
            self.routes.insert(0, ("PUT", C + r"/points$", self._upsert))

        async def _upsert(self, body, c):
            if "batch" in body:
                points = models.PointsBatch.model_validate(body).batch
            else:
                points = models.PointsList.model_validate(body).points
            return await self.engine.upsert(c, points)

    return ServerShim


class _Engine:
    """RestShim on an asyncio loop of its own thread; handle() from any thread."""

    def __init__(self) -> None:
        RestShim = _server_shim()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="shim-engine", daemon=True)
        self.thread.start()
        self.shim = asyncio.run_coroutine_threadsafe(self._make(RestShim), self.loop).result()

    async def _make(self, cls):
        return cls()  # built on the loop: its AsyncQdrantClient belongs there

    def handle(self, request: httpx.Request) -> httpx.Response:
        return asyncio.run_coroutine_threadsafe(self.shim.handle(request), self.loop).result()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    engine: _Engine  # set on the class by serve()
    server_version = "outboxd-qdrant-shim"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _answer(self, status: int, content: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(content)))
        self._headers_buffer.append(b"\r\n" + content)  # headers and body in one write
        self.flush_headers()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        if self.command == "GET" and path in ("", "/"):
            self._answer(200, orjson.dumps({"title": SHIM_TITLE, "version": SHIM_VERSION}))
            return
        if self.command == "GET" and path == "/_shim/stats":
            shim = self.engine.shim
            self._answer(200, orjson.dumps({"requests": shim.requests, "engine_cpu": round(shim.engine_cpu, 4),
                                            "process_cpu": round(time.process_time(), 4)}))
            return
        request = httpx.Request(self.command, f"http://shim{self.path}", content=body,
                                headers={"Content-Type": "application/json"})
        try:
            response = self.engine.handle(request)
            self._answer(response.status_code, response.content)
        except Exception as exc:  # noqa: BLE001 - a 500 for the client, as a server would
            self._answer(500, orjson.dumps({"status": {"error": f"{type(exc).__name__}: {exc}"}, "time": 0}))

    do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet
        return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def serve(port: int = 0, host: str = "127.0.0.1") -> None:
    Handler.engine = _Engine()
    server = _Server((host, port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"listening on http://{host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def loopback_host() -> str:
    """127.0.0.2 where it can be bound (Linux: all of 127/8 is loopback), else 127.0.0.1.

    qdrant-client turns HTTP keep-alive off for a Qdrant at "localhost" or
    "127.0.0.1" (AsyncQdrantRemote: max_keepalive_connections=0), so every
    request would open a TCP connection; another address makes the client
    behave as against a server on another host, the deployed shape."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return "127.0.0.1"


@contextmanager
def shim_server_process(port: int | None = None, host: str | None = None) -> Iterator[str]:
    """`python -m tests.benchmarks.shim_server --port N --host H` in a child process; yields its URL."""
    from tests.processes import serving

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOXD_", "QDRANT_"))}
    argv = ["tests.benchmarks.shim_server", "--port", str(port or 0), "--host", host or loopback_host()]
    with serving(argv, "listening on ", "the Qdrant REST shim server", env=env) as line:
        yield line.removeprefix("listening on ")


def stats(url: str) -> dict:
    return orjson.loads(httpx.get(f"{url}/_shim/stats", timeout=10).content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    serve(args.port, args.host)


if __name__ == "__main__":
    main()
