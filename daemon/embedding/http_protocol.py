"""The OpenAI-compatible /v1/embeddings protocol, as the http backend speaks it:
where to POST, how texts are packed into requests, what an answer's status
means (retry, the text's fault, a configuration problem) and how its vectors
are read. No I/O here; daemon.embedding.http_backend sends the requests.

What is retried, and what it becomes (daemon.errors):

- 429, 408, 5xx, transport errors (refused, reset, timeout) and, after start-up,
  a malformed answer: retried with exponential backoff and jitter (daemon.runtime.retry),
  or after the endpoint's Retry-After (seconds or an HTTP date, capped at
  RETRY_AFTER_MAX), which also pauses the backend's budget: every other
  request of this process, or of every daemon sharing the database's budget.
  Each retry is logged at WARNING with the status and the wait. After
  RETRY_BUDGET seconds of failures a request raises EndpointUnavailableError
  (a DependencyDown, dependency "embedding": is_transient() is true, exit 69),
  so the daemon retries the batch without counting it against the events. A
  rate limit never makes a dead letter.
- 400, 413, 422: the text is at fault. A request of several texts is split in
  halves until the rejected text(s) stand alone; those raise InvalidChunkError
  with the endpoint's message (the rest of the call is not returned: the daemon
  then applies chunk by chunk, so only the rejected chunks fail). A vector with
  NaN or infinity for one text is that text's InvalidChunkError too. Unless the
  one-line probe of load() is now rejected as well: then the endpoint refuses
  everything, a ConfigError, not a dead letter per chunk.
- 401/403 (the key), 404/405 (the URL or the model), a redirect, another 4xx, and
  a change of dimension after start-up (the model behind the URL changed):
  ConfigError (exit 78); retrying cannot help.
"""
from __future__ import annotations

import base64
import math
import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import numpy as np
import orjson

from daemon.errors import ConfigError, DependencyDown, InvalidChunkError

KEY_HINT = "set EMBEDDING_API_KEY or EMBEDDING_API_KEY_FILE"
RETRY_STATUS = {408, 425, 429}
REJECT_STATUS = {400, 413, 422}


