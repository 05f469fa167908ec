"""The interface every embedding backend implements, and what it reports.

A backend turns texts into vectors; nothing else. The Embedder in front of it
(daemon.embedding.embedder) keeps the cache by content hash, encodes each
distinct text once, and counts. Three backends are chosen in the settings
(OUTBOXD_EMBEDDING__BACKEND, a pydantic discriminated union):

- sentence-transformers  torch, the default; on CUDA in fp16 where its vectors
                         agree with fp32
- onnx                   ONNX Runtime on the CPU, exported offline from the
                         local model folder on first use
- http                   an OpenAI-compatible /v1/embeddings endpoint

Local backends (torch, ONNX) share one encode stage (daemon.embedding.stage):
Rust tokenization once per text, length-bucketed batches across every request
waiting, the forward pass on its own thread. Errors: a failure of the text
itself raises InvalidChunkError (isolated, then dead-lettered); an outage or a
rate limit raises a transient error (daemon.errors.is_transient), retried
without counting against the events.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from daemon.embedding.threads import run_in_thread

if TYPE_CHECKING:
    from daemon.embedding.token_bucket import Budget


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What load() learned: enough to build the model fingerprint."""

    dimension: int
    # tokens the model reads per text (longer text is cut); None where the backend cannot tell (http)
    max_seq_length: int | None
    # None where the vectors agree with the reference (torch fp32: cosine >= 0.999 on a sample);
    # else what makes them differ ("int8", "remote:<endpoint model>"): part of the fingerprint
    variant: str | None = None
    # for logs and `outboxd status`: "torch cuda fp16", "onnxruntime cpu", "http https://…"
    description: str = ""


@dataclass(frozen=True, slots=True)
class Encoded:
    """Vectors in the order of the texts asked for, float32, shape (n, dimension),
    normalised when OUTBOXD_EMBEDDING__NORMALIZE is on; truncated[i]: text i was longer than
    the model's window (from the same tokenization that fed the model)."""

    vectors: np.ndarray
    truncated: list[bool]


class Backend(ABC):
    kind: str  # the discriminator value: "sentence-transformers", "onnx", "http"
    # how fast a remote backend may send requests (daemon.embedding.token_bucket); None: a local model, no budget
    budget: "Budget | None" = None

    @abstractmethod
    async def load(self) -> BackendInfo:
        """Load or reach the model (may take seconds; must not block the event loop)."""

    @abstractmethod
    async def encode(self, texts: list[str]) -> Encoded:
        """Vectors for texts, in order. Concurrent calls are allowed and may be
        batched together; cancelling a call abandons its texts."""

    @abstractmethod
    async def close(self) -> None:
        """Stop threads, sessions and connections; returns promptly (never waits
        for a forward pass in flight to finish)."""

    def encoded_seconds(self) -> float:
        """Seconds the device spent encoding so far (the encode_seconds metric)."""
        return 0.0


class StagedBackend(Backend):
    """A local backend whose encode() goes through its EncodeStage
    (daemon.embedding.stage), made by load()."""

    stage = None  # the EncodeStage, once loaded
    _info: BackendInfo | None = None

    async def load(self) -> BackendInfo:
        """Once: _load() on a thread of its own (imports, model files, the stage)."""
        if self._info is None:
            self._info = await run_in_thread(self._load, name=f"outboxd-load-{self.kind}")
        return self._info

    def _load(self) -> BackendInfo:
        raise NotImplementedError

    async def encode(self, texts: list[str]) -> Encoded:
        if self.stage is None:
            raise RuntimeError("load the backend before encoding")
        return await self.stage.encode(texts)

    async def close(self) -> None:
        if self.stage is not None:
            self.stage.close()

    def encoded_seconds(self) -> float:
        return self.stage.encoded_seconds() if self.stage is not None else 0.0
