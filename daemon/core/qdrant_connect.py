"""Reaching Qdrant: a server (QDRANT_URL, REST or gRPC) or qdrant-client's
local mode (a folder, or ':memory:'), and the readiness checks of a process
that embeds and writes."""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from qdrant_client import AsyncQdrantClient

from daemon.config import Settings
from daemon.errors import ConfigError, ServiceUnavailableError

LOCKED = "is already accessed by another instance of Qdrant client"


def make_client(settings: Settings) -> AsyncQdrantClient:
    """A client for the configured Qdrant. Local mode admits one process per
    folder: a second one is a configuration that cannot work (exit 78), not a bug."""
    if settings.qdrant_url:
        key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        return AsyncQdrantClient(
            url=settings.qdrant_url,
            api_key=key,
            timeout=int(settings.qdrant_timeout),
            prefer_grpc=settings.qdrant_prefer_grpc,
            grpc_port=settings.qdrant_grpc_port,
        )
    path = settings.local_qdrant_path
    if path == ":memory:":
        return AsyncQdrantClient(location=":memory:")
    try:
        return AsyncQdrantClient(path=path)
    except RuntimeError as exc:
        if LOCKED not in str(exc):
            raise
        raise ConfigError(
            f"the Qdrant local-mode folder {path} is already open in another process: local mode admits one "
            "process at a time. Several daemons or consumers (or a command beside a running daemon) need a "
            "Qdrant server: set QDRANT_URL. Otherwise stop the other process, or give this one its own "
            "OUTBOXD_QDRANT_PATH."
        ) from None


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
