"""Varied texts for checking that two ways of computing a model's vectors agree
(fp16 or bf16 against fp32, ONNX against torch): short and long, prose, code,
numbers, other scripts, and texts longer than any usual window."""
from __future__ import annotations

import numpy as np

AGREEMENT = 0.999  # minimum cosine over the sample for two ways to count as the same vectors

_PROSE = (
    "PostgreSQL keeps every change in the outbox in the same transaction as the change itself, "
    "so a crash can never lose an event or publish one that was rolled back. The daemon claims "
    "events in batches, embeds the text of each chunk, and writes the points to Qdrant; a lease "
    "that is not renewed lets another worker take the batch over. "
)
_CODE = (
    "def retry(fn, attempts=5):\n    for i in range(attempts):\n        try:\n            return fn()\n"
    "        except TimeoutError:\n            time.sleep(2 ** i)\n    raise RuntimeError('gave up')\n"
)

AGREEMENT_SAMPLE: list[str] = [
    "hello",
    "a",
    "Deadlock detected; retrying the transaction.",
    "How do I rotate the Qdrant API key without downtime?",
    "The quick brown fox jumps over the lazy dog.",
    "SELECT id, text FROM chunks WHERE document_id = $1 ORDER BY chunk_index;",
    _CODE,
    "Version 3.14.159 was released on 2026-11-28 at 07:45 UTC (build #20261128).",
    "Le démon lit la boîte d'envoi et écrit les vecteurs dans Qdrant.",
    "Der Daemon liest den Postausgang und schreibt die Vektoren nach Qdrant.",
    "デーモンはアウトボックスを読み、ベクトルをQdrantに書き込みます。",
    "守护进程读取发件箱并将向量写入 Qdrant。",
    "Демон читает исходящие события и записывает векторы в Qdrant.",
    "!!! ??? ... --- *** ### @@@",
    "URGENT: the disk is 98% full on db-replica-3; vacuum is blocked by a long transaction.",
    "user@example.com https://example.com/docs/outbox?page=2#claims",
    "emoji 🚀🔥✅ and symbols ∑∫√∞ ≤ ≥ ≠",
    "   leading and trailing spaces   ",
    "one two three four five six seven eight nine ten " * 3,
    "lorem ipsum dolor sit amet " * 12,
    _PROSE,
    _PROSE * 2,
    _PROSE * 4,  # longer than a 256-token window
    _CODE * 6,  # longer than a 256-token window
    ("word " * 600).strip(),  # far longer than any window, one repeated token
    "Tokenization once per text; the forward pass on its own thread; vectors in the caller's order.",
    "Invariant 2: one point per chunk with non-empty text, and the vector is the embedding of the text.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "The meeting was moved to Thursday because the release slipped by two days.",
    "Kubernetes restarts the pod when /healthz fails three times in a row.",
    "int8 quantization makes the CPU faster but the vectors differ slightly.",
]


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine between the rows of a and b."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float((a * b).sum(axis=1).min())
