"""Reaching Qdrant: a server (QDRANT_URL, REST or gRPC) or qdrant-client's
local mode (a folder, or ':memory:') behind a thread of its own, and the
readiness checks of a process that embeds and writes."""
from __future__ import annotations

import asyncio
import difflib
import logging
import os
import ssl
import warnings
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from qdrant_client import AsyncQdrantClient, QdrantClient
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from daemon.config import Settings
from daemon.errors import ConfigError, ServiceUnavailableError, describe, refusal

log = logging.getLogger(__name__)

LOCKED = "is already accessed by another instance of Qdrant client"
INSECURE_KEY = "Api key is used with an insecure connection"  # qdrant-client's UserWarning
KEEPALIVE_S = 3.0


def check_named(settings: Settings) -> None:
    """Where the vectors go is never a default in production: with a database (or
    a Kafka cluster) configured, Qdrant must be named too, as a server URL or a
    local-mode folder on purpose; else ConfigError (78). Only the embedded
    defaults fall back to local mode under the data directory."""
    configured = settings.services_configured()
    if settings.qdrant.url or settings.qdrant.path is not None or not configured:
        return
    near = difflib.get_close_matches("QDRANT_URL", [v for v in os.environ if "QDRANT" in v.upper()], n=1, cutoff=0.8)
    typo = f" ({near[0]} is set: a typo of QDRANT_URL?)" if near else ""
    raise ConfigError(
        f"{' and '.join(configured)} {'is' if len(configured) == 1 else 'are'} set, but no Qdrant is{typo}: set "
        "QDRANT_URL to your Qdrant server, or OUTBOXD_QDRANT__PATH to a local-mode folder on purpose. Against "
        "configured services outboxd never falls back to a local-mode folder, where no reader would find the vectors."
    )


def make_client(settings: Settings) -> "AsyncQdrantClient | LocalQdrant":
    """A client for the configured Qdrant (check_named): a server's AsyncQdrantClient,
    or local mode on a thread of its own (LocalQdrant). Local mode admits one process
    per folder: a second one is a configuration that cannot work (exit 78), not a bug."""
    check_named(settings)
    if settings.qdrant.url:
        key = settings.qdrant.api_key.get_secret_value() if settings.qdrant.api_key else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            client = AsyncQdrantClient(
                url=settings.qdrant.url,
                api_key=key,
                timeout=int(settings.qdrant.timeout),
                prefer_grpc=settings.qdrant.prefer_grpc,
                grpc_port=settings.qdrant.grpc_port,
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
        _pass_on(caught)
        return client
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
            "OUTBOXD_QDRANT__PATH."
        ) from None


def _pass_on(caught: list[warnings.WarningMessage]) -> None:
    """The warnings qdrant-client gave while building a client: its raw one about an
    API key over http becomes one log line of ours; the others go on as they were."""
    for w in caught:
        if INSECURE_KEY in str(w.message):
            _insecure_key()
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


@cache  # once per process, however many clients it builds
def _insecure_key() -> None:
    log.warning("the Qdrant API key travels unencrypted: QDRANT_URL is http://, so anyone on the network "
                "path can read the key; use an https:// URL")


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
    (root certificates): OUTBOXD_QDRANT__CA_FILE, else SSL_CERT_FILE, else the system's."""
    ca = settings.qdrant.ca_file or os.environ.get("SSL_CERT_FILE")
    if not ca or not str(settings.qdrant.url).lower().startswith("https"):
        return {}
    name = "OUTBOXD_QDRANT__CA_FILE" if settings.qdrant.ca_file else "SSL_CERT_FILE"
    try:
        pem = Path(ca).read_bytes()
        context = ssl.create_default_context(cadata=pem.decode("ascii"))
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{name}={ca} cannot be used as the CA bundle for Qdrant: {exc}; point it at a readable PEM file "
            "of CA certificates"
        ) from None
    return {"verify": context, "grpc_options": {"root_certificates": pem}}


async def probe(client: "AsyncQdrantClient | LocalQdrant", settings: Settings) -> Any:
    """Ask a server who it is, then list its collections (which a refused key
    cannot): a URL that answers, but not as Qdrant does (another web server, a
    wrong port or path), is a configuration error now (78), where waiting for it
    would only end in 69. An outage raises as itself, to be waited for. The
    server's version info (None in local mode)."""
    if isinstance(client, LocalQdrant):
        return None
    try:
        info = await client.info()
    except Exception as exc:
        if refusal(exc) is not None or not answered_otherwise(exc):
            raise
        raise _not_qdrant(settings, describe(exc)) from None
    if "qdrant" not in (getattr(info, "title", "") or "").lower():
        raise _not_qdrant(settings, f"it calls itself {getattr(info, 'title', None)!r}")
    await client.get_collections()
    return info


def answered_otherwise(exc: BaseException) -> bool:
    """A server answered, but not as Qdrant does: a page where JSON was due, a
    404 or 405 for Qdrant's own paths, a gRPC service without Qdrant's methods.
    An outage (no answer, a 5xx or 429 from a proxy in front of a restarting
    Qdrant) is not this."""
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code is not None and 400 <= exc.status_code < 500 and exc.status_code not in (408, 429)
    if isinstance(exc, ResponseHandlingException):  # qdrant-client's wrapper: an outage is a transport error inside
        return not isinstance(exc.source, (httpx.TransportError, OSError))
    if isinstance(exc, (ValueError, TypeError)):  # JSON that does not decode, or not into Qdrant's answer
        return True
    code = getattr(exc, "code", None)
    return callable(code) and getattr(code(), "name", "") in ("UNIMPLEMENTED", "NOT_FOUND")


def _not_qdrant(settings: Settings, why: str) -> ConfigError:
    where = settings.qdrant.url + (f" (gRPC port {settings.qdrant.grpc_port})" if settings.qdrant.prefer_grpc else "")
    return ConfigError(
        f"QDRANT_URL={where} answers, but not as a Qdrant server does ({why[:200]}); check its scheme, host, "
        "port (REST 6333, gRPC OUTBOXD_QDRANT__GRPC_PORT 6334) and path. This does not heal by waiting."
    )


def location(settings: Settings) -> str:
    """Where the vectors live, as the catalog remembers it: the server's URL
    without credentials, or the local-mode folder's absolute path."""
    if settings.qdrant.url:
        parts = urlsplit(settings.qdrant.url)
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    path = settings.local_qdrant_path
    return path if path == ":memory:" else str(Path(path).resolve())


def describe_target(settings: Settings) -> str:
    if settings.qdrant.url:
        return f"{settings.qdrant.url}{' (gRPC)' if settings.qdrant.prefer_grpc else ''}"
    return f"local mode at {settings.local_qdrant_path}"


def embedding_checks(client: AsyncQdrantClient, embedder) -> dict[str, Callable[[], Awaitable[None]]]:
    """/readyz checks of a process that embeds and writes: Qdrant answers, the model is loaded."""

    async def qdrant() -> None:
        await client.get_collections()

    async def model() -> None:
        if embedder.fingerprint is None:
            raise ServiceUnavailableError("the embedding model is not loaded yet")

    return {"qdrant": qdrant, "model": model}
