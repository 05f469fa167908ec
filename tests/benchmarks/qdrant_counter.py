"""What outboxd asks of Qdrant: a proxy around any client (local mode or a
server) that counts requests by method, operations per batch request, points
read before writing, and the bytes each request would put on the wire as REST
JSON; for local mode, the CPU spent inside the client (the engine's work,
which a server does in its own process); and, against a server over REST, the
bytes that really crossed the wire (WireBytes)."""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

import orjson
from pydantic import BaseModel


def _wire_bytes(value: Any) -> int:
    """Bytes of value as REST JSON (pydantic models dumped the way the client sends them)."""
    def default(v):
        if isinstance(v, BaseModel):
            return v.model_dump(mode="json", exclude_none=True)
        if hasattr(v, "tolist"):
            return v.tolist()
        return str(v)

    try:
        return len(orjson.dumps(value, default=default))
    except TypeError:
        return 0


class CountingQdrant:
    WRITES = {"batch_update_points", "upsert", "set_payload", "overwrite_payload", "delete"}
    READS = {"retrieve", "scroll", "query_points", "search", "count"}

    def __init__(self, client, *, local: bool, count_bytes: bool = True) -> None:
        self._client = client
        self.local = local
        self.count_bytes = count_bytes  # False: no JSON estimate (its CPU would count as the caller's)
        self.reset()

    def reset(self) -> None:
        """Zero every counter (e.g. after a daemon's start-up requests)."""
        self.requests: Counter[str] = Counter()
        self.operations = 0  # operations inside batch_update_points requests
        self.points_read = 0
        self.bytes_sent = 0
        self.cpu_inside = 0.0  # local mode: the engine's CPU (a server's own work)

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr) or name not in self.WRITES | self.READS:
            return attr

        async def counted(*args, **kwargs):
            self.requests[name] += 1
            if name == "batch_update_points":
                ops = kwargs.get("update_operations", args[1] if len(args) > 1 else [])
                self.operations += len(ops)
            if self.count_bytes:
                self.bytes_sent += _wire_bytes({"args": list(args[1:]), **{k: v for k, v in kwargs.items()}})
            started = time.process_time()
            try:
                result = await attr(*args, **kwargs)
            finally:
                if self.local:
                    self.cpu_inside += time.process_time() - started
            if name == "retrieve":
                self.points_read += len(result)
            elif name == "scroll":
                self.points_read += len(result[0])
            return result

        return counted

    def per_event(self, events: int) -> dict[str, float]:
        n = max(events, 1)
        return {
            "requests": round(sum(self.requests.values()) / n, 4),
            "write_operations": round(self.operations / n, 4),
            "points_read": round(self.points_read / n, 4),
            "bytes_sent": round(self.bytes_sent / n, 1),
            "by_method": dict(self.requests),
        }


class WireBytes:
    """Request and response body bytes of a REST client's traffic, measured by
    httpx event hooks on the client qdrant-client builds (its private
    openapi_client; a benchmark may reach in where a product must not)."""

    def __init__(self, client) -> None:
        self.reset()
        http = client._client.openapi_client.client._async_client  # noqa: SLF001
        http.event_hooks = {"request": [self._request], "response": [self._response]}

    def reset(self) -> None:
        self.sent = self.received = self.requests = 0

    async def _request(self, request) -> None:
        self.requests += 1
        self.sent += len(request.content or b"")

    async def _response(self, response) -> None:
        self.received += int(response.headers.get("content-length") or 0)

    def per_event(self, events: int) -> dict[str, float]:
        n = max(events, 1)
        return {"sent": round(self.sent / n, 1), "received": round(self.received / n, 1),
                "requests": round(self.requests / n, 4)}
