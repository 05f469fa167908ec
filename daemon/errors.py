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

The CLI imports this module before it validates the settings, so it imports
the clients whose errors it classifies (psycopg, httpx, qdrant-client: about a
second) only where it classifies one: a bad setting is reported at once.
"""
from __future__ import annotations

import enum
import re

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CHECK_FAILED = 3  # no failure shares it: a probe tells drift from an outage from a crash
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: a service stayed unreachable through startup
EXIT_CONFIG = 78  # EX_CONFIG: the configuration cannot work; restarting will not help
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C ended


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


class CollectionElsewhereError(ConfigError):
    """The Qdrant this process is configured for is not where the live collection
    was built (invariant 9): writing there would send vectors where no reader looks."""


class ServiceUnavailableError(OutboxdError):
    exit_code = EXIT_UNAVAILABLE


class DependencyDown(OutboxdError):
    """A dependency failed in a way worth retrying (an outage, a rate limit);
    `dependency` names it for the logs and the metrics."""

    exit_code = EXIT_UNAVAILABLE

    def __init__(self, message: str, dependency: str) -> None:
        super().__init__(message)
        self.dependency = dependency


class InvalidSettings(ConfigError):
    """A setting's value cannot work; the message names where it was set."""


class InvalidChunkError(OutboxdError):
    """One chunk cannot be projected to a point; retrying it unchanged will not help."""


def _grpc_status(exc: BaseException):
    """The gRPC status code of a gRPC error (qdrant-client's gRPC transport), else None."""
    try:
        import grpc
    except ImportError:  # pragma: no cover
        return None
    return exc.code() if isinstance(exc, grpc.RpcError) else None


def _chain(exc: BaseException):
    """The exception and what caused it (qdrant-client keeps the transport's error as `source`)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        source = getattr(exc, "source", None)
        exc = exc.__cause__ or exc.__context__ or (source if isinstance(source, BaseException) else None)


QDRANT_KEY_FIX = "Set QDRANT_API_KEY (or QDRANT_API_KEY_FILE) to an API key of this Qdrant server."
QDRANT_WRITE_FIX = (
    "The API key may read but not write here (a read-only key, or a JWT without write access to this "
    "collection): `outboxd run`, `consume`, `reindex` and `reconcile --repair` need a read-write key "
    "(QDRANT_API_KEY); a read-only key serves `outboxd search`, `status` and `reconcile --check`."
)
DATABASE_FIX = (
    "Check DATABASE_URL (or DATABASE_URL_FILE): this does not heal by waiting, so outboxd does not retry it."
)
# libpq's words for a connection PostgreSQL refuses for good: the database or role named
# does not exist, the credentials or TLS settings are wrong, an option's value is invalid.
# libpq gives a failed connection no SQLSTATE, so its message is all there is to read.
POSTGRES_REFUSALS = re.compile(
    r'database "[^"]*" does not exist|role "[^"]*" does not exist|password authentication failed'
    r"|no pg_hba\.conf entry|no password supplied|server does not support SSL|certificate verify failed"
    r"|root certificate file|invalid \w+ value|bad value for|invalid (URI query parameter|connection option)"
    r"|authentication method \d+ not supported|SCRAM authentication requires",
)
QDRANT_CA_FIX = (
    "Set OUTBOXD_QDRANT__CA_FILE (or SSL_CERT_FILE) to the CA bundle (PEM) that signed the server's "
    "certificate, or use the URL its certificate names."
)


def refusal(exc: BaseException) -> ConfigError | None:
    """A failure that no waiting heals, as the configuration error it is (exit
    78): Qdrant refusing the API key (401) or the request (403), a server
    certificate that does not verify, PostgreSQL refusing the connection for
    good (no such database or role, bad credentials, an invalid option). None
    for anything else."""
    import ssl

    import psycopg

    # a connection's failure carries no SQLSTATE; a statement's error (a bug, a
    # missing table) always does, and is not this
    if isinstance(exc, (psycopg.OperationalError, psycopg.ProgrammingError)) and exc.sqlstate is None:
        said = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if POSTGRES_REFUSALS.search(str(exc)):
            return ConfigError(f"PostgreSQL refused the connection ({said}). {DATABASE_FIX}")
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    status = _grpc_status(exc)
    if status is not None:
        import grpc

        details = exc.details() or status.name
        if status == grpc.StatusCode.UNAUTHENTICATED:
            return ConfigError(f"Qdrant refused the API key ({details}). {QDRANT_KEY_FIX}")
        if status == grpc.StatusCode.PERMISSION_DENIED:
            return ConfigError(f"Qdrant refused the request ({details}). {QDRANT_WRITE_FIX}")
        if status == grpc.StatusCode.UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in details:
            return ConfigError(f"the Qdrant server's TLS certificate does not verify ({details[-300:]}). {QDRANT_CA_FIX}")
        return None
    if isinstance(exc, UnexpectedResponse) and exc.status_code in (401, 403):
        said = exc.content.decode(errors="replace").strip()[:300] if exc.content else exc.reason_phrase
        if exc.status_code == 401:
            return ConfigError(f"Qdrant refused the API key (401 Unauthorized: {said}). {QDRANT_KEY_FIX}")
        return ConfigError(f"Qdrant refused the request (403 Forbidden: {said}). {QDRANT_WRITE_FIX}")
    if isinstance(exc, ResponseHandlingException):  # qdrant-client's REST transport failed
        for cause in _chain(exc):
            if isinstance(cause, ssl.SSLCertVerificationError):
                return ConfigError(f"the Qdrant server's TLS certificate does not verify ({cause.verify_message or cause}). "
                                   f"{QDRANT_CA_FIX}")
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures of the infrastructure (network, restarts, overload) rather
    than of the event: those are retried without counting against the event.
    A refusal (a key or a certificate the server will not accept) is not one."""
    import httpx
    import psycopg
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(exc, DependencyDown):
        return True
    if refusal(exc) is not None:
        return False
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
    status = _grpc_status(exc)  # qdrant-client's gRPC transport, when prefer_grpc is used
    if status is not None:
        return status.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
    return False


class Failure(enum.Enum):
    """What a failure is, which decides what every retrying place does with it."""

    TRANSIENT = "transient"  # an outage, an overload: wait and retry; it counts against nothing
    REFUSAL = "refusal"  # a server refuses the configuration for good: raise refusal(exc), exit 78
    CONFIG = "config"  # a ConfigError: this configuration cannot work, exit 78
    OTHER = "other"  # a bug, or the event's own fault: raise it, or count an attempt against the event


def classify(exc: BaseException) -> Failure:
    """The one answer to "transient, refusal, configuration error, or other?"
    (daemon.runtime.retry asks it for every loop that retries; the batch policy
    for every failed batch). A DependencyDown is an outage whatever caused it."""
    if isinstance(exc, DependencyDown):
        return Failure.TRANSIENT
    if isinstance(exc, ConfigError):
        return Failure.CONFIG
    if refusal(exc) is not None:
        return Failure.REFUSAL
    if is_transient(exc):
        return Failure.TRANSIENT
    return Failure.OTHER


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
    import httpx
    import psycopg
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

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
