"""What can go wrong, and which of it is worth retrying.

Exit codes follow sysexits(3) so supervisors can tell a bad configuration
(do not restart) from an unreachable service (restart later).
"""
from __future__ import annotations

import httpx
import psycopg
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: a service stayed unreachable through startup
EXIT_CONFIG = 78  # EX_CONFIG: the configuration cannot work; restarting will not help


class OutboxdError(Exception):
    """An error with a message meant for the operator."""

    exit_code = EXIT_FAILURE


class ConfigError(OutboxdError):
    exit_code = EXIT_CONFIG


class ModelMismatchError(ConfigError):
    """The collection holds vectors of another model (invariant 8)."""


class SchemaNotReadyError(ConfigError):
    """The database is not migrated to the schema this version needs."""


class CollectionRetiredError(ConfigError):
    """A reindex made another collection live; this process's model is no longer wanted."""


class ServiceUnavailableError(OutboxdError):
    exit_code = EXIT_UNAVAILABLE


class InvalidChunkError(OutboxdError):
    """One chunk cannot be projected to a point; retrying it unchanged will not help."""


def is_transient(exc: BaseException) -> bool:
    """True for failures of the infrastructure (network, restarts, overload) rather
    than of the event: those are retried without counting against the event."""
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError, httpx.TransportError)):
        return True
    if isinstance(exc, ResponseHandlingException):
        return True  # qdrant-client wraps transport errors in this
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code is None or exc.status_code >= 500 or exc.status_code == 429
    if _is_transient_kafka(exc):
        return True
    try:
        import grpc  # qdrant-client's gRPC transport, when prefer_grpc is used

        if isinstance(exc, grpc.RpcError) and exc.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ):
            return True
    except ImportError:  # pragma: no cover
        pass
    return False


def _is_transient_kafka(exc: BaseException) -> bool:
    try:
        from aiokafka import errors as kafka
    except ImportError:  # the kafka extra is not installed: nothing of it can fail
        return False
    if not isinstance(exc, kafka.KafkaError):
        return False
    # the broker's own verdict, plus the client-side timeouts and outages it leaves unflagged
    return bool(getattr(exc, "retriable", False)) or isinstance(
        exc, (kafka.KafkaTimeoutError, kafka.KafkaUnavailableError, kafka.BrokerNotAvailableError)
    )


def describe(exc: BaseException) -> str:
    """One line for logs and dead letters: type and message, never a traceback."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:2000] if text else type(exc).__name__
