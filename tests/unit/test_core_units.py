"""Small pure pieces of the core: the payload projection, error classification,
the wake-up signal and JSON logs."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import ssl
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from daemon.core.chunk_state import PAYLOAD_TEXT_CHARS, ChunkState, Projection, metadata_hash
from daemon.errors import ConfigError, InvalidChunkError, describe, is_transient, refusal
from daemon.logs import JsonFormatter
from daemon.outbox.listener import Wakeup
from daemon.runtime.retry import wait_for_any

PAYLOAD_KEYS = {"text", "text_cut", "document_id", "source_id", "chunk_index", "title", "url", "document_type",
                "metadata", "outboxd"}
M = Projection("minilm-384-norm")


def state(**overrides) -> ChunkState:
    values = dict(
        chunk_id=uuid.uuid4(),
        document_id=uuid.uuid4(),
        source_id=uuid.uuid4(),
        chunk_index=3,
        text="Some chunk text.",
        token_count=3,
        content_hash="abc123",
        metadata={"lang": "en"},
        title="A title",
        url="https://example.org/a",
        document_type="html",
        state_hash="f" * 32,
    )
    values.update(overrides)
    return ChunkState(**values)


def unexpected(status: int | None) -> UnexpectedResponse:
    return UnexpectedResponse(status, "reason", b'{"status": "error"}', httpx.Headers())


# --- ChunkState ------------------------------------------------------------------------
def test_payload_is_the_documented_projection():
    """payload holds exactly the documented fields, ids as strings, outboxd's own keys in one group."""
    s = state()
    p = s.payload(M)
    assert set(p) == PAYLOAD_KEYS
    assert p == {
        "text": "Some chunk text.",
        "text_cut": False,
        "document_id": str(s.document_id),
        "source_id": str(s.source_id),
        "chunk_index": 3,
        "title": "A title",
        "url": "https://example.org/a",
        "document_type": "html",
        "metadata": {"lang": "en"},
        "outboxd": {
            "content_hash": "abc123",
            "text_chars": 1000,
            "metadata_hash": metadata_hash({"lang": "en"}),
            "embedding_model": "minilm-384-norm",
            "token_count": 3,
            "sparse": None,
        },
    }
    assert s.payload(Projection("m", sparse="bm25-1"))["outboxd"]["sparse"] == "bm25-1"


def test_the_langchain_profile_puts_provenance_in_the_metadata():
    """LangChain returns payload["metadata"] as a Document's metadata: the profile puts
    the provenance there too (winning over a chunk metadata key of the same name)."""
    s = state(metadata={"lang": "en", "title": "the chunk's own"})
    p = s.payload(Projection("m", profile="langchain"))
    assert p["metadata"] == {"lang": "en", "title": "A title", "url": "https://example.org/a",
                             "document_id": str(s.document_id), "source_id": str(s.source_id), "chunk_index": 3,
                             "document_type": "html", "text_cut": False}
    assert p["outboxd"]["metadata_hash"] == metadata_hash(p["metadata"])  # a title change is a metadata change
    assert state(metadata={"lang": "en"}).payload(M)["metadata"] == {"lang": "en"}


def test_metadata_hash_follows_the_metadata_and_nothing_else():
    """Equal metadata (key order aside), equal hash; any change, another hash: what
    lets a payload-only change be judged without reading the point's metadata."""
    def h(**kw):
        return state(**kw).payload(M)["outboxd"]["metadata_hash"]
    base = h()
    assert h(metadata={"lang": "en"}) == base
    assert h(title="Another", chunk_index=9) == base
    assert h(metadata={"lang": "fr"}) != base
    assert h(metadata={"b": 1, "a": 2}) == h(metadata={"a": 2, "b": 1})


def test_payload_text_is_cut_at_text_chars_and_says_so():
    """Long text is stored in the payload only up to its first text_chars characters
    (1000 unless set), and text_cut tells a reader; 0 keeps the whole text."""
    text = "é" * 999 + "xyz" + "tail" * 500
    p = state(text=text).payload(M)
    assert PAYLOAD_TEXT_CHARS == 1000
    assert p["text"] == text[:1000] and len(p["text"]) == 1000 and p["text_cut"] is True
    short = state(text="short").payload(M)
    assert (short["text"], short["text_cut"]) == ("short", False)
    assert state(text="x" * 1000).payload(M)["text_cut"] is False
    whole = state(text=text).payload(Projection("m", text_chars=0))
    assert (whole["text"], whole["text_cut"], whole["outboxd"]["text_chars"]) == (text, False, 0)
    assert state(text=text).payload(Projection("m", text_chars=10))["text"] == text[:10]


