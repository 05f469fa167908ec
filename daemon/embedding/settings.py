"""The embedding backend's own settings: one of three, told apart by `backend`.

    OUTBOXD_EMBEDDING__BACKEND=onnx            (or [embedding] backend = "onnx" in --config)
    OUTBOXD_EMBEDDING__URL=http://tei:8080     (http)

What every backend shares (the model name, the window, normalisation, the
forward-pass size, the cache) stays in daemon.config.Settings. Each member
builds its own backend from its own fields (build()): the backend class is
named (`builder`, module:attribute) and imported only when chosen, as the CLI
finds its commands, so choosing one never loads another's libraries.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

if TYPE_CHECKING:
    from daemon.embedding.backend import Backend


class _Backend(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    builder: ClassVar[str]  # module:class of the backend these settings build

    def build(self, settings: Any) -> "Backend":
        """This backend, from the shared settings (daemon.config.Settings) and these."""
        module, _, name = self.builder.partition(":")
        return getattr(importlib.import_module(module), name)(settings, self)


class SentenceTransformersSettings(_Backend):
    builder: ClassVar[str] = "daemon.embedding.torch_backend:SentenceTransformersBackend"
    backend: Literal["sentence-transformers"] = "sentence-transformers"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="auto: fp16 on CUDA where its vectors agree with fp32 (cosine >= 0.999 on a sample), "
        "else fp32. fp16/bf16 are refused where they do not agree.",
    )


class OnnxSettings(_Backend):
    builder: ClassVar[str] = "daemon.embedding.onnx_backend:OnnxBackend"
    backend: Literal["onnx"] = "onnx"
    quantize: bool = Field(
        False,
        description="int8 dynamic quantization: faster on CPUs, but other vectors, so it gets its own "
        "model fingerprint (moving to it is a reindex).",
    )
    threads: int | None = Field(
        None, ge=1, description="One forward pass on this many intra-op threads (default: on a CPU, one "
        "single-threaded pass per core side by side, which measured faster for small batches)."
    )


class HttpSettings(_Backend):
    builder: ClassVar[str] = "daemon.embedding.http_backend:HttpBackend"
    backend: Literal["http"] = "http"
    url: HttpUrl = Field(
        description="Base URL of an OpenAI-compatible endpoint; outboxd POSTs to <url>/v1/embeddings "
        "(a URL ending in /v1 gets /embeddings; one ending in /embeddings is used as it is)."
    )
    model: str | None = Field(None, description="Model name sent in each request (default: OUTBOXD_MODEL).")
    dimensions: int | None = Field(
        None, ge=1, description="The vector size the endpoint must return (checked at start; default: what it returns)."
    )
    max_concurrency: int = Field(4, ge=1, le=256, description="Requests in flight at most.")
    max_batch_texts: int = Field(64, ge=1, description="Texts per request at most.")
    max_batch_chars: int = Field(100_000, ge=1, description="Characters per request at most (a longer text goes alone).")
    timeout: float = Field(60.0, gt=0, description="Seconds one request may take.")
    requests_per_minute: float | None = Field(
        None, gt=0, description="The endpoint's budget of requests per minute, shared by every daemon of the "
        "database (unset: no limit). Fractions are allowed: 0.5 is one request every two minutes."
    )
    tokens_per_minute: float | None = Field(
        None, gt=0, description="The endpoint's budget of tokens per minute, as the endpoint counts them "
        "(usage.prompt_tokens), shared like requests_per_minute (unset: no limit)."
    )
    budget_scope: Literal["database", "process"] = Field(
        "database", description="database: the daemons of one database share one budget (kept in PostgreSQL); "
        "process: each process keeps the whole budget for itself (one API key per process). A process without "
        "a database (outboxd consume) keeps its own either way."
    )

    def build(self, settings: Any) -> "Backend":
        from daemon.errors import ConfigError

        try:
            return super().build(settings)
        except ImportError as exc:
            raise ConfigError(f"the http embedding backend is not available in this build: {exc}") from exc


EmbeddingSettings = Annotated[
    SentenceTransformersSettings | OnnxSettings | HttpSettings, Field(discriminator="backend")
]
