"""Liveness, readiness and metrics over a small HTTP/1.1 server on asyncio.

GET /healthz   200 while the main loop's heartbeat is younger than
               heartbeat_timeout, else 503 (a wedged event loop, a stuck worker)
GET /readyz    200 when every readiness check passes, else 503; the JSON body
               names each check with its status and, when it failed, the error
GET /metrics   the Prometheus text exposition
anything else  404 (405 for a method other than GET or HEAD)

One request per connection (Connection: close); no framework, nothing that
parses more than a request line and headers.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress

import orjson

from daemon.errors import describe

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0  # seconds a client has to send its request line and headers
MAX_HEADERS = 100
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request", 503: "Service Unavailable"}

Check = Callable[[], Awaitable[None]]


class Heartbeat:
    """Beaten by the main loop; its age is what /healthz and the systemd
    watchdog judge the process by. Work in progress counts too: a worker marks
    its batch busy() (again at each outage retry, which is progress) and idle()
    when done, so one batch that hangs ages the heartbeat however often the
    rest of the loop beats.

    clock is the monotonic time it judges by; a test passes its own, so an age
    is what the test set, not what a loaded machine's scheduler made it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()
        self._busy: dict[str, float] = {}

    def beat(self) -> None:
        self._last = self._clock()

    def busy(self, name: str) -> None:
        self._busy[name] = self._clock()

    def progress(self) -> None:
        """Every work in progress moved on (each waits its turn of a shared budget, which is pace, not a hang)."""
        now = self._clock()
        for name in list(self._busy):
            self._busy[name] = now

    def idle(self, name: str) -> None:
        self._busy.pop(name, None)

    @property
    def in_flight(self) -> bool:
        """Whether any work is busy now (a batch between its claim and its record)."""
        return bool(self._busy)

    @property
    def age(self) -> float:
        """Seconds since the last beat, or since the oldest busy work last progressed."""
        now = self._clock()
        return max([now - self._last, *(now - t for t in list(self._busy.values()))])

    def fresh(self, timeout: float) -> bool:
        return self.age < timeout

    def stuck(self, timeout: float) -> list[str]:
        """The work busy for timeout seconds without progress."""
        now = self._clock()
        return sorted(name for name, t in list(self._busy.items()) if now - t >= timeout)


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        heartbeat: Heartbeat,
        heartbeat_timeout: float,
        readiness: dict[str, Check],
        metrics_render: Callable[[], tuple[bytes, str]],
        *,
        readiness_timeout: float = 5.0,
        secrets: Iterable[str] = (),
    ) -> None:
        self.host = host
        self._port = port
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat_timeout
        self.readiness = readiness
        self.metrics_render = metrics_render
        self.readiness_timeout = readiness_timeout
        # values that must never appear in a response (checks' errors are redacted)
        self._secrets = sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True)
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port listened on (the ephemeral one picked for port 0, once started)."""
        if self._server is not None and self._server.sockets:
            return self._server.sockets[0].getsockname()[1]
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self._port, reuse_address=True)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    # --- the endpoints -------------------------------------------------------------------------
    def healthz(self) -> tuple[int, bytes, str]:
        age = self.heartbeat.age
        ok = age < self.heartbeat_timeout
        body = {
            "status": "ok" if ok else "fail",
            "heartbeat_age_seconds": round(age, 3),
            "heartbeat_timeout_seconds": self.heartbeat_timeout,
        }
        stuck = self.heartbeat.stuck(self.heartbeat_timeout)
        if stuck:
            body["stuck"] = stuck
        return (200 if ok else 503), orjson.dumps(body), "application/json"

    async def readyz(self) -> tuple[int, bytes, str]:
        names = list(self.readiness)
        outcomes = await asyncio.gather(*(run_check(self.readiness[n], self.readiness_timeout) for n in names))
        checks = {}
        for name, error in zip(names, outcomes):
            checks[name] = {"status": "ok"} if error is None else {"status": "fail", "error": self._redact(error)}
        ok = all(error is None for error in outcomes)
        body = {"status": "ok" if ok else "fail", "checks": checks}
        return (200 if ok else 503), orjson.dumps(body), "application/json"

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def route(self, method: str, path: str) -> tuple[int, bytes, str]:
        if method not in ("GET", "HEAD"):
            return 405, b'{"status":"method not allowed"}', "application/json"
        if path == "/healthz":
            return self.healthz()
        if path == "/readyz":
            return await self.readyz()
        if path == "/metrics":
            body, content_type = self.metrics_render()
            return 200, body, content_type
        return 404, b'{"status":"not found"}', "application/json"

    # --- HTTP ----------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            try:
                method, path = await asyncio.wait_for(self._read_request(reader), REQUEST_TIMEOUT)
            except (ValueError, UnicodeDecodeError, asyncio.LimitOverrunError):
                status, body, content_type = 400, b'{"status":"bad request"}', "application/json"
            else:
                try:
                    status, body, content_type = await self.route(method, path)
                except Exception as exc:  # noqa: BLE001 - a broken endpoint answers 500, the server lives on
                    log.warning("health endpoint failed", extra={"path": path, "error": describe(exc)})
                    status, body, content_type = 500, b'{"status":"internal error"}', "application/json"
            head = (
                f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            ).encode("latin-1")
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away or never asked anything
        finally:
            writer.close()
            with suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
        line = (await reader.readline()).decode("latin-1").strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise ValueError(f"not an HTTP request line: {line[:80]!r}")
        for _ in range(MAX_HEADERS):  # the headers are read and ignored
            header = await reader.readline()
            if header in (b"\r\n", b"\n", b""):
                break
        else:
            raise ValueError("too many headers")
        method, target = parts[0].upper(), parts[1]
        return method, target.split("?", 1)[0]


async def run_check(check: Check, timeout: float) -> str | None:
    """None when the readiness check passes within timeout, else why it failed."""
    try:
        await asyncio.wait_for(check(), timeout)
    except asyncio.TimeoutError:
        return f"no answer within {timeout:g}s"
    except Exception as exc:  # noqa: BLE001 - any failure is a failed check
        return describe(exc)
    return None
