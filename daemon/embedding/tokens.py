"""Token batches for a forward pass: a Rust tokenizer cut to the model's window,
the batch planner (length-sorted, bounded by texts and padded tokens) and
padding. Pure functions: the encode stage and the ONNX export use them."""
from __future__ import annotations

import numpy as np


def window_tokenizer(tokenizer, window: int):
    """A copy of a Rust tokenizer that truncates to the window and does not pad
    (padding is per batch, by pad())."""
    tok = tokenizer.__class__.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length=window)
    return tok


def pad(rows: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64, right-padded to the longest row."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max()) if len(rows) else 0
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return ids, mask


def plan_batches(lengths: list[int], max_batch: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indexes into lengths, sorted by length, cut into batches of at most
    max_batch texts and (when set) max_tokens padded tokens (texts × the longest);
    a text longer than max_tokens goes alone."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        n = len(current) + 1
        if current and (n > max_batch or (max_tokens is not None and n * lengths[i] > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
