"""What must match for two vectors to be comparable (invariant 8).

A collection records the fingerprint of the model that made its vectors; a
process whose fingerprint differs may not write to it (a reindex moves to the
new one). The id is a short hash of the fields, so it is stored with every
point and compared cheaply.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import orjson


@dataclass(frozen=True)
class ModelFingerprint:
    """The model, its dimension, normalisation, the window it reads (a text cut
    at 128 tokens does not embed like the same text cut at 256), and the
    variant: None where the vectors agree with the reference (sentence-
    transformers in fp32, within cosine 0.999: fp16 on a GPU, fp32 ONNX), else
    what makes them differ ("onnx-int8", "remote:<model>").

    With variant None the id and as_dict() are exactly what they were before the
    field existed, so collections made then keep matching."""

    name: str
    dimension: int
    normalized: bool = True
    max_seq_length: int | None = None
    variant: str | None = None

    @functools.cached_property  # read per chunk by the apply core: computed once
    def id(self) -> str:
        raw = orjson.dumps(self._fields())
        return hashlib.sha256(raw).hexdigest()[:16]

    def _fields(self) -> dict:
        fields = {
            "name": self.name,
            "dimension": self.dimension,
            "normalized": self.normalized,
            "max_seq_length": self.max_seq_length,
        }
        if self.variant is not None:  # absent, not null: the ids of variant-less fingerprints stay as they were
            fields["variant"] = self.variant
        return fields

    def as_dict(self) -> dict:
        return {**self._fields(), "id": self.id}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFingerprint":
        window = d.get("max_seq_length")
        return cls(
            d["name"],
            int(d["dimension"]),
            bool(d["normalized"]),
            int(window) if window else None,
            d.get("variant") or None,
        )

    def __str__(self) -> str:
        norm = "normalized" if self.normalized else "raw"
        variant = f", {self.variant}" if self.variant else ""
        return f"{self.name} ({self.dimension} dims, {norm}, {self.max_seq_length or '?'} tokens{variant})"
