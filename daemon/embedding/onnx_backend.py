"""The onnx backend: ONNX Runtime (CPU; the CUDA provider where OUTBOXD_EMBEDDING__DEVICE says
cuda and onnxruntime-gpu provides it), through the shared encode stage.

    pip install 'outboxd[onnx]'
    OUTBOXD_EMBEDDING__BACKEND=onnx   [OUTBOXD_EMBEDDING__QUANTIZE=true]  [OUTBOXD_EMBEDDING__THREADS=4]

The model is exported offline from the local model folder on first use and
cached under <data dir>/models/ (daemon.embedding.onnx_export: written
atomically under a file lock, checked by size and SHA-256, exported again when
damaged): the transformer through torch.onnx.export (TorchScript exporter, eager
attention, dynamic batch and sequence axes); for the CUDA provider also ONNX
Runtime's transformer optimizer (fused attention, SkipLayerNorm, BiasGelu). On a
CPU the optimizer's fused graph measured 5-10% slower than the plain export under
ONNX Runtime's own graph optimisations (MiniLM-L6, 2 Zen 4 cores), so it is not
used there. int8 is ONNX Runtime's dynamic quantization of the fp32 export, per
channel (per tensor measured a minimum cosine of 0.86). Pooling (the folder's
1_Pooling/config.json) and normalisation are done in numpy
(daemon.embedding.folder_model).

On a CPU the session runs one forward pass per core side by side (one intra-op
thread each; OUTBOXD_EMBEDDING__THREADS=n instead runs one pass on n threads).

fp32 vectors agree with torch's (the export checks cosine >= 0.999 over a sample
and records it in meta.json), so they keep the fingerprint (variant None). int8
vectors do not quite (about 0.98 minimum, 0.99 mean on MiniLM-L6): they get
variant "onnx-int8", their own fingerprint, so moving to them is a reindex.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from daemon.embedding.backend import BackendInfo, StagedBackend
from daemon.embedding.folder_model import FolderModel, normalize, pool
from daemon.embedding.model_source import model_folder, resolve_model
from daemon.embedding.onnx_export import ensure_exported, require_onnxruntime
from daemon.embedding.settings import OnnxSettings
from daemon.embedding.stage import EncodeStage, ForwardInterrupted
from daemon.embedding.threads import cores, cpu_workers

log = logging.getLogger(__name__)

CPU_BATCH = 8
CPU_TOKENS: int | None = None  # padded tokens per forward pass on a CPU (None: count only)
CUDA_BATCH = 256
CUDA_TOKENS = 256 * 128
INT8_VARIANT = "onnx-int8"
# ONNX Runtime's worker threads spin between runs by default: on a small machine that takes
# the cores the tokenizer thread, the event loop and the databases need (and measured slower
# on a busy 2-core machine: 32.6 texts/s without spinning against 26.8 with)
SPIN = False


# --- the backend ----------------------------------------------------------------------------
class OnnxBackend(StagedBackend):
    kind = "onnx"

    def __init__(self, settings: OnnxSettings, cache_root: Path) -> None:
        self._settings = settings  # the shared settings and onnx's own
        self.name, self._source = resolve_model(settings.name)
        self.cache_root = Path(cache_root)
        self.entry: Path | None = None  # the cache entry in use
        self.meta: dict | None = None
        self.exported = False  # whether load() exported (False: the cache was reused)
        self.batch_size: int | None = None
        self.workers = 1  # forward threads (one per core on a CPU, sharing the session)
        self.threads = 1  # ONNX Runtime intra-op threads per forward pass

    def _load(self) -> BackendInfo:
        ort = require_onnxruntime()

        s = self._settings
        folder = FolderModel(model_folder(self._source), s.max_seq_length)
        quantize = self._settings.quantize
        started = time.perf_counter()
        optimize = self._wants_cuda(ort)  # fused attention pays on a GPU; on a CPU it measured 5-10% slower
        if optimize:
            self.workers, self.threads = 1, self._settings.threads or cores()
        else:
            self.workers, self.threads = cpu_workers(self._settings.threads)
        self.entry, self.meta, self.exported = ensure_exported(
            self.cache_root, self.name, folder, quantize=quantize, optimize=optimize
        )
        try:
            session = self._session(ort, cuda=optimize)
        except Exception as exc:  # whole on disk, yet not loadable (another onnxruntime wrote it?)
            log.warning("cannot load the cached ONNX model; exporting it again", extra={"error": repr(exc)})
            (self.entry / "meta.json").unlink(missing_ok=True)
            self.entry, self.meta, self.exported = ensure_exported(
                self.cache_root, self.name, folder, quantize=quantize, optimize=optimize
            )
            session = self._session(ort, cuda=optimize)
        inputs = {i.name for i in session.get_inputs()}
        run_options = ort.RunOptions()
        modes, norm = folder.pooling, folder.normalize or s.normalize

        def forward(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
            feed = {"input_ids": input_ids, "attention_mask": attention_mask}
            if "token_type_ids" in inputs:
                feed["token_type_ids"] = np.zeros_like(input_ids)
            try:
                hidden = session.run(["last_hidden_state"], feed, run_options)[0]
            except Exception:
                if run_options.terminate:
                    raise ForwardInterrupted() from None
                raise
            v = pool(hidden, attention_mask, modes)
            return normalize(v) if norm else v

        def interrupt() -> None:
            run_options.terminate = True

        on_cuda = "CUDAExecutionProvider" in session.get_providers()
        self.batch_size = s.batch_size or (CUDA_BATCH if on_cuda else CPU_BATCH)
        max_tokens = None if s.batch_size else (CUDA_TOKENS if on_cuda else CPU_TOKENS)
        tokenizer = Tokenizer.from_file(str(folder.folder / "tokenizer.json"))
        self.stage = EncodeStage(
            tokenizer, forward, window=folder.window, dimension=folder.dimension, max_batch=self.batch_size,
            max_tokens=max_tokens, interrupt=interrupt, lowercase=folder.lowercase, workers=self.workers, name="onnx",
        )
        provider = "cuda" if on_cuda else "cpu"
        precision = "int8" if quantize else "fp32"
        log.info(
            "onnx backend ready",
            extra={"entry": str(self.entry), "exported": self.exported, "seconds": round(time.perf_counter() - started, 2),
                   "agreement": self.meta.get("agreement_min_cosine"), "batch": self.batch_size},
        )
        return BackendInfo(
            dimension=folder.dimension,
            max_seq_length=folder.window,
            variant=INT8_VARIANT if quantize else None,
            description=f"onnxruntime {provider} {precision}" + (" optimized" if self.meta.get("optimized") else "")
            + f" {self.workers}x{self.threads} threads",
        )

    def _wants_cuda(self, ort) -> bool:
        device = (self._settings.device or "").lower()
        if not device.startswith("cuda"):
            return False
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return True
        log.warning("OUTBOXD_EMBEDDING__DEVICE=%s but this onnxruntime has no CUDA provider; running on the CPU", device)
        return False

    def _session(self, ort, cuda: bool):
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if not SPIN:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        if cuda:
            index = (self._settings.device or "").partition(":")[2] or "0"
            providers = [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
        assert self.entry is not None
        return ort.InferenceSession(str(self.entry / "model.onnx"), options, providers=providers)
