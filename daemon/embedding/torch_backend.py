"""The default backend: the sentence-transformers model in torch, through the
shared encode stage (Rust tokenization once per text, length-bucketed batches,
the forward pass on its own thread).

The forward pass is the model's own modules (`SentenceTransformer.forward`:
transformer, pooling, normalisation as the model folder says), so its vectors are
sentence-transformers' `encode()` vectors (cosine >= 0.9999; the tests check it).

Precision (OUTBOXD_EMBEDDING__PRECISION): `auto` is fp16 on CUDA where its vectors
agree with fp32 (cosine >= 0.999, the minimum over a sample of varied texts), else
fp32; an explicit fp16 or bf16 that does not agree is refused (ConfigError with
the measured cosine). A precision that agrees keeps the fingerprint (variant
None): its vectors are the same within the tolerance the fingerprint promises.
"""
from __future__ import annotations

import copy
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from daemon.embedding.backend import BackendInfo, StagedBackend
from daemon.embedding.model_source import quiet_transformers, resolve_model
from daemon.embedding.samples import AGREEMENT, AGREEMENT_SAMPLE, cosine_min
from daemon.embedding.settings import SentenceTransformersSettings
from daemon.embedding.stage import EncodeStage, ForwardInterrupted
from daemon.embedding.threads import cpu_workers
from daemon.embedding.tokens import pad, plan_batches, window_tokenizer
from daemon.errors import ConfigError

log = logging.getLogger(__name__)

CPU_BATCH = 8  # texts per forward pass on a CPU: padding costs more than batching saves
CUDA_BATCH = 256
CUDA_TOKENS = 256 * 128  # padded tokens per forward pass on CUDA (a batch of long texts gets fewer)


def load_sentence_transformer(source: str, *, device: str | None = None, max_seq_length: int | None = None,
                              configured: str | None = None):
    """A SentenceTransformer from `source` (a folder or a name in the cache), with
    its window set when max_seq_length is given; ConfigError when it cannot load.
    A model already in the cache loads without asking the hub whether it changed
    (a request per file, or a failure where the hub cannot be reached); only a
    model not on this machine yet is downloaded."""
    quiet_transformers()
    from sentence_transformers import SentenceTransformer

    try:
        try:
            model = SentenceTransformer(source, device=device, local_files_only=True)
        except OSError:
            if os.path.isdir(source):
                raise
            model = SentenceTransformer(source, device=device)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load embedding model {configured or source!r}: {exc}. Set OUTBOXD_EMBEDDING__NAME to a "
            "sentence-transformers model name reachable from this machine or a local model folder"
        ) from exc
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


@functools.lru_cache(maxsize=4)
def reference_model(model: str, device: str | None = None, max_seq_length: int | None = None):
    """sentence-transformers' own model for OUTBOXD_EMBEDDING__NAME `model`, loaded once per
    process: the independent reference the tests and benchmarks compare the
    daemon's vectors with (`reference_model(...).encode(texts, normalize_embeddings=True)`)."""
    _, source = resolve_model(model)
    return load_sentence_transformer(source, device=device, max_seq_length=max_seq_length, configured=model)