def test_payload_metadata_none_becomes_empty_object():
    """A chunk without metadata gets {} so readers can always filter on metadata.<key>."""
    assert state(metadata=None).payload(M)["metadata"] == {}


@pytest.mark.parametrize("metadata", [[1, 2], "a string", 42, True])
def test_payload_rejects_non_object_metadata_with_advice(metadata):
    """Non-object metadata is an InvalidChunkError that names the chunk and says how to fix it."""
    s = state(metadata=metadata)
    with pytest.raises(InvalidChunkError) as exc:
        s.payload(M)
    message = str(exc.value)
    assert str(s.chunk_id) in message
    assert "object" in message
    assert "dead-letters retry" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", False), (" ", False), ("  \n\t ", False), ("x", True), ("  real text  ", True)],
)
def test_has_text(text, expected):
    """Empty and whitespace-only text has nothing to embed; any other text does."""
    assert state(text=text).has_text is expected


# --- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("server closed the connection unexpectedly"),
        psycopg.InterfaceError("connection is closed"),
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ReadTimeout("timed out"),
        ConnectionResetError(),
        TimeoutError(),
        unexpected(503),
        unexpected(500),
        unexpected(429),
    ],
    ids=lambda e: f"{type(e).__name__}-{getattr(e, 'status_code', '')}",
)
def test_infrastructure_failures_are_transient(exc):
    """Network, restart and overload failures are retried without counting against the event."""
    assert is_transient(exc) is True


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad value"),
        InvalidChunkError("metadata is a list"),
        unexpected(400),
        unexpected(404),
        psycopg.errors.UniqueViolation("duplicate key"),
        KeyError("x"),
    ],
    ids=lambda e: f"{type(e).__name__}-{getattr(e, 'status_code', '')}",
)
def test_event_failures_are_not_transient(exc):
    """Failures caused by the data or a bad request count against the event (and may dead-letter it)."""
    assert is_transient(exc) is False


def _cert_failure() -> ResponseHandlingException:
    """What qdrant-client raises for an https server whose certificate does not verify."""
    verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    verify.verify_message = "unable to get local issuer certificate"
    try:
        try:
            raise verify
        except ssl.SSLError as inner:
            raise httpx.ConnectError(str(inner)) from inner
    except httpx.ConnectError as outer:
        return ResponseHandlingException(outer)


@pytest.mark.parametrize(
    "exc, says",
    [
        (UnexpectedResponse(401, "Unauthorized", b"Invalid API key or JWT", httpx.Headers()), "QDRANT_API_KEY"),
        (UnexpectedResponse(403, "Forbidden", b'{"status":{"error":"Forbidden"}}', httpx.Headers()), "read-only key"),
        (_cert_failure(), "OUTBOXD_QDRANT__CA_FILE"),
    ],
    ids=["401", "403", "certificate"],
)
def test_refusals_are_configuration_errors_and_never_transient(exc, says):
    """A key the server refuses or a certificate that does not verify heals by no waiting: exit 78, by name."""
    refused = refusal(exc)
    assert isinstance(refused, ConfigError) and refused.exit_code == 78 and says in str(refused)
    assert is_transient(exc) is False


def test_an_outage_is_no_refusal():
    assert refusal(unexpected(503)) is None and refusal(httpx.ConnectError("refused")) is None
    assert refusal(ResponseHandlingException(httpx.ConnectError("[Errno 111] Connection refused"))) is None