class EndpointUnavailableError(DependencyDown):
    """The embedding endpoint is down, overloaded or rate limiting past the retry
    budget: a DependencyDown("embedding"), so daemon.errors.is_transient() retries
    the batch without counting it against its events; at start-up it exits 69."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "embedding")


class Retryable(DependencyDown):
    """One attempt failed in a way worth retrying: an outage, an overload, a rate
    limit (a DependencyDown, so daemon.errors.classify calls it transient)."""

    def __init__(self, what: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(what, "embedding")
        self.what = what
        self.status = status
        self.retry_after = retry_after


class Rejected(Exception):
    """The endpoint refused the texts of a request (400/413/422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Malformed(Exception):
    """A 2xx answer that is not an embeddings answer for the texts asked."""


class NonFinite(Exception):
    def __init__(self, rows: list[int]) -> None:
        super().__init__(rows)
        self.rows = rows


def endpoint_url(url: str) -> str:
    """<url>/v1/embeddings; a URL ending in /embeddings is used as it is, and one
    ending in /v1 (OpenAI's own base URL convention) gets /embeddings."""
    base = url.rstrip("/")
    if base.endswith("/embeddings"):
        return base
    if base.endswith("/v1"):
        return base + "/embeddings"
    return base + "/v1/embeddings"


def plan_batches(texts: list[str], max_texts: int, max_chars: int) -> list[list[int]]:
    """Indices of texts, sorted by length (servers that pad a request to its
    longest text waste less) and packed into requests of at most max_texts
    texts (evenly: the requests run side by side) and max_chars characters; a
    text longer than max_chars goes alone."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    # as many requests as the count cap needs, evenly filled: 100 texts at 64 are 50 + 50, not 64 + 36
    requests = max(1, math.ceil(len(texts) / max_texts))
    size, larger = divmod(len(texts), requests)
    batches: list[list[int]] = []
    current: list[int] = []
    chars = 0
    for i in order:
        n = len(texts[i])
        cap = size + (len(batches) < larger)
        if current and (len(current) >= cap or chars + n > max_chars):
            batches.append(current)
            current, chars = [], 0
        current.append(i)
        chars += n
    if current:
        batches.append(current)
    return batches


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def error_message(response: httpx.Response) -> str:
    """The endpoint's own words: OpenAI {"error": {"message"}}, TEI {"error": "..."},
    vLLM {"message"}, FastAPI {"detail"}; else the body's text."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            value = body.get(key)
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return value["message"]
            if isinstance(value, str) and value:
                return value
            if value:
                return orjson.dumps(value).decode()
    text = response.text.strip()
    return " ".join(text.split()) or response.reason_phrase or ""


def classify_failure(response: httpx.Response, where: str, model: str, key_set: bool, clip) -> Exception:
    """What a non-2xx answer means: Retryable (an outage, an overload, a rate
    limit), Rejected (the texts), or ConfigError (the key, the URL, the model).
    clip(text, limit) shortens the endpoint's words and redacts the key."""
    status = response.status_code
    if status in RETRY_STATUS or status >= 500:
        message = clip(error_message(response), 120)
        what = f"HTTP {status}" + (f" ({message})" if message else "")
        return Retryable(what, status=status, retry_after=parse_retry_after(response.headers.get("retry-after")))
    message = clip(error_message(response))
    if status in REJECT_STATUS:
        return Rejected(status, message)
    if status in (401, 403):
        return ConfigError(
            f"the embedding endpoint {where} refused the API key (HTTP {status}"
            + (f": {message}" if message else "")
            + f"): {KEY_HINT}"
            + ("" if key_set else " (none is set)")
        )
    if status in (404, 405):
        return ConfigError(
            f"the embedding endpoint answered HTTP {status} to POST {where} for model {model!r}"
            + (f": {message}" if message else "")
            + ". Check OUTBOXD_EMBEDDING__URL (outboxd POSTs to <url>/v1/embeddings) and "
            "OUTBOXD_EMBEDDING__MODEL (default: OUTBOXD_EMBEDDING__NAME)"
        )
    if 300 <= status < 400:
        return ConfigError(
            f"the embedding endpoint {where} redirects (HTTP {status}) to "
            f"{response.headers.get('location', '?')}: set OUTBOXD_EMBEDDING__URL to where it points"
        )
    return ConfigError(
        f"the embedding endpoint {where} answered HTTP {status} for model {model!r}"
        + (f": {message}" if message else "")
    )


def parse_embeddings(response: httpx.Response, n: int, probe: bool) -> tuple[np.ndarray, int | None]:
    """The vectors of a 2xx answer for n texts, in the order of data[*].index (not
    normalised), and the tokens the endpoint counted (usage.prompt_tokens, None
    where it does not say); Malformed at the probe, Retryable later; NonFinite rows."""
    def malformed(what: str) -> Exception:
        """At load: the URL is not an embeddings endpoint (a ConfigError there).
        Later: it spoke the protocol at start, so a garbled answer is its (or a
        proxy's) passing fault, never the text's: retried, then transient."""
        return Malformed(what) if probe else Retryable(f"malformed answer: {what}")

    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise malformed(f"not JSON ({response.headers.get('content-type', 'no content type')})") from None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise malformed("no data list in the answer")
    if len(data) != n:
        raise malformed(f"{len(data)} embeddings for {n} texts")
    rows: list[Any] = [None] * n
    for position, item in enumerate(data):
        if not isinstance(item, dict) or "embedding" not in item:
            raise malformed("an item of data has no embedding")
        index = item.get("index", position)
        if not isinstance(index, int) or not 0 <= index < n or rows[index] is not None:
            raise malformed(f"bad or repeated index {index!r}")
        embedding = item["embedding"]
        if isinstance(embedding, str):  # base64 float32, from an endpoint that ignores encoding_format
            try:
                embedding = np.frombuffer(base64.b64decode(embedding), dtype="<f4")
            except ValueError:
                raise malformed("an embedding is neither a list of numbers nor base64") from None
        rows[index] = embedding
    try:
        vectors = np.asarray(rows, dtype=np.float32)
    except (ValueError, TypeError):
        raise malformed("embeddings of different lengths, or not numbers") from None
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise malformed(f"embeddings of shape {vectors.shape}")
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise NonFinite([int(i) for i in np.flatnonzero(~finite)])
    return vectors, prompt_tokens(body)


def prompt_tokens(body: dict) -> int | None:
    """usage.prompt_tokens of an answer (OpenAI, TEI, vLLM and Ollama report it), if it is a count."""
    usage = body.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0 else None


def rejected_texts(texts: list[str], rows: list[int], status: int | None, message: str) -> InvalidChunkError:
    """The texts at rows failed by their own fault (the message is clipped already)."""
    how = f"HTTP {status}" if status else "no usable vector"
    if len(rows) == 1:
        text = f"the embedding endpoint rejected the text ({how}, {len(texts[rows[0]])} characters): {message}"
    else:
        text = f"the embedding endpoint rejected {len(rows)} of {len(texts)} texts ({how}): {message}"
    error = InvalidChunkError(text)
    error.indices = list(rows)  # type: ignore[attr-defined]  # positions in the encode() call
    error.status = status  # type: ignore[attr-defined]
    error.endpoint_message = message  # type: ignore[attr-defined]
    return error


def most_telling(group: BaseExceptionGroup) -> BaseException:
    """The exception of a failed encode() whose batches failed differently: a
    configuration problem, then an outage, then the texts at fault."""
    flat: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for e in g.exceptions:
            walk(e) if isinstance(e, BaseExceptionGroup) else flat.append(e)

    walk(group)
    for kind in (ConfigError, EndpointUnavailableError, InvalidChunkError):
        for e in flat:
            if isinstance(e, kind):
                return e
    return flat[0]