def rust_tokenizer(model, folder: str | None = None):
    """The model's Rust tokenizer (tokenizers.Tokenizer): the fast tokenizer's
    backend, else the folder's tokenizer.json."""
    backend = getattr(getattr(model, "tokenizer", None), "backend_tokenizer", None)
    if backend is not None:
        return Tokenizer.from_str(backend.to_str())  # a copy: transformers changes its truncation per call
    if folder and (Path(folder) / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    raise ConfigError(
        f"the model {folder or model!r} has no fast (Rust) tokenizer (tokenizer.json); outboxd's local "
        "backends need one"
    )


def decide_precision(requested: str, device_type: str, agreement: Callable[[str], float],
                     threshold: float | None = None) -> tuple[str, float | None]:
    """(the precision to run, the cosine measured for it or None). `agreement(p)`
    is the minimum cosine between p's vectors and fp32's over a sample.

    fp32 -> fp32. auto -> fp16 on CUDA where it agrees, else fp32 (on a CPU fp16
    is slow, and bf16 is asked for explicitly). fp16/bf16 -> kept where it agrees,
    else ConfigError naming the cosine. threshold: AGREEMENT unless given."""
    threshold = AGREEMENT if threshold is None else threshold
    if requested == "fp32":
        return "fp32", None
    if requested == "auto":
        if device_type != "cuda":
            return "fp32", None
        cosine = agreement("fp16")
        if cosine >= threshold:
            return "fp16", cosine
        log.warning(
            "fp16 vectors do not agree with fp32 on this model; encoding in fp32",
            extra={"cosine": round(cosine, 6), "threshold": threshold},
        )
        return "fp32", cosine
    if requested not in ("fp16", "bf16"):
        raise ConfigError(f"unknown precision {requested!r}: auto, fp32, fp16 or bf16")
    cosine = agreement(requested)
    if cosine < threshold:
        raise ConfigError(
            f"OUTBOXD_EMBEDDING__PRECISION={requested}: its vectors do not agree with fp32 on this model and "
            f"device (minimum cosine {cosine:.6f} over {len(AGREEMENT_SAMPLE)} sample texts, {threshold} "
            "needed); use fp32 or auto"
        )
    return requested, cosine


class ModuleInterrupter:
    """Makes a torch model's forward pass raise ForwardInterrupted at its next
    module once set (a pre-hook on every leaf module: one attribute read each)."""

    def __init__(self, model) -> None:
        self._set = False
        self.handles = [m.register_forward_pre_hook(self._hook) for m in model.modules() if not any(m.children())]

    def _hook(self, module, args) -> None:
        if self._set:
            raise ForwardInterrupted()

    def __call__(self) -> None:
        self._set = True


def encode_now(forward, tokenizer, texts: list[str], window: int, batch: int = 16) -> np.ndarray:
    """Vectors of texts through `forward`, synchronously, without a stage (checks)."""
    tok = window_tokenizer(tokenizer, window)
    ids = [e.ids for e in tok.encode_batch(texts)]
    out: np.ndarray | None = None
    for idx in plan_batches([len(i) for i in ids], batch):
        v = np.asarray(forward(*pad([ids[i] for i in idx])), dtype=np.float32)
        if out is None:
            out = np.empty((len(texts), v.shape[1]), dtype=np.float32)
        out[idx] = v
    assert out is not None
    return out


class SentenceTransformersBackend(StagedBackend):
    kind = "sentence-transformers"

    def __init__(self, settings: SentenceTransformersSettings) -> None:
        self._settings = settings  # the shared settings and sentence-transformers' own
        self._precision_setting = settings.precision
        _, self._source = resolve_model(settings.name)
        self.model = None  # the SentenceTransformer, once loaded (benchmarks compare with its own encode())
        self.precision: str | None = None  # what runs: fp32, fp16 or bf16
        self.agreement: float | None = None  # the cosine measured for a lower precision
        self.batch_size: int | None = None

    def _load(self) -> BackendInfo:
        import torch

        s = self._settings
        model = load_sentence_transformer(
            self._source, device=s.device, max_seq_length=s.max_seq_length, configured=s.name
        )
        model.eval()
        window = int(model.max_seq_length)
        tokenizer = rust_tokenizer(model, self._source if os.path.isdir(self._source) else None)
        device = model.device
        names = getattr(getattr(model, "tokenizer", None), "model_input_names", None) or []
        with_types = "token_type_ids" in names

        on_cuda = device.type == "cuda"
        workers, threads = (1, None) if on_cuda else cpu_workers()

        def make_forward(m, dtype_out=torch.float32):
            def forward(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
                if threads is not None and torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)  # process-wide; cheap to check each pass
                ids = torch.from_numpy(input_ids).to(device, non_blocking=True)
                features = {"input_ids": ids, "attention_mask": torch.from_numpy(attention_mask).to(device, non_blocking=True)}
                if with_types:
                    features["token_type_ids"] = torch.zeros_like(ids)
                with torch.inference_mode():
                    out = m.forward(features)["sentence_embedding"].to(dtype_out)
                    if s.normalize:
                        out = torch.nn.functional.normalize(out, dim=-1)
                    return out.cpu().numpy()

            return forward

        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
        reference: list[np.ndarray] = []

        def agreement(precision: str) -> float:
            if not reference:
                reference.append(encode_now(make_forward(model), tokenizer, AGREEMENT_SAMPLE, window))
            lower = copy.deepcopy(model).to(dtypes[precision])
            try:
                got = encode_now(make_forward(lower), tokenizer, AGREEMENT_SAMPLE, window)
            except RuntimeError as exc:  # the device cannot run this precision
                log.warning("cannot encode in %s here: %s", precision, exc)
                return float("-inf")
            finally:
                del lower
            return cosine_min(reference[0], got)

        precision, cosine = decide_precision(self._precision_setting, device.type, agreement)
        if precision != "fp32":
            model = model.to(dtypes[precision])
        self.model, self.precision, self.agreement = model, precision, cosine
        self.batch_size = s.batch_size or (CUDA_BATCH if on_cuda else CPU_BATCH)
        max_tokens = CUDA_TOKENS if on_cuda and not s.batch_size else None
        dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dimension = int(dim_of())
        self.stage = EncodeStage(
            tokenizer,
            make_forward(model),
            window=window,
            dimension=dimension,
            max_batch=self.batch_size,
            max_tokens=max_tokens,
            interrupt=ModuleInterrupter(model),
            lowercase=bool(getattr(model[0], "do_lower_case", False)),
            workers=workers,
            name="torch",
        )
        description = f"torch {device} {precision}"
        if threads:
            description += f" {workers}x{threads} threads"
        if cosine is not None:
            description += f" (cosine {cosine:.5f} to fp32)"
        log.info("torch backend ready", extra={"device": str(device), "precision": precision, "batch": self.batch_size})
        return BackendInfo(dimension=dimension, max_seq_length=window, variant=None, description=description)