async def test_a_key_refused_mid_run_stops_the_batch_instead_of_failing_its_chunks():
    """A revoked key fails every chunk alike: the batch policy raises it as the ConfigError
    that stops the process, instead of splitting the batch and dead-lettering each chunk."""
    from daemon.core.batch import Outcome
    from daemon.runtime.batch_policy import BatchPolicy, Stats
    from daemon.runtime.health import Heartbeat
    from daemon.telemetry import setup_telemetry

    calls = []

    async def sink(targets):
        calls.append(len(targets))
        raise UnexpectedResponse(401, "Unauthorized", b"Invalid API key or JWT", httpx.Headers())

    policy = BatchPolicy(asyncio.Event(), setup_telemetry("outboxd").metrics, Stats(), Heartbeat())
    with pytest.raises(ConfigError, match="QDRANT_API_KEY"):
        await policy.deliver(sink, {uuid.uuid4(): None, uuid.uuid4(): None}, Outcome)
    assert calls == [2], "the batch was split chunk by chunk"


def test_describe_is_one_line_with_type_and_message():
    """describe gives 'Type: first line' for logs and dead letters, never a traceback."""
    assert describe(ValueError("bad value\nsecond line\nthird")) == "ValueError: bad value"
    assert describe(ValueError()) == "ValueError"
    assert describe(ValueError("   ")) == "ValueError"
    line = describe(unexpected(503))
    assert "\n" not in line
    assert line.startswith("UnexpectedResponse: ") and "503" in line
    assert len(describe(RuntimeError("x" * 10_000))) <= 2000


# --- the wake-up, as a claim loop waits for it (Wakeup ticket + wait_for_any) ------------
async def test_a_wakeup_between_ticket_and_wait_is_not_missed():
    """A fire() after the loop took its ticket, before it waits, still wakes it at once."""
    wakeup, stop = Wakeup(), asyncio.Event()
    ticket = wakeup.ticket()
    wakeup.fire()
    assert await asyncio.wait_for(wait_for_any([ticket, stop], timeout=30), 5) is True


async def test_the_poll_interval_passes_when_nothing_fires():
    wakeup, stop = Wakeup(), asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await wait_for_any([wakeup.ticket(), stop], timeout=0.1) is False
    assert loop.time() - started >= 0.09


async def test_a_fire_before_the_ticket_does_not_wake_a_later_ticket():
    wakeup = Wakeup()
    wakeup.fire()
    assert await wait_for_any([wakeup.ticket()], timeout=0.05) is False


async def test_one_fire_wakes_every_waiting_loop_and_the_stop_wakes_them_too():
    """fire() is a broadcast: every worker waiting on a ticket wakes; so does the stop event."""
    wakeup, stop = Wakeup(), asyncio.Event()
    waiters = [asyncio.create_task(wait_for_any([wakeup.ticket(), stop], timeout=30)) for _ in range(3)]
    await asyncio.sleep(0)  # let them start waiting
    wakeup.fire()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == [True, True, True]
    stopping = asyncio.create_task(wait_for_any([wakeup.ticket(), stop], timeout=30))
    await asyncio.sleep(0)
    stop.set()
    assert await asyncio.wait_for(stopping, 5) is True


# --- logs ------------------------------------------------------------------------------------
def test_json_formatter_writes_one_object_per_line_with_extras():
    """Each record is one JSON line; extra= fields are top-level keys; tracebacks stay inside the line."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"outboxd.test.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    chunk = uuid.uuid4()

    logger.info("batch applied", extra={"events": 3, "chunk_id": chunk, "path": Path("/tmp/x")})
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logger.exception("apply failed", extra={"attempt": 2})

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "batch applied"
    assert first["level"] == "info"
    assert first["logger"] == logger.name
    assert first["ts"]
    assert (first["events"], first["chunk_id"], first["path"]) == (3, str(chunk), "/tmp/x")
    assert "exc" not in first
    assert (second["msg"], second["level"], second["attempt"]) == ("apply failed", "error", 2)
    assert "RuntimeError: boom" in second["exc"]
    assert not {"args", "exc_info", "levelno", "taskName"} & set(first)


def test_local_mode_is_told_apart_behind_every_wrapper():
    """No sparse vector can be made in local mode (the server computes BM25): is_local
    must see it behind the daemon's own thread wrapper as well as behind a bare client."""
    from qdrant_client import AsyncQdrantClient, QdrantClient

    from daemon.core.qdrant_connect import LocalQdrant
    from daemon.core.qdrant_store import is_local

    assert is_local(LocalQdrant(QdrantClient(location=":memory:")))
    assert is_local(AsyncQdrantClient(location=":memory:"))
    assert not is_local(AsyncQdrantClient(url="http://127.0.0.1:1", check_compatibility=False))
