"""What can go wrong, and which of it is worth retrying.

Exit codes, one contract for every command (README: "Exit codes"):

  0   done; a check found nothing wrong
  1   a bug: an unexpected error, logged with its traceback (restart me)
  2   usage: an unknown command or option, a bad option value
  3   a check found a problem: `reconcile --check` found drift, `status --max-*` passed a limit
  69  a service (PostgreSQL, Qdrant, Kafka, the embedding endpoint) stayed unreachable (EX_UNAVAILABLE)
  78  the configuration cannot work; restarting will not help (EX_CONFIG)
  130 interrupted (SIGINT before the command could stop cleanly)

They follow sysexits(3) where it has a code, so supervisors can tell a bad
configuration (do not restart) from an unreachable service (restart later).
"""
from __future__ import annotations

import httpx
import psycopg
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CHECK_FAILED = 3  # no failure shares it: a probe tells drift from an outage from a crash
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


class DependencyDown(OutboxdError):
    """A dependency failed in a way worth retrying (an outage, a rate limit);
    `dependency` names it for the logs and the metrics."""

    exit_code = EXIT_UNAVAILABLE

    def __init__(self, message: str, dependency: str) -> None:
        super().__init__(message)
        self.dependency = dependency


class InvalidChunkError(OutboxdError):
    """One chunk cannot be projected to a point; retrying it unchanged will not help."""


def is_transient(exc: BaseException) -> bool:
    """True for failures of the infrastructure (network, restarts, overload) rather
    than of the event: those are retried without counting against the event."""
    if isinstance(exc, DependencyDown):
        return True
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


def dependency_of(exc: BaseException) -> str:
    """Which service an error came from, for logs and the per-dependency metrics:
    postgresql, qdrant, kafka, embedding (the http backend), or other."""
    if isinstance(exc, DependencyDown):
        return exc.dependency
    if isinstance(exc, psycopg.Error):  # PoolTimeout too
        return "postgresql"
    if isinstance(exc, (ResponseHandlingException, UnexpectedResponse, httpx.HTTPError)):
        return "qdrant"  # qdrant-client's REST transport; the http embedding backend raises DependencyDown
    module = type(exc).__module__
    if module.startswith("aiokafka") or module.startswith("kafka"):
        return "kafka"
    if module.startswith("grpc"):
        return "qdrant"  # qdrant-client's gRPC transport
    return "other"


def describe(exc: BaseException) -> str:
    """One line for logs and dead letters: type and message, never a traceback."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:2000] if text else type(exc).__name__
