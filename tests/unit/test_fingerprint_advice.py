"""One function writes what to set to keep a collection (daemon.embedding.fingerprint),
and it is right for every backend variant: every mismatch message uses it."""
from __future__ import annotations

import pytest

from daemon.embedding.fingerprint import ModelFingerprint, mismatch_advice, settings_for

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
FP32 = ModelFingerprint(MINILM, 384, True, 256)
INT8 = ModelFingerprint(MINILM, 384, True, 256, "onnx-int8")
REMOTE = ModelFingerprint("bge-small", 384, True, 512, "remote:bge-small")


def test_an_int8_daemon_against_an_fp32_collection_is_told_to_leave_int8():
    advice = mismatch_advice(FP32, INT8, "chunks")
    keep = advice.split("To keep this collection, set ", 1)[1].split(";", 1)[0]
    assert f"OUTBOXD_EMBEDDING__NAME={MINILM}" in keep and "OUTBOXD_EMBEDDING__MAX_SEQ_LENGTH=256" in keep
    assert "QUANTIZE=true" not in keep  # not "start with the model it already runs"
    assert "without OUTBOXD_EMBEDDING__QUANTIZE" in keep
    assert "outboxd reindex" in advice and "OUTBOXD_COLLECTION" in advice


def test_an_fp32_daemon_against_an_int8_collection_is_told_to_quantize():
    keep = settings_for(INT8)
    assert "OUTBOXD_EMBEDDING__BACKEND=onnx OUTBOXD_EMBEDDING__QUANTIZE=true" in keep


@pytest.mark.parametrize("fp, says", [
    (REMOTE, "OUTBOXD_EMBEDDING__BACKEND=http OUTBOXD_EMBEDDING__MODEL=bge-small"),
    (ModelFingerprint(MINILM, 384, False, None), "OUTBOXD_EMBEDDING__NORMALIZE=false"),
    (ModelFingerprint("m", 8, True, None, "something-else"), "variant 'something-else'"),
])
def test_every_variant_names_its_own_settings(fp, says):
    keep = settings_for(fp)
    assert says in keep and f"OUTBOXD_EMBEDDING__NAME={fp.name}" in keep
    assert ("OUTBOXD_EMBEDDING__MAX_SEQ_LENGTH" in keep) == (fp.max_seq_length is not None)
