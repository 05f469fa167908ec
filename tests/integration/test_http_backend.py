"""The http embedding backend against a real local OpenAI-compatible server
(tests.embedding_server): vectors, retries and their waits, the retry budget,
bounded concurrency, batching, rejected texts, the checks at load, and the API
key (sent, never logged, read from a *_FILE)."""
from __future__ import annotations

import asyncio
import logging
import socket
import time

import numpy as np
import pytest

from daemon.config import Settings
from daemon.core.qdrant_store import dense
from daemon.embedding.http_backend import EndpointUnavailableError, HttpBackend, endpoint_url, plan_batches
from daemon.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, ConfigError, InvalidChunkError, is_transient
from tests.embedding_server import REJECT_MARKER, EmbeddingServer, load_minilm
from tests.support import wait_until

pytestmark = [pytest.mark.timeout(120)]

KEY = "sk-test-9f8e7d6c5b4a-SECRET"


def make_settings(url: str, *, key: str | None = None, normalize: bool = True, **http) -> Settings:
    extra = {"api_key": key} if key is not None else {}
    return Settings(database_url=None,
                    embedding={"backend": "http", "url": url, "normalize": normalize, **http, **extra})


@pytest.fixture
def server():
    with EmbeddingServer() as s:
        yield s


@pytest.fixture
async def backends():
    """make(url_or_server, backend kwargs..., settings kwargs...) -> HttpBackend; all closed at the end."""
    made: list[HttpBackend] = []

    def make(target, *, retry_budget=5.0, backoff_initial=0.02, backoff_max=0.2, **settings) -> HttpBackend:
        url = target if isinstance(target, str) else target.url
        own = make_settings(url, **settings)
        b = HttpBackend(
            own.embedding,
            retry_budget=retry_budget, backoff_initial=backoff_initial, backoff_max=backoff_max,
        )
        made.append(b)
        return b

    yield make
    for b in made:
        await b.close()


async def loaded(backend: HttpBackend, server: EmbeddingServer | None = None) -> HttpBackend:
    await backend.load()
    if server is not None:
        server.reset_stats()  # the probe is not what the test counts
    return backend


