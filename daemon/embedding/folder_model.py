"""What a sentence-transformers model folder says, for the backends that run its
transformer outside sentence-transformers (ONNX): the pooling (1_Pooling/config.json),
whether it normalises, its window, whether it lower-cases; and that pooling and
normalisation in numpy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from daemon.errors import ConfigError

_POOLING_ORDER = ("cls", "max", "mean", "mean_sqrt_len")  # sentence-transformers' concatenation order


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


class FolderModel:
    """The parts of a sentence-transformers folder the ONNX backend runs: a
    transformer, pooling, optionally normalisation; anything else is refused."""

    def __init__(self, folder: Path, max_seq_length: int | None) -> None:
        self.folder = folder
        modules = read_json(folder / "modules.json") or [
            {"path": "", "type": "sentence_transformers.models.Transformer"},
            {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        self.normalize = False
        pooling_path: Path | None = None
        for m in modules:
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Transformer":
                continue
            if kind == "Pooling":
                pooling_path = folder / m.get("path", "1_Pooling")
            elif kind == "Normalize":
                self.normalize = True
            else:
                raise ConfigError(
                    f"the onnx backend runs transformer + pooling (+ normalize) models; {folder} also has a "
                    f"{kind} module: use OUTBOXD_EMBEDDING__BACKEND=sentence-transformers for it"
                )
        self.config = read_json(folder / "config.json")
        if not self.config:
            raise ConfigError(f"{folder} has no readable config.json")
        pooling = read_json(pooling_path / "config.json") if pooling_path else {}
        modes = [m for m in _POOLING_ORDER if pooling.get(f"pooling_mode_{m}_tokens" if m != "cls" else "pooling_mode_cls_token")]
        if not pooling:
            modes = ["mean"]
        unsupported = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and
                       k not in {"pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_tokens",
                                 "pooling_mode_mean_sqrt_len_tokens"}]
        if unsupported or not modes:
            raise ConfigError(f"the onnx backend cannot pool like {pooling_path}: {unsupported or pooling}")
        self.pooling = modes
        hidden = int(self.config.get("hidden_size") or pooling.get("word_embedding_dimension"))
        self.dimension = hidden * len(modes)
        st = read_json(folder / "sentence_bert_config.json")
        self.lowercase = bool(st.get("do_lower_case"))
        window = max_seq_length or st.get("max_seq_length")
        if not window:
            limits = [read_json(folder / "tokenizer_config.json").get("model_max_length"),
                      self.config.get("max_position_embeddings")]
            valid = [x for x in limits if isinstance(x, int) and x < 10**6]  # tokenizers say 10**30 for "none"
            window = min(valid) if valid else 512
        self.window = int(window)
        if not (folder / "tokenizer.json").is_file():
            raise ConfigError(f"{folder} has no tokenizer.json; the onnx backend needs a fast (Rust) tokenizer")

    def identity(self) -> dict:
        """What the export depends on: the config and the weights' files (name, size,
        modification time; not their bytes, which would cost a read of the weights
        at every start)."""
        weights = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in self.folder.iterdir()
            if p.suffix in (".safetensors", ".bin") and p.is_file()
        )
        return {"config": self.config, "weights": weights}


def pool(hidden: np.ndarray, mask: np.ndarray, modes: list[str]) -> np.ndarray:
    """sentence-transformers' Pooling, in numpy: hidden (n, L, d), mask (n, L)."""
    m = mask.astype(hidden.dtype)
    counts = np.maximum(m.sum(axis=1, keepdims=True), 1e-9)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(np.where(m[:, :, None] > 0, hidden, np.float32(-1e9)).max(axis=1))
        else:
            summed = np.matmul(m[:, None, :], hidden)[:, 0, :]
            parts.append(summed / counts if mode == "mean" else summed / np.sqrt(counts))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def normalize(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
