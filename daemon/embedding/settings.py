"""The embedding backend's own settings: one of three, told apart by `backend`.

    OUTBOXD_EMBEDDING__BACKEND=onnx            (or [embedding] backend = "onnx" in --config)
    OUTBOXD_EMBEDDING__URL=http://tei:8080     (http)

What every backend shares (the model name, the window, normalisation, the
forward-pass size, the cache) stays in daemon.config.Settings. Each member
builds its own backend from its own fields (build()), imported only when chosen.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

if TYPE_CHECKING:
    from daemon.config import Settings
    from daemon.embedding.backend import Backend


class _Backend(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def build(self, settings: "Settings") -> "Backend":
        raise NotImplementedError


class SentenceTransformersSettings(_Backend):
    backend: Literal["sentence-transformers"] = "sentence-transformers"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="auto: fp16 on CUDA where its vectors agree with fp32 (cosine >= 0.999 on a sample), "
        "else fp32. fp16/bf16 are refused where they do not agree.",
    )

    def build(self, settings: "Settings") -> "Backend":
        from daemon.embedding.torch_backend import SentenceTransformersBackend

        return SentenceTransformersBackend(settings, self)


class OnnxSettings(_Backend):
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

    def build(self, settings: "Settings") -> "Backend":
        from daemon.embedding.onnx_backend import OnnxBackend

        return OnnxBackend(settings, self)


class HttpSettings(_Backend):
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

    def build(self, settings: "Settings") -> "Backend":
        from daemon.errors import ConfigError

        try:
            from daemon.embedding.http_backend import HttpBackend
        except ImportError as exc:
            raise ConfigError(f"the http embedding backend is not available in this build: {exc}") from exc
        return HttpBackend(settings, self)


EmbeddingSettings = Annotated[
    SentenceTransformersSettings | OnnxSettings | HttpSettings, Field(discriminator="backend")
]