def texts_of(n: int, prefix: str = "chunk") -> list[str]:
    return [f"{prefix} {i}: " + "word " * (i % 7) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- vectors ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


@pytest.mark.model
async def test_vectors_agree_with_the_local_model(minilm, backends):
    """The endpoint serving all-MiniLM-L6-v2 gives the local model's vectors (cosine >= 0.999)."""
    texts = [
        "PostgreSQL writes the outbox row in the same transaction as the chunk.",
        "Qdrant keeps one point per chunk, keyed by the chunk id.",
        "bees",
        "Die Bienen überwintern in einer Traube.",
        "a longer paragraph " * 60,  # past the model's window: cut the same way on both sides
    ] + texts_of(40)
    with EmbeddingServer(mode="minilm", model=minilm) as server:
        backend = backends(server, max_batch_texts=8)
        info = await backend.load()
        got = (await backend.encode(texts)).vectors
    assert info.dimension == 384 and info.variant == "remote:sentence-transformers/all-MiniLM-L6-v2"
    assert info.description.startswith("http http://127.0.0.1:") and info.max_seq_length is None
    want = minilm.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    assert got.dtype == np.float32 and got.shape == want.shape
    cosine = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.999, cosine
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


async def test_vectors_come_back_in_the_callers_order(server, backends):
    backend = await loaded(backends(server, max_batch_texts=3, max_concurrency=4), server)
    texts = texts_of(20)[::-1]
    result = await backend.encode(texts)
    assert result.truncated == [False] * 20
    for text, vector in zip(texts, result.vectors):
        assert np.allclose(vector, server.vector_for(text), atol=1e-6)
    assert sorted(server.stats.texts) == sorted(texts)
    assert server.stats.models == ["sentence-transformers/all-MiniLM-L6-v2"] * len(server.stats.batch_sizes)
    assert server.stats.dimensions == [None] * len(server.stats.batch_sizes)  # no "dimensions" unless set


async def test_normalised_here_when_asked_whatever_the_endpoint_does(backends):
    with EmbeddingServer(normalize=False) as server:
        texts = texts_of(5)
        raw = np.stack([server.vector_for(t) for t in texts])
        assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
        unit = await (await loaded(backends(server))).encode(texts)
        kept = await (await loaded(backends(server, normalize=False))).encode(texts)
    assert np.allclose(np.linalg.norm(unit.vectors, axis=1), 1.0, atol=1e-6)
    assert np.allclose(kept.vectors, raw)


def test_a_backend_moves_between_event_loops(server):
    """load() in one asyncio.run, encode() in another (a session-wide embedder, the benchmarks)."""
    settings = make_settings(server.url)
    backend = HttpBackend(settings.embedding)
    asyncio.run(backend.load())
    assert asyncio.run(backend.encode(["one", "two"])).vectors.shape == (2, 384)
    asyncio.run(backend.close())


# --- retries ------------------------------------------------------------------------------------


async def test_429_is_retried_after_retry_after(server, backends, caplog):
    backend = await loaded(backends(server), server)
    server.fail_next(1, 429, retry_after=0.5)
    caplog.set_level(logging.WARNING, logger="daemon.embedding.http_backend")
    started = time.monotonic()
    result = await backend.encode(["a", "b", "c"])
    assert time.monotonic() - started >= 0.5
    assert result.vectors.shape == (3, 384)
    assert server.stats.requests == 2
    first, second = server.stats.arrivals
    assert second - first >= 0.5
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.status == 429 and 0.5 <= warning.retry_in <= 1.6
    assert "429" in warning.getMessage() and "retrying in" in warning.getMessage()


async def test_retry_after_holds_back_the_other_requests(server, backends):
    """One 429 with Retry-After: the backend's other requests wait for it too."""
    backend = await loaded(backends(server, max_concurrency=1, max_batch_texts=1), server)
    server.fail_next(1, 429, retry_after=0.4)
    await backend.encode(texts_of(4))
    arrivals = server.stats.arrivals
    assert len(arrivals) == 5
    assert all(t - arrivals[0] >= 0.4 for t in arrivals[1:])


async def test_a_budget_paces_the_requests(server, backends):
    """600 requests a minute (one turn a tenth of a second): twelve requests of one
    text arrive a tenth of a second apart, however many may be in flight."""
    backend = await loaded(backends(server, max_batch_texts=1, requests_per_minute=600), server)
    started = time.monotonic()
    await backend.encode([f"text {i}" for i in range(12)])
    arrivals = sorted(server.stats.arrivals)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert len(arrivals) == 12 and min(gaps) >= 0.1 - 0.03  # the client's sends jitter a little on a busy machine
    assert time.monotonic() - started >= 1.1 - 0.01
    assert backend.budget.scope == "process"


async def test_waiting_for_a_turn_is_not_failing_time(server, backends):
    """Two 503s in a row, each attempt waiting half a second for its turn (120 a
    minute): the retry budget of 0.2 s counts only the failing, so the third
    attempt goes, and succeeds."""
    backend = await loaded(backends(server, retry_budget=0.2, max_concurrency=1, requests_per_minute=120), server)
    server.fail_next(2, 503)
    await backend.encode(["one text"])
    assert [status for _, status in server.stats.answers] == [503, 503, 200]


async def test_without_a_budget_nothing_waits(backends):
    """Requests overlap up to max_concurrency: an endpoint that takes 0.2 s per
    request sees several at once (a fast one could finish each before the next)."""
    with EmbeddingServer(base_seconds=0.2) as server:
        backend = await loaded(backends(server, max_batch_texts=1, max_concurrency=8), server)
        assert not backend.budget.rates
        await backend.encode([f"text {i}" for i in range(16)])
    assert server.stats.max_concurrent >= 2 and len(server.stats.arrivals) == 16


async def test_the_endpoints_rate_limit_refuses_above_it_and_a_budget_below_it_is_never_refused(backends):
    """The test endpoint's rate limit (5 a second): a burst of 12 requests without a
    budget meets 429s, retried after their Retry-After, none lost; with a budget of
    4 a second the same requests meet none."""
    with EmbeddingServer(rate_limit=5, rate_window=1.0) as server:
        unbudgeted = await loaded(backends(server, max_batch_texts=1, max_concurrency=12), server)
        await unbudgeted.encode([f"text {i}" for i in range(12)])
        assert server.stats.refused >= 5 and server.stats.answered == 12
        refusals = [status for _, status in server.stats.answers if status == 429]
        assert len(refusals) == server.stats.refused
        within = [t for t, status in server.stats.answers if status == 200]
        assert all(sum(1 for u in within if t <= u < t + 1.0) <= 5 for t in within)
        server.reset_stats()
        budgeted = await loaded(backends(server, max_batch_texts=1, max_concurrency=12, requests_per_minute=240))
        server.reset_stats()
        await budgeted.encode([f"other {i}" for i in range(12)])
        assert server.stats.refused == 0 and server.stats.answered == 12


async def test_a_429_pauses_a_reserved_turn_too(server, backends):
    """A request that reserved its turn before another's 429 came still waits for the pause."""
    backend = await loaded(backends(server, max_batch_texts=1, requests_per_minute=600), server)
    server.fail_next(1, 429, retry_after=0.6)
    await backend.encode(["a", "b", "c"])  # the first is refused; the others had reserved turns
    answers = server.stats.answers
    refused_at = next(t for t, status in answers if status == 429)
    later = [t for t, status in answers if status == 200]
    assert len(later) == 3 and min(later) >= refused_at + 0.6 - 0.01


async def test_503_is_retried_with_backoff(server, backends, caplog):
    backend = await loaded(backends(server, backoff_initial=0.05), server)
    server.fail_next(2, 503)
    caplog.set_level(logging.WARNING, logger="daemon.embedding.http_backend")
    result = await backend.encode(["x", "y"])
    assert np.allclose(result.vectors[1], server.vector_for("y"), atol=1e-6)
    assert server.stats.requests == 3
    assert [r.status for r in caplog.records if r.levelno == logging.WARNING] == [503, 503]
    assert backend.retries == 2


async def test_a_rate_limit_outlasting_the_budget_is_transient(server, backends):
    backend = await loaded(backends(server, retry_budget=0.6), server)
    server.fail_next(1000, 429, retry_after=0.1)
    started = time.monotonic()
    with pytest.raises(EndpointUnavailableError) as caught:
        await backend.encode(texts_of(3))
    assert time.monotonic() - started < 3
    assert is_transient(caught.value) and not isinstance(caught.value, InvalidChunkError)
    assert caught.value.exit_code == EXIT_UNAVAILABLE
    assert "429" in str(caught.value) and "0.6s" in str(caught.value)
    assert server.stats.requests >= 3
    server.clear_faults()
    assert (await backend.encode(texts_of(3))).vectors.shape == (3, 384)  # and it recovers


async def test_an_endpoint_going_away_mid_run_is_transient(backends):
    server = EmbeddingServer().start()
    backend = await loaded(backends(server, retry_budget=0.3))
    server.stop()
    with pytest.raises(Exception) as caught:
        await backend.encode(["after the endpoint went away"])
    assert is_transient(caught.value), caught.value


# --- concurrency and batching ------------------------------------------------------------------------


async def test_requests_in_flight_are_bounded(backends):
    with EmbeddingServer(base_seconds=0.2) as server:
        backend = await loaded(backends(server, max_concurrency=3, max_batch_texts=1), server)
        busy_before = backend.encoded_seconds()
        started = time.monotonic()
        a, b = await asyncio.gather(backend.encode(texts_of(9, "a")), backend.encode(texts_of(6, "b")))
        elapsed = time.monotonic() - started
    assert a.vectors.shape == (9, 384) and b.vectors.shape == (6, 384)
    assert server.stats.max_concurrent == 3
    assert server.stats.batch_sizes == [1] * 15
    assert elapsed >= 15 / 3 * 0.2 - 0.05
    busy = backend.encoded_seconds() - busy_before
    assert 15 / 3 * 0.2 - 0.05 <= busy <= elapsed + 0.01  # busy time, not the sum over requests (3 s)


async def test_batches_are_capped_by_count(server, backends):
    backend = await loaded(backends(server, max_batch_texts=4), server)
    await backend.encode(texts_of(10))
    assert sorted(server.stats.batch_sizes) == [3, 3, 4]  # three requests, evenly filled
    assert sorted(server.stats.texts) == sorted(texts_of(10))


async def test_batches_are_capped_by_characters_and_a_long_text_goes_alone(server, backends):
    backend = await loaded(backends(server, max_batch_chars=100, max_batch_texts=64), server)
    short = [f"{i:02d}" + "s" * 28 for i in range(7)]  # 30 characters each
    long = "L" * 250
    texts = short[:3] + [long] + short[3:]
    result = await backend.encode(texts)
    stats = server.stats
    assert sum(stats.batch_sizes) == 8
    for size, chars in zip(stats.batch_sizes, stats.batch_chars):
        assert chars <= 100 or size == 1, (size, chars)
    assert (1, 250) in list(zip(stats.batch_sizes, stats.batch_chars))
    assert max(stats.batch_sizes) == 3
    for text, vector in zip(texts, result.vectors):
        assert np.allclose(vector, server.vector_for(text), atol=1e-6)


def test_plan_batches():
    texts = ["a" * n for n in (5, 1, 50, 3, 2)]
    assert plan_batches(texts, 2, 1000) == [[1, 4], [3, 0], [2]]
    assert plan_batches(texts, 10, 8) == [[1, 4, 3], [0], [2]]
    assert plan_batches([], 3, 10) == []


# --- rejected texts ---------------------------------------------------------------------------------------


async def test_only_the_rejected_text_raises_invalid_chunk(server, backends):
    backend = await loaded(backends(server, max_batch_texts=64), server)
    texts = texts_of(8)
    texts[5] = f"chunk 5 {REJECT_MARKER} here"
    with pytest.raises(InvalidChunkError) as caught:
        await backend.encode(texts)
    assert caught.value.indices == [5]
    assert "HTTP 400" in str(caught.value) and "reject marker" in str(caught.value)
    assert not is_transient(caught.value)
    assert server.stats.requests <= 1 + 2 * 3 + 1  # halves (not one request per text), and a probe
    # The daemon then applies chunk by chunk: only the marked one fails.
    for i, text in enumerate(texts):
        if i == 5:
            with pytest.raises(InvalidChunkError):
                await backend.encode([text])
        else:
            assert (await backend.encode([text])).vectors.shape == (1, 384)
    rest = texts[:5] + texts[6:]
    assert (await backend.encode(rest)).vectors.shape == (7, 384)


async def test_an_endpoint_rejecting_everything_is_a_config_error_not_dead_letters(server, backends):
    backend = await loaded(backends(server), server)
    server.reject_marker = ""  # every text is refused from now on: 400 for all
    server.fail_next(1000, 400, message="unsupported parameter: encoding_format")
    with pytest.raises(ConfigError, match="now rejects every text.*encoding_format"):
        await backend.encode(["a perfectly good text"])
    server.clear_faults()
    assert (await backend.encode(["a perfectly good text"])).vectors.shape == (1, 384)


async def test_every_rejected_text_is_named(server, backends):
    backend = await loaded(backends(server, max_batch_texts=3), server)
    texts = texts_of(9)
    texts[1] += REJECT_MARKER
    texts[7] += REJECT_MARKER
    with pytest.raises(InvalidChunkError) as caught:
        await backend.encode(texts)
    assert set(caught.value.indices) <= {1, 7} and caught.value.indices


async def test_a_long_error_message_is_cut(server, backends):
    backend = await loaded(backends(server), server)
    server.fail_next(1, 400, message="too long: " + "x" * 2000)
    with pytest.raises(InvalidChunkError) as caught:
        await backend.encode(["one text"])
    assert len(str(caught.value)) < 420


async def test_a_nan_vector_is_the_texts_fault(server, backends):
    backend = await loaded(backends(server), server)
    server.malformed_next(1, "nan")
    with pytest.raises(InvalidChunkError, match="NaN"):
        await backend.encode(["this one"])


# --- load ------------------------------------------------------------------------------------------------------


async def test_the_dimension_is_checked_at_load(server, backends):
    backend = backends(server, dimensions=256)
    with pytest.raises(ConfigError) as caught:
        await backend.load()
    message = str(caught.value)
    assert "384" in message and "256" in message and "OUTBOXD_EMBEDDING__DIMENSIONS" in message
    assert caught.value.exit_code == EXIT_CONFIG
    assert server.stats.dimensions[-1] == 256  # it was asked for


async def test_an_endpoint_honouring_dimensions_passes(backends):
    with EmbeddingServer(honour_dimensions=True) as server:
        backend = backends(server, dimensions=128)
        info = await backend.load()
        result = await backend.encode(["a", "b"])
    assert info.dimension == 128 and result.vectors.shape == (2, 128)


async def test_an_unreachable_endpoint_at_load_is_transient(backends):
    backend = backends(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(EndpointUnavailableError) as caught:
        await backend.load()
    assert is_transient(caught.value) and caught.value.exit_code == EXIT_UNAVAILABLE
    assert "127.0.0.1" in str(caught.value)


async def test_an_overloaded_endpoint_at_load_is_transient(server, backends):
    server.fail_next(1, 503)
    with pytest.raises(EndpointUnavailableError):
        await backends(server).load()
    assert server.stats.requests == 1  # not retried here: the daemon's start-up loop waits


async def test_a_wrong_path_is_a_config_error_naming_the_url_and_model(server, backends):
    backend = backends(server.url + "/api", model="my-embedder")
    with pytest.raises(ConfigError) as caught:
        await backend.load()
    message = str(caught.value)
    assert "404" in message and f"{server.url}/api/v1/embeddings" in message and "my-embedder" in message


async def test_an_answer_that_is_not_embeddings_is_a_config_error_at_load(server, backends):
    server.malformed_next(1, "not-json")
    with pytest.raises(ConfigError, match="OpenAI-compatible"):
        await backends(server).load()


async def test_a_malformed_answer_later_is_retried(server, backends):
    backend = await loaded(backends(server), server)
    server.malformed_next(1, "short")
    server.malformed_next(1, "ragged")
    assert (await backend.encode(["p", "q", "r"])).vectors.shape == (3, 384)
    assert server.stats.requests == 3


async def test_a_dimension_change_after_load_is_a_config_error(server, backends):
    backend = await loaded(backends(server), server)
    server.dimension = 768  # the endpoint was redeployed with another model
    with pytest.raises(ConfigError, match="768.*384"):
        await backend.encode(["after the redeploy"])


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/", "/v1/embeddings"])
def test_the_endpoint_url(suffix):
    assert endpoint_url("http://tei:8080" + suffix) == "http://tei:8080/v1/embeddings"
    assert endpoint_url("https://x.example/openai/deployments/e/embeddings") == (
        "https://x.example/openai/deployments/e/embeddings"
    )


# --- the API key ---------------------------------------------------------------------------------------


def assert_key_not_logged(caplog, key: str) -> None:
    for record in caplog.records:
        assert key not in record.getMessage(), record.getMessage()
        assert key not in repr(record.__dict__), record.name
    assert key not in caplog.text


@pytest.fixture
def debug_logs(caplog):
    """Every logger at DEBUG, httpx and httpcore included (a daemon's setup_logging may have raised them)."""
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "daemon"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


async def test_the_key_is_sent_and_never_logged(backends, debug_logs):
    with EmbeddingServer(api_key=KEY) as server:
        backend = backends(server, key=KEY, max_batch_texts=2)
        await backend.load()
        server.fail_next(1, 429, retry_after=0.05)
        server.fail_next(1, 500)
        await backend.encode(texts_of(5))
        with pytest.raises(InvalidChunkError) as caught:
            await backend.encode(["fine", f"bad {REJECT_MARKER}"])
    assert server.stats.auth_headers and set(server.stats.auth_headers) == {f"Bearer {KEY}"}
    assert KEY not in str(caught.value)
    assert any(r.name.startswith("httpcore") for r in debug_logs.records), "httpcore's DEBUG logs were not captured"
    assert any(r.name == "httpx" for r in debug_logs.records)
    assert any(r.levelno == logging.WARNING and r.name == "daemon.embedding.http_backend" for r in debug_logs.records)
    assert_key_not_logged(debug_logs, KEY)
    assert KEY not in repr(backend.__dict__)


async def test_a_refused_key_is_a_config_error_that_does_not_repeat_it(backends, debug_logs):
    wrong = "sk-wrong-0123456789-SECRET"
    with EmbeddingServer(api_key=KEY) as server:
        with pytest.raises(ConfigError) as refused:
            await backends(server, key=wrong).load()
        with pytest.raises(ConfigError) as missing:
            await backends(server).load()
        # and mid-run: the key was revoked
        backend = await loaded(backends(server, key=KEY))
        server.api_key = "sk-rotated"
        with pytest.raises(ConfigError):
            await backend.encode(["after the rotation"])
    message = str(refused.value)
    assert "401" in message and "EMBEDDING_API_KEY or EMBEDDING_API_KEY_FILE" in message
    assert "Incorrect API key provided" in message and "<redacted>" in message  # the endpoint echoed it
    assert wrong not in message and KEY not in message
    assert refused.value.exit_code == EXIT_CONFIG
    assert "none is set" in str(missing.value)
    assert_key_not_logged(debug_logs, wrong)
    assert_key_not_logged(debug_logs, KEY)


async def test_the_key_from_embedding_api_key_file(tmp_path, monkeypatch, backends):
    for name in ("EMBEDDING_API_KEY", "OUTBOXD_EMBEDDING__API_KEY", "OUTBOXD_EMBEDDING_API_KEY",
                 "OUTBOXD_EMBEDDING__API_KEY_FILE", "OUTBOXD_EMBEDDING_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    secret = tmp_path / "embedding-key"
    secret.write_text(KEY + "\n")
    monkeypatch.setenv("EMBEDDING_API_KEY_FILE", str(secret))
    with EmbeddingServer(api_key=KEY) as server:
        settings = Settings(database_url=None, embedding={"backend": "http", "url": server.url})
        assert settings.embedding.api_key is not None and KEY not in repr(settings)
        backend = HttpBackend(settings.embedding)
        try:
            assert (await backend.load()).dimension == 384
            await backend.encode(["with the key from a file"])
        finally:
            await backend.close()
    assert set(server.stats.auth_headers) == {f"Bearer {KEY}"}


async def test_close_is_prompt_with_a_request_in_flight(backends):
    with EmbeddingServer(base_seconds=3.0) as server:
        backend = backends(server, max_batch_texts=1)
        task = asyncio.create_task(backend.encode(["slow"]))
        await wait_until(lambda: server.stats.in_flight == 1, "the request to reach the server")
        task.cancel()
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        await backend.close()
        assert time.monotonic() - started < 1.0


# --- through the Embedder and the daemon -----------------------------------------------------------------


async def test_the_embedder_builds_the_http_backend(server):
    from daemon.embedding.embedder import Embedder

    embedder = Embedder(make_settings(server.url, model="bge-small"))
    try:
        assert isinstance(embedder.backend, HttpBackend)
        fingerprint = await embedder.load()
        vectors, encoded = await embedder.embed({"h1": "first", "h2": "second"})
    finally:
        await embedder.close()
    assert fingerprint.dimension == 384 and fingerprint.variant == "remote:bge-small"
    assert encoded == 2 and np.allclose(vectors["h2"].vector, server.vector_for("second"), atol=1e-6)
    assert vectors["h1"].truncated is False
    assert server.stats.models[-1] == "bge-small"


@pytest.mark.integration
async def test_the_daemon_converges_through_the_endpoint_and_a_rate_limit_is_no_dead_letter(
    conn, dsn, qdrant, collection, make_settings
):
    """max_attempts=1: any failure counted against an event would make a dead letter.
    A rate limit past the backend's budget is retried by the daemon without counting;
    only the text the endpoint rejects becomes a dead letter, with the endpoint's words."""
    from daemon.embedding.embedder import Embedder
    from tests.support import add_document, all_points, drain, outbox_rows

    with EmbeddingServer() as server:
        settings = make_settings(
            max_attempts=1, batch_size=8, embedding={"backend": "http", "url": server.url, "max_batch_texts": 4}
        )
        embedder = Embedder(settings)
        embedder.backend.retry_budget = 0.25  # a rate limit longer than this is the daemon's to wait out
        texts = [f"chunk number {i}" for i in range(20)]
        texts[13] = f"chunk 13 {REJECT_MARKER}"
        _, ids = add_document(conn, texts)
        try:
            await embedder.load()
            server.fail_next(8, 429, retry_after=0.1)
            daemon = await drain(settings, dsn, embedder, qdrant, timeout=60)
        finally:
            await embedder.close()
    rows = outbox_rows(conn)
    assert [(r["chunk_id"], r["status"]) for r in rows] == [(ids[13], "dead")]
    assert "reject marker" in rows[0]["last_error"] and "InvalidChunkError" in rows[0]["last_error"]
    assert daemon.stats.dead_letters == 1 and daemon.stats.transient_retries >= 1
    points = await all_points(qdrant, collection)
    assert set(points) == {str(i) for n, i in enumerate(ids) if n != 13}
    for n, chunk_id in enumerate(ids):
        if n != 13:
            assert np.allclose(dense(points[str(chunk_id)].vector), server.vector_for(texts[n]), atol=1e-5)
            assert points[str(chunk_id)].payload["outboxd"]["truncated"] is False
