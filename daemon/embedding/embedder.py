"""Text to vectors, off the event loop, each distinct text once.

The Embedder sits in front of a backend (daemon.embedding.backend: torch by
default, ONNX Runtime, or an OpenAI-compatible endpoint, chosen by
OUTBOXD_EMBEDDING__BACKEND). Identical text is encoded once per model: vectors
are cached by the chunk's content_hash (SHA-256 of the text, kept by
PostgreSQL), a batch encodes each distinct text once, and a text another batch
is encoding right now is awaited rather than encoded again. The local backends
encode on their own threads (daemon.embedding.stage), so the NOTIFY listener,
leases and health checks stay responsive.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass

from daemon.config import Settings
from daemon.embedding.backend import Backend, BackendInfo
from daemon.embedding.fingerprint import ModelFingerprint
from daemon.embedding.model_source import resolve_model

__all__ = ["Embedder", "Embedding", "ModelFingerprint", "make_backend", "resolve_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Embedding:
    vector: list[float]
    truncated: bool


def make_backend(settings: Settings) -> Backend:
    """The backend OUTBOXD_EMBEDDING__BACKEND names, built by its own settings."""
    return settings.embedding.build(settings.data_dir)


class Embedder:
    def __init__(self, settings: Settings, *, backend: Backend | None = None) -> None:
        self._settings = settings
        self.name, _ = resolve_model(settings.embedding.name)
        self.backend: Backend = backend or make_backend(settings)
        self.info: BackendInfo | None = None
        self._cache: OrderedDict[str, Embedding] = OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self.fingerprint: ModelFingerprint | None = None
        # counters the supervisor reports
        self.encoded = 0
        self.cache_hits = 0

    async def load(self) -> ModelFingerprint:
        info = await self.backend.load()
        self.info = info
        self.fingerprint = ModelFingerprint(
            self.name, int(info.dimension), self._settings.embedding.normalize, info.max_seq_length, info.variant
        )
        log.info(
            "model loaded",
            extra={"model": str(self.fingerprint), "max_seq_length": info.max_seq_length, "backend": info.description},
        )
        return self.fingerprint

    @property
    def max_seq_length(self) -> int | None:
        return self.info.max_seq_length if self.info else None

    @property
    def encode_seconds(self) -> float:
        """Seconds the backend spent encoding (the device's busy time)."""
        return self.backend.encoded_seconds()

    @property
    def batch_size(self) -> int:
        """Texts per forward pass (the most, where the backend also caps padded tokens)."""
        size = getattr(self.backend, "batch_size", None)
        return int(size or self._settings.embedding.batch_size or 64)

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
                encoded = await self.backend.encode(list(missing.values()))
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
            vectors = encoded.vectors.tolist()  # one conversion for the whole call
            for h, vector, truncated in zip(missing, vectors, encoded.truncated):
                emb = Embedding(vector, bool(truncated))
                out[h] = emb
                futures[h].set_result(emb)
                self._remember(h, emb)
        for h, future in waiting.items():
            out[h] = await asyncio.shield(future)
            self.cache_hits += 1
        return out, len(missing)

    async def embed_query(self, text: str) -> list[float]:
        """The vector of one search query; neither cached nor counted with the
        chunks the daemon embeds."""
        encoded = await self.backend.encode([text])
        return encoded.vectors[0].tolist()

    def cached(self, content_hash: str) -> bool:
        return content_hash in self._cache

    def _remember(self, h: str, emb: Embedding) -> None:
        size = self._settings.embedding.cache_size
        if size <= 0:
            return
        self._cache[h] = emb
        if len(self._cache) > size:
            self._cache.popitem(last=False)

    async def close(self) -> None:
        """Stop the backend: callers still waiting fail with a transient error;
        returns without waiting for a forward pass in flight."""
        await self.backend.close()
