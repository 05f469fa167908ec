"""The ONNX export and its cache, for the onnx backend (daemon.embedding.onnx_backend).

<data dir>/models/<model>-w<window>-opset<n>-<fp32|int8>[-fused]-<digest>/ holds
model.onnx and meta.json (its size and SHA-256, the agreement measured at export,
how long the export took). An entry is made in a temporary folder and renamed into
place, under a file lock per entry, so that two processes starting together
export once and neither reads a half-written model; an entry whose model.onnx
does not match its meta.json is exported again. The digest covers the model's
config, its weight files (name, size, modification time), this export's version
and ONNX Runtime's minor version.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from daemon.embedding.folder_model import FolderModel, pool, read_json
from daemon.embedding.model_source import quiet_transformers
from daemon.embedding.samples import AGREEMENT, AGREEMENT_SAMPLE, cosine_min
from daemon.embedding.tokens import pad, window_tokenizer
from daemon.errors import ConfigError

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_VERSION = 1  # bump when the export changes what it writes: old cache entries are not reused

exports = 0  # exports this process ran (the tests prove the cache is reused)


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(
            "OUTBOXD_EMBEDDING__BACKEND=onnx needs ONNX Runtime: pip install 'outboxd[onnx]'"
        ) from exc
    return onnxruntime


# --- the cache ------------------------------------------------------------------------------
def cache_key(name: str, model: FolderModel, quantize: bool, optimize: bool = False) -> str:
    import onnxruntime

    ort_minor = ".".join(onnxruntime.__version__.split(".")[:2])
    ident = {"model": model.identity(), "export": EXPORT_VERSION, "onnxruntime": ort_minor, "optimize": optimize}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[-60:] or "model"
    kind = ("int8" if quantize else "fp32") + ("-fused" if optimize else "")
    return f"{slug}-w{model.window}-opset{OPSET}-{kind}-{digest}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def valid_entry(entry: Path) -> dict | None:
    """The entry's meta.json where its model.onnx is whole (size and SHA-256 match)."""
    meta = read_json(entry / "meta.json")
    model = entry / "model.onnx"
    try:
        if not meta or model.stat().st_size != meta.get("size") or _sha256(model) != meta.get("sha256"):
            return None
    except OSError:
        return None
    return meta


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock between processes (flock; released if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock, the rename still keeps entries whole
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _install(tmp: Path, entry: Path) -> None:
    """Move a finished tmp folder into place (replacing a bad entry) atomically."""
    for p in tmp.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    if entry.exists():
        trash = entry.with_name(f".trash-{entry.name}-{uuid.uuid4().hex[:8]}")
        os.rename(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, entry)


def ensure_exported(root: Path, name: str, model: FolderModel, *, quantize: bool, optimize: bool = False) -> tuple[Path, dict, bool]:
    """(the entry folder, its meta, whether this call exported it): the cached
    export of the model, made now where it is missing or damaged. optimize: run
    ONNX Runtime's transformer optimizer (for CUDA; on a CPU it measured slower)."""
    key = cache_key(name, model, quantize, optimize)
    entry = root / key
    meta = valid_entry(entry)
    if meta is not None:
        return entry, meta, False
    with _file_lock(root / f".{key}.lock"):
        meta = valid_entry(entry)  # another process may have made it while this one waited
        if meta is not None:
            return entry, meta, False
        for stale in root.glob(f".tmp-{key}-*"):  # left by a process that died exporting (the lock is ours)
            shutil.rmtree(stale, ignore_errors=True)
        if entry.exists():
            log.warning("ONNX model cache entry is damaged; exporting it again", extra={"entry": str(entry)})
        source = None
        if quantize:
            source, _, _ = ensure_exported(root, name, model, quantize=False, optimize=optimize)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
        try:
            meta = _export(model, tmp, quantize=quantize, fp32_entry=source, optimize=optimize)
            _install(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        global exports
        exports += 1
        return entry, meta, True


class _OnnxRuntimeChatter(logging.Filter):
    """ONNX Runtime's optimizer and quantizer log a line per tensor at INFO (on the
    root logger) and warn about pre-processing it does not need; an export keeps
    their errors only (what it concludes, it logs itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or f"{os.sep}onnxruntime{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_onnxruntime():
    root = logging.getLogger()
    chatter = _OnnxRuntimeChatter()
    targets = [root, *root.handlers]
    for t in targets:
        t.addFilter(chatter)
    try:
        yield
    finally:
        for t in targets:
            t.removeFilter(chatter)


def _export(model: FolderModel, out: Path, *, quantize: bool, fp32_entry: Path | None, optimize: bool) -> dict:
    with _quiet_onnxruntime():
        return _export_quietly(model, out, quantize=quantize, fp32_entry=fp32_entry, optimize=optimize)


def _export_quietly(model: FolderModel, out: Path, *, quantize: bool, fp32_entry: Path | None, optimize: bool) -> dict:
    started = time.perf_counter()
    target = out / "model.onnx"
    details: dict[str, Any] = {}
    if quantize:
        assert fp32_entry is not None
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(fp32_entry / "model.onnx"), str(target), weight_type=QuantType.QInt8, per_channel=True,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        details["quantized_from"] = fp32_entry.name
    else:
        details.update(_export_fp32(model, target, optimize=optimize))
    reference = details.pop("_reference", None)
    if reference is None:  # int8: compare with the fp32 export it came from
        reference = _run_sample(fp32_entry / "model.onnx", model)
    got = _run_sample(target, model)
    cosine = cosine_min(got, reference)
    if not quantize and cosine < AGREEMENT:
        raise ConfigError(
            f"the ONNX export of {model.folder} does not agree with torch (minimum cosine {cosine:.6f} over "
            f"{len(AGREEMENT_SAMPLE)} sample texts, {AGREEMENT} needed); use OUTBOXD_EMBEDDING__BACKEND=sentence-transformers"
        )
    meta = {
        "size": target.stat().st_size,
        "sha256": _sha256(target),
        "opset": OPSET,
        "window": model.window,
        "quantize": quantize,
        "agreement_min_cosine": round(cosine, 6),
        "agreement_with": "onnx fp32" if quantize else "torch fp32",
        "export_seconds": round(time.perf_counter() - started, 2),
        **details,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    log.info("exported the model to ONNX", extra={k: v for k, v in meta.items() if k != "sha256"})
    return meta


def _export_fp32(model: FolderModel, target: Path, *, optimize: bool) -> dict:
    """torch.onnx.export of the transformer (eager attention, so that the
    optimizer recognises and fuses it), then the optimizer where it applies."""
    quiet_transformers()
    import torch
    from transformers import AutoModel

    try:
        hf = AutoModel.from_pretrained(str(model.folder), attn_implementation="eager")
    except TypeError:  # pragma: no cover - older transformers
        hf = AutoModel.from_pretrained(str(model.folder))
    hf.eval()
    with_types = "token_type_ids" in _tokenizer_inputs(model)

    class Transformer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = hf

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            return self.model(**kwargs).last_hidden_state

    wrapper = Transformer().eval()
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])
    dummy = torch.ones((2, 8), dtype=torch.long)
    args = (dummy, dummy) + ((torch.zeros_like(dummy),) if with_types else ())
    raw = target.with_name("raw.onnx")
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes about Python conditionals (constant for BERT)
        kwargs = dict(
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names + ["last_hidden_state"]},
            opset_version=OPSET,
            do_constant_folding=True,
        )
        try:
            torch.onnx.export(wrapper, args, str(raw), dynamo=False, **kwargs)
        except TypeError:  # pragma: no cover - a torch without the dynamo switch
            torch.onnx.export(wrapper, args, str(raw), **kwargs)
    # torch's reference for the agreement check, on the same tokenization
    reference = _run_sample_torch(hf, model, with_types)
    details: dict[str, Any] = {"optimized": False}
    if optimize:
        details.update(_optimize(raw, target, model))
    if not details["optimized"]:
        import onnx

        onnx.save(onnx.load(str(raw)), str(target))  # one file: no external data beside it
    raw.unlink(missing_ok=True)
    details["_reference"] = reference
    return details


def _optimize(raw: Path, target: Path, model: FolderModel) -> dict:
    """ONNX Runtime's transformer optimizer (fused attention, SkipLayerNorm, GELU)
    for the model types it knows; the plain export where it does not apply."""
    kind = str(model.config.get("model_type", ""))
    known = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "mpnet": "bert",
             "electra": "bert"}
    if kind not in known:
        return {"optimized": False, "optimizer": f"model_type {kind!r} not known to it"}
    try:
        from onnxruntime.transformers import optimizer

        opt = optimizer.optimize_model(
            str(raw), model_type=known[kind], num_heads=int(model.config.get("num_attention_heads", 0)),
            hidden_size=int(model.config.get("hidden_size", 0)), opt_level=0,
        )
        fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(str(target))
        return {"optimized": True, "fused": fused}
    except Exception as exc:  # the optimizer is a best effort: the plain export works
        log.warning("ONNX Runtime's transformer optimizer failed; using the plain export", extra={"error": repr(exc)})
        return {"optimized": False, "optimizer": repr(exc)[:200]}


def _tokenizer_inputs(model: FolderModel) -> list[str]:
    tc = read_json(model.folder / "tokenizer_config.json")
    names = tc.get("model_input_names")
    if names:
        return list(names)
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if model.config.get("type_vocab_size", 0) else [])


def _sample_batches(model: FolderModel):
    tok = window_tokenizer(Tokenizer.from_file(str(model.folder / "tokenizer.json")), model.window)
    texts = [t.lower() for t in AGREEMENT_SAMPLE] if model.lowercase else AGREEMENT_SAMPLE
    ids = [e.ids for e in tok.encode_batch(texts)]
    for start in range(0, len(ids), 8):
        yield pad(ids[start : start + 8])


def _run_sample(path: Path, model: FolderModel) -> np.ndarray:
    ort = require_onnxruntime()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in sess.get_inputs()}
    out = []
    for ids, mask in _sample_batches(model):
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = sess.run(None, {k: v for k, v in feed.items() if k in inputs})[0]
        out.append(pool(hidden, mask, model.pooling))
    return np.concatenate(out)


def _run_sample_torch(hf, model: FolderModel, with_types: bool) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for ids, mask in _sample_batches(model):
            kwargs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
            if with_types:
                kwargs["token_type_ids"] = torch.zeros_like(kwargs["input_ids"])
            out.append(pool(hf(**kwargs).last_hidden_state.float().numpy(), mask, model.pooling))
    return np.concatenate(out)
