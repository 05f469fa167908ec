"""The http backend: an OpenAI-compatible /v1/embeddings endpoint
(text-embeddings-inference, vLLM, Ollama, Infinity, OpenAI).

    OUTBOXD_EMBEDDING__BACKEND=http
    OUTBOXD_EMBEDDING__URL=http://tei:8080          (POSTs to http://tei:8080/v1/embeddings)
    EMBEDDING_API_KEY=... or EMBEDDING_API_KEY_FILE=/run/secrets/embedding-key   (optional)

The texts of one encode() call are sorted by length and packed into requests
of at most max_batch_texts texts and max_batch_chars characters; at most
max_concurrency requests are in flight for the whole backend; vectors come back
in the caller's order, normalised here when OUTBOXD_EMBEDDING__NORMALIZE is on. What each
answer becomes (a retry, the text's fault, a configuration problem):
daemon.embedding.http_protocol.

load() probes once with a short text: the dimension is what comes back
(checked against OUTBOXD_EMBEDDING__DIMENSIONS). Unreachable or overloaded:
EndpointUnavailableError (transient: start-up waits, then exits 69); refused or
not an embeddings answer: ConfigError (78).

`truncated` is False for every text: the endpoint does not say whether it cut
one. Its numerics and window are not outboxd's to prove, so the vectors get
their own fingerprint (variant "remote:<model>").

Every request, retries and the probe included, first takes its turn from the
backend's budget (daemon.embedding.token_bucket): OUTBOXD_EMBEDDING__REQUESTS_PER_MINUTE
and __TOKENS_PER_MINUTE, this process's own until the daemon gives it the one
its database keeps for every daemon (daemon.outbox.shared_budget). A Retry-After
pauses that budget: this process's requests, or the whole fleet's. Time spent
waiting for a turn is not failing time: the retry budget below does not count it.

encoded_seconds() is the time at least one request was in flight. The API key
lives only in the client's headers (never logged); endpoint text that reaches
an error message has it replaced by "<redacted>".
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import replace
from typing import Any

import httpx
import numpy as np
import orjson

from daemon.embedding.backend import Backend, BackendInfo, Encoded
from daemon.embedding.http_protocol import (
    EndpointUnavailableError,
    Malformed,
    NonFinite,
    Rejected,
    Retryable,
    classify_failure,
    endpoint_url,
    most_telling,
    parse_embeddings,
    plan_batches,
    rejected_texts,
)
from daemon.embedding.settings import HttpSettings
from daemon.embedding.token_bucket import Budget, LocalBudget, Rates
from daemon.errors import ConfigError, InvalidChunkError
from daemon.runtime.backoff import Backoff
from daemon.runtime.retry import Failed, GaveUp, Retry

log = logging.getLogger(__name__)

RETRY_BUDGET = 60.0  # seconds of failures one request retries before the batch is handed back (transient)
RETRY_AFTER_MAX = 30.0  # longest Retry-After honoured (and shared); a longer one waits this long, then asks again
BACKOFF_INITIAL = 0.5  # first wait without a Retry-After; doubles per attempt, plus jitter
BACKOFF_MAX = 10.0
MESSAGE_CHARS = 300  # of the endpoint's error text, in our messages
PROBE_TEXT = "outboxd endpoint probe"


__all__ = ["EndpointUnavailableError", "HttpBackend", "endpoint_url", "plan_batches"]


class HttpBackend(Backend):
    kind = "http"

    def __init__(
        self,
        settings: HttpSettings,
        *,
        retry_budget: float = RETRY_BUDGET,
        retry_after_max: float = RETRY_AFTER_MAX,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = http = settings  # the shared settings and the endpoint's own
        self._normalize = settings.normalize
        self._max_seq_length = settings.max_seq_length
        self.model = http.model or settings.name
        self.url = endpoint_url(str(http.url))
        parsed = httpx.URL(self.url)
        # for logs and errors: no user:password@ (the key never is in the URL, but a password may be)
        self.display_url = str(parsed.copy_with(username=None, password=None)) if parsed.userinfo else self.url
        self._secret = settings.api_key  # a SecretStr: its repr and str are "**********"
        self.retry_budget = retry_budget
        self.retry_after_max = retry_after_max
        self._backoff = Backoff(base=backoff_initial, cap=backoff_max)
        self._transport = transport
        self._dimension: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop the client was made on
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self.budget: Budget = LocalBudget(
            f"{self.display_url} {self.model}", Rates(http.requests_per_minute, http.tokens_per_minute),
            share=http.budget_scope == "database",
        )
        self._in_flight = 0
        self._busy_since = 0.0
        self._busy_seconds = 0.0
        self.requests = 0  # attempts sent, retries included
        self.retries = 0

    @property
    def batch_size(self) -> int:
        """Texts per request at most (Embedder.batch_size reports it)."""
        return self._http.max_batch_texts

    # --- the Backend interface ------------------------------------------------------
    async def load(self) -> BackendInfo:
        return await self._load()

    async def encode(self, texts: list[str]) -> Encoded:
        if not texts:
            return Encoded(np.zeros((0, self._dimension or 0), dtype=np.float32), [])
        return await self._encode(texts)

    async def close(self) -> None:
        client, self._client = self._client, None
        self._semaphore = None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()  # a client of a loop that is gone went with it

    def encoded_seconds(self) -> float:
        if self._in_flight:
            return self._busy_seconds + time.perf_counter() - self._busy_since
        return self._busy_seconds

    # --- the requests ------------------------------------------------------------------------------
    async def _load(self) -> BackendInfo:
        if self._secret is not None and httpx.URL(self.url).scheme == "http" and not self._loopback():
            log.warning(
                "the embedding API key is sent in clear text: use an https:// OUTBOXD_EMBEDDING__URL",
                extra={"url": self.display_url},
            )
        try:
            vectors = await self._attempt([PROBE_TEXT], probe=True)
        except Retryable as exc:
            raise EndpointUnavailableError(
                f"the embedding endpoint {self.display_url} is not available: {exc.what}"
            ) from exc.__cause__
        except Rejected as exc:
            raise ConfigError(
                f"the embedding endpoint {self.display_url} refused a one-line probe for model {self.model!r} "
                f"(HTTP {exc.status}): {self._clip(exc.message)}. Check OUTBOXD_EMBEDDING__MODEL"
                + (" and OUTBOXD_EMBEDDING__DIMENSIONS" if self._http.dimensions else "")
            ) from None
        except Malformed as exc:
            raise ConfigError(
                f"{self.display_url} does not answer like an OpenAI-compatible embeddings endpoint: {exc}. "
                "Check OUTBOXD_EMBEDDING__URL (outboxd POSTs to <url>/v1/embeddings)"
            ) from None
        except NonFinite:
            raise ConfigError(
                f"the embedding endpoint {self.display_url} returned a vector with NaN or infinity for a "
                f"one-line probe (model {self.model!r}): its model is broken"
            ) from None
        dimension = int(vectors.shape[1])
        wanted = self._http.dimensions
        if wanted is not None and dimension != wanted:
            raise ConfigError(
                f"the embedding endpoint {self.display_url} returned {dimension}-dimensional vectors for model "
                f"{self.model!r}, but OUTBOXD_EMBEDDING__DIMENSIONS is {wanted}: serve a model of {wanted} "
                f"dimensions (or one that honours the dimensions parameter), or set it to {dimension}"
            )
        self._dimension = dimension
        info = BackendInfo(
            dimension=dimension,
            max_seq_length=self._max_seq_length,
            variant=f"remote:{self.model}",
            description=f"http {self.display_url} model {self.model}",
        )
        log.info(
            "embedding endpoint reached",
            extra={"url": self.display_url, "model": self.model, "dimension": dimension,
                   "budget": self.budget.rates.describe(), "budget_scope": self.budget.scope},
        )
        return info

    async def _encode(self, texts: list[str]) -> Encoded:
        batches = plan_batches(texts, self._http.max_batch_texts, self._http.max_batch_chars)
        parts: list[np.ndarray | None] = [None] * len(batches)

        async def run(n: int) -> None:
            parts[n] = await self._encode_rows(texts, batches[n])

        if len(batches) == 1:
            await run(0)
        else:
            try:
                async with asyncio.TaskGroup() as group:
                    for n in range(len(batches)):
                        group.create_task(run(n))
            except BaseExceptionGroup as group_error:
                raise most_telling(group_error) from None
        dimension = {p.shape[1] for p in parts}
        if len(dimension) != 1:  # two batches saw two models: the endpoint changed under us
            raise self._dimension_changed(sorted(dimension)[-1], sorted(dimension)[0])
        vectors = np.empty((len(texts), dimension.pop()), dtype=np.float32)
        for rows, part in zip(batches, parts):
            vectors[rows] = part
        if self._normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            np.divide(vectors, norms, out=vectors, where=norms > 0)
        return Encoded(vectors, [False] * len(texts))

    # --- one batch: retried, and split when the endpoint rejects its texts -----------------
    async def _encode_rows(self, texts: list[str], rows: list[int]) -> np.ndarray:
        try:
            return await self._request([texts[i] for i in rows])
        except NonFinite as exc:
            bad = [rows[r] for r in exc.rows]
            raise rejected_texts(texts, bad, None, "the endpoint returned a vector with NaN or infinity") from None
        except Rejected as exc:
            if len(rows) == 1:
                await self._probe_after_rejection(exc)
                raise rejected_texts(texts, rows, exc.status, exc.message) from None
            rejected = exc
        # several texts, one request refused: find the text(s) at fault by halves
        log.info(
            "the embedding endpoint rejected a batch; splitting it to find the text at fault",
            extra={"status": rejected.status, "texts": len(rows)},
        )
        half = len(rows) // 2
        results = await asyncio.gather(
            self._encode_rows(texts, rows[:half]), self._encode_rows(texts, rows[half:]), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if not failures:
            # both halves passed alone: the request as a whole was too much (413 for its size)
            return np.concatenate(results)  # type: ignore[arg-type]
        for f in failures:  # an outage or a configuration problem outranks a bad text
            if not isinstance(f, InvalidChunkError):
                raise f
        bad = sorted(i for f in failures for i in getattr(f, "indices", []))
        if len(failures) == 1:
            raise failures[0]
        first: InvalidChunkError = failures[0]  # type: ignore[assignment]
        message = getattr(first, "endpoint_message", str(first))
        raise rejected_texts(texts, bad, getattr(first, "status", None), message)

    async def _probe_after_rejection(self, rejection: Rejected) -> None:
        """A text was rejected alone: is it the text, or does the endpoint now
        refuse everything (a redeploy with other parameters)? The latter would
        make every chunk a dead letter, so it is a ConfigError instead."""
        try:
            await self._request([PROBE_TEXT])
        except Rejected as probe:
            raise ConfigError(
                f"the embedding endpoint {self.display_url} now rejects every text, even a one-line probe, "
                f"for model {self.model!r} (HTTP {probe.status}: {self._clip(probe.message)}); it accepted "
                "them at start. Check the endpoint's configuration"
            ) from None

    async def _request(self, texts: list[str]) -> np.ndarray:
        """One request's vectors, retried through outages and rate limits (a
        Retryable: an outage to daemon.errors.classify) for up to retry_budget
        seconds from its first failure (waiting for a turn of the budget is not
        failing: the streak's clock leaves that time out)."""
        waited = [0.0]  # seconds the attempts waited for their turn
        retry = Retry(
            replace(self._backoff, deadline=self.retry_budget),
            # the endpoint's answers only: anything else (the shared budget's database) is the daemon's to retry
            retry_if=lambda exc: isinstance(exc, Retryable),
            delay_of=self._retry_after,
            clock=lambda: time.monotonic() - waited[0],
            on_retry=lambda failed: self._log_retry(failed, len(texts)),
        )
        try:
            return await retry.call(self._attempt, texts, waited=waited)
        except GaveUp as exc:
            raise EndpointUnavailableError(
                f"the embedding endpoint {self.display_url} still failed after {self.retry_budget:g}s of "
                f"retries ({exc.attempts} attempts; last: {exc.last.what}); the batch will be retried"
            ) from exc.last.__cause__

    def _retry_after(self, exc: BaseException) -> float | None:
        """The endpoint's own delay (Retry-After), capped and a little jittered; None: the backoff's."""
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is None:
            return None
        wait = min(retry_after, self.retry_after_max)
        # a little jitter after the endpoint's time, so that waiting clients do not return at once
        return wait + random.uniform(0, min(1.0, 0.1 * wait + 0.05))

    def _log_retry(self, failed: Failed, texts: int) -> None:
        self.retries += 1
        exc = failed.error
        wait = round(failed.delay, 2)
        log.warning(
            f"embedding endpoint: {getattr(exc, 'what', exc)}; retrying in {wait}s",
            extra={"status": getattr(exc, "status", None), "retry_in": wait, "attempt": failed.attempt,
                   "texts": texts},
        )

    async def _attempt(self, texts: list[str], *, probe: bool = False, waited: list[float] | None = None) -> np.ndarray:
        """One POST, in its turn of the budget (the seconds waited for it are
        added to waited[0]): the vectors (not normalised), or Retryable,
        Rejected, NonFinite, ConfigError; and Malformed for the probe of load()
        (a garbled answer there means a wrong URL, not a passing fault)."""
        body: dict[str, Any] = {"model": self.model, "input": texts, "encoding_format": "float"}
        if self._http.dimensions is not None:
            body["dimensions"] = self._http.dimensions
        client, semaphore = self._session()
        async with semaphore:
            ticket = await self.budget.admit(texts)
            if waited is not None:
                waited[0] += ticket.waited
            self._busy(+1)
            try:
                self.requests += 1
                response = await client.post(self.url, content=orjson.dumps(body))
            except httpx.TransportError as exc:
                raise Retryable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc
            finally:
                self._busy(-1)
        status = response.status_code
        if 200 <= status < 300:
            vectors, used = parse_embeddings(response, len(texts), probe)
            await self.budget.answered(ticket, used)
            return self._checked(vectors, probe)
        failure = classify_failure(response, self.display_url, self.model, self._secret is not None, self._clip)
        if isinstance(failure, Retryable) and (failure.retry_after is not None or failure.status == 429):
            # holds back the budget's other requests too: this process's, or every daemon's
            await self.budget.pause(min(failure.retry_after or 0.0, self.retry_after_max))
        raise failure

    def _checked(self, vectors: np.ndarray, probe: bool) -> np.ndarray:
        if not probe and self._dimension is not None and vectors.shape[1] != self._dimension:
            raise self._dimension_changed(vectors.shape[1], self._dimension)
        return vectors

    # --- errors ---------------------------------------------------------------------------
    def _dimension_changed(self, now: int, before: int) -> ConfigError:
        return ConfigError(
            f"the embedding endpoint {self.display_url} now returns {now}-dimensional vectors for model "
            f"{self.model!r}; it returned {before} at start. The model behind it changed: serve the model "
            "outboxd started with, or restart outboxd (a new model is a reindex)"
        )

    def _clip(self, text: str, limit: int = MESSAGE_CHARS) -> str:
        if self._secret is not None:
            text = text.replace(self._secret.get_secret_value(), "<redacted>")
        text = " ".join(text.split())
        return text if len(text) <= limit else text[: limit - 1] + "…"

    # --- plumbing ------------------------------------------------------------------------------
    def _session(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        """The client and the semaphore, made on the event loop that uses them: a caller
        on another loop (an embedding application's asyncio.run per call) gets its own."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._semaphore is None or self._loop is not loop:
            self._loop = loop
            self._semaphore = asyncio.Semaphore(self._http.max_concurrency)
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            if self._secret is not None:
                headers["Authorization"] = f"Bearer {self._secret.get_secret_value()}"
            limit = self._http.max_concurrency
            self._client = httpx.AsyncClient(
                headers=headers,
                timeout=httpx.Timeout(self._http.timeout),
                limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
                transport=self._transport,
                follow_redirects=False,
            )
        return self._client, self._semaphore

    def _busy(self, delta: int) -> None:
        now = time.perf_counter()
        if delta > 0 and self._in_flight == 0:
            self._busy_since = now
        self._in_flight += delta
        if delta < 0 and self._in_flight == 0:
            self._busy_seconds += now - self._busy_since

    def _loopback(self) -> bool:
        host = httpx.URL(self.url).host
        return host in ("localhost", "::1") or host.startswith("127.")
