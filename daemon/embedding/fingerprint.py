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

from daemon.errors import ConfigError, ModelMismatchError


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


def settings_for(fingerprint: ModelFingerprint) -> str:
    """The settings that make vectors of this fingerprint: what to set to keep
    (or go back to) a collection that records it. One place for every message
    that explains a model mismatch, right for every backend variant."""
    window = f" OUTBOXD_EMBEDDING__MAX_SEQ_LENGTH={fingerprint.max_seq_length}" if fingerprint.max_seq_length else ""
    base = (f"OUTBOXD_EMBEDDING__NAME={fingerprint.name}{window} "
            f"OUTBOXD_EMBEDDING__NORMALIZE={str(fingerprint.normalized).lower()}")
    variant = fingerprint.variant
    if variant is None:
        backend = ("with a backend whose vectors agree with the reference: OUTBOXD_EMBEDDING__BACKEND="
                   "sentence-transformers, or onnx without OUTBOXD_EMBEDDING__QUANTIZE")
    elif variant == "onnx-int8":
        backend = "OUTBOXD_EMBEDDING__BACKEND=onnx OUTBOXD_EMBEDDING__QUANTIZE=true"
    elif variant.startswith("remote:"):
        backend = (f"OUTBOXD_EMBEDDING__BACKEND=http OUTBOXD_EMBEDDING__MODEL={variant.removeprefix('remote:')} "
                   "OUTBOXD_EMBEDDING__URL=<the endpoint that made them>")
    else:
        backend = f"and the backend that made variant {variant!r}"
    return f"{base} {backend}"


def mismatch_advice(recorded: ModelFingerprint, configured: ModelFingerprint, collection: str) -> str:
    """Why a collection cannot take this process's vectors, and the three ways on."""
    return (
        f"Qdrant collection {collection!r} holds vectors of {recorded}, but outboxd is configured with "
        f"{configured}. Mixing them would make search meaningless. To keep this collection, set "
        f"{settings_for(recorded)}; to move to the new model without downtime, run `outboxd reindex` with the "
        "new settings; or set OUTBOXD_COLLECTION to a new name to build a separate collection from PostgreSQL."
    )


def check_fingerprint(recorded: ModelFingerprint | None, configured: ModelFingerprint, alias: str,
                      collection: str) -> None:
    """The one check that a collection's vectors are the configured model's (invariant
    8), with its one message each way: the daemon's start, search, reconcile, reindex
    and status ask it. ModelMismatchError where another model made them; ConfigError
    where the collection records no model at all."""
    if recorded is None:
        raise ConfigError(
            f"Qdrant collection {collection!r} (alias {alias!r}) records no outboxd model fingerprint, so "
            "the model that made its vectors is unknown and no vector can be matched to them. Point "
            "OUTBOXD_COLLECTION at a new name, or delete that collection to rebuild it from PostgreSQL."
        )
    if recorded != configured:
        raise ModelMismatchError(mismatch_advice(recorded, configured, alias))
