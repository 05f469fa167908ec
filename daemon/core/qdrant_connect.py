"""Reaching Qdrant: a server (QDRANT_URL, REST or gRPC) or qdrant-client's
local mode (a folder, or ':memory:') behind a thread of its own, and the
readiness checks of a process that embeds and writes."""
from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from qdrant_client import AsyncQdrantClient, QdrantClient

from daemon.config import Settings
from daemon.errors import ConfigError, ServiceUnavailableError

LOCKED = "is already accessed by another instance of Qdrant client"
KEEPALIVE_S = 3.0


def make_client(settings: Settings) -> "AsyncQdrantClient | LocalQdrant":
    """A client for the configured Qdrant: a server's AsyncQdrantClient, or local
    mode on a thread of its own (LocalQdrant). Local mode admits one process per
    folder: a second one is a configuration that cannot work (exit 78), not a bug."""
    if settings.qdrant_url:
        key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        return AsyncQdrantClient(
            url=settings.qdrant_url,
            api_key=key,
            timeout=int(settings.qdrant_timeout),
            prefer_grpc=settings.qdrant_prefer_grpc,
            grpc_port=settings.qdrant_grpc_port,
            # qdrant-client turns keep-alive off for a server on localhost (a sidecar), so each
            # request would open a connection; idle ones are dropped before the server's own
            # 5 s keep-alive can close them under a request
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_S),
            # uncompressed answers: gzip cost the server more CPU than the point reads it
            # answers (a batch's read is tens of kB); REST only, gRPC is binary anyway
            metadata={"Accept-Encoding": "identity"},
            # its version check is a blocking request in the constructor, and warns when a
            # refused key makes it fail; `outboxd status` reports the server's version instead
            check_compatibility=False,
            **_tls(settings),
        )
    path = settings.local_qdrant_path
    if path == ":memory:":
        return LocalQdrant(QdrantClient(location=":memory:"))
    try:
        return LocalQdrant(QdrantClient(path=path))
    except RuntimeError as exc:
        if LOCKED not in str(exc):
            raise
        raise ConfigError(
            f"the Qdrant local-mode folder {path} is already open in another process: local mode admits one "
            "process at a time. Several daemons or consumers (or a command beside a running daemon) need a "
            "Qdrant server: set QDRANT_URL. Otherwise stop the other process, or give this one its own "
            "OUTBOXD_QDRANT_PATH."
        ) from None


class LocalQdrant:
    """qdrant-client's local mode (a folder, or ':memory:'), whose every call computes
    in the caller's thread (a search scans every point): each call runs on one thread
    of its own, one at a time and in order, so the event loop keeps serving leases,
    NOTIFY wake-ups, health checks and embedding requests meanwhile. It answers the
    methods of AsyncQdrantClient, awaitable."""

    def __init__(self, client: QdrantClient) -> None:
        self._client = client
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outboxd-qdrant-local")

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(self._thread, partial(attr, *args, **kwargs))

        return call

    async def close(self, **kwargs: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, partial(self._client.close, **kwargs))
        self._thread.shutdown(wait=False)


def _tls(settings: Settings) -> dict[str, Any]:
    """The CA that verifies an https server, for REST (an SSL context) and gRPC
    (root certificates): OUTBOXD_QDRANT_CA_FILE, else SSL_CERT_FILE, else the system's."""
    ca = settings.qdrant_ca_file or os.environ.get("SSL_CERT_FILE")
    if not ca or not str(settings.qdrant_url).lower().startswith("https"):
        return {}
    name = "OUTBOXD_QDRANT_CA_FILE" if settings.qdrant_ca_file else "SSL_CERT_FILE"
    try:
        pem = Path(ca).read_bytes()
        context = ssl.create_default_context(cadata=pem.decode("ascii"))
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{name}={ca} cannot be used as the CA bundle for Qdrant: {exc}; point it at a readable PEM file "
            "of CA certificates"
        ) from None
    return {"verify": context, "grpc_options": {"root_certificates": pem}}
def describe_target(settings: Settings) -> str:
    if settings.qdrant_url:
        return f"{settings.qdrant_url}{' (gRPC)' if settings.qdrant_prefer_grpc else ''}"
    return f"local mode at {settings.local_qdrant_path}"


def embedding_checks(client: AsyncQdrantClient, embedder) -> dict[str, Callable[[], Awaitable[None]]]:
    """/readyz checks of a process that embeds and writes: Qdrant answers, the model is loaded."""

    async def qdrant() -> None:
        await client.get_collections()

    async def model() -> None:
        if embedder.fingerprint is None:
            raise ServiceUnavailableError("the embedding model is not loaded yet")

    return {"qdrant": qdrant, "model": model}
