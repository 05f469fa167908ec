"""The encode stage's logic with a tiny tokenizer and fake forward passes (no
model): callers get their own vectors in their own order, waiting callers are
batched together, cancelled callers are not forwarded, close() and interpreter
exit never wait for a forward pass; plus the precision decision, the batch
planner and the fingerprint's compatibility."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from daemon.config import Settings
from daemon.embedding.backend import Backend, BackendInfo, Encoded
from daemon.embedding.embedder import Embedder
from daemon.embedding.embedder import ModelFingerprint as ReExported
from daemon.embedding.fingerprint import ModelFingerprint
from daemon.embedding.stage import EncoderClosedError, EncodeStage
from daemon.embedding.tokens import pad, plan_batches
from daemon.embedding.torch_backend import decide_precision
from daemon.errors import ConfigError, is_transient

REPO = Path(__file__).resolve().parents[2]
WORDS = [f"w{i}" for i in range(200)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
VOCAB = {t: i for i, t in enumerate(SPECIAL + WORDS)}
CLS, SEP = VOCAB["[CLS]"], VOCAB["[SEP]"]


def tiny_tokenizer() -> Tokenizer:
    """Word-level: "w3 w7" -> [CLS] w3 w7 [SEP]."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    return tok


def text_of(n_words: int, first: int) -> str:
    return " ".join(WORDS[(first + k) % len(WORDS)] for k in range(n_words))


def expected_vector(text: str, window: int) -> np.ndarray:
    ids = [CLS] + [VOCAB[w] for w in text.split()] + [SEP]
    if len(ids) > window:
        ids = ids[: window - 1] + [SEP]
    return np.array([len(ids), sum(ids), ids[1] if len(ids) > 2 else -1], dtype=np.float32)


class FakeForward:
    """Vector of a row: (tokens, sum of ids, first word's id). Records each call's
    input; `gate` (when set) holds every call until released; `delay` sleeps."""

    def __init__(self, *, gate: bool = False, delay: float = 0.0) -> None:
        self.calls: list[np.ndarray] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not gate:
            self.release.set()
        self.delay = delay
        self.lock = threading.Lock()
        self.active = self.most_active = 0

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls.append(ids.copy())
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.started.set()
        self.release.wait(30)
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        lengths = mask.sum(axis=1)
        return np.stack([lengths, (ids * mask).sum(axis=1), np.where(lengths > 2, ids[:, 1], -1)], axis=1).astype(np.float32)


def make_stage(forward, *, window: int = 64, max_batch: int = 4, max_tokens: int | None = None,
               workers: int = 1) -> EncodeStage:
    return EncodeStage(tiny_tokenizer(), forward, window=window, dimension=3, max_batch=max_batch,
                       max_tokens=max_tokens, workers=workers, name="test")


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


# --- ordering and merging -----------------------------------------------------------------------
async def test_concurrent_callers_get_their_own_vectors_in_their_own_order():
    forward = FakeForward()
    stage = make_stage(forward, max_batch=4)
    rng = np.random.default_rng(1)
    callers = [[text_of(int(rng.integers(1, 40)), int(rng.integers(0, 200))) for _ in range(int(rng.integers(3, 12)))]
               for _ in range(5)]
    try:
        results = await asyncio.gather(*(stage.encode(texts) for texts in callers))
    finally:
        stage.close()
    for texts, got in zip(callers, results):
        assert got.vectors.shape == (len(texts), 3)
        assert got.vectors.dtype == np.float32
        want = np.stack([expected_vector(t, 64) for t in texts])
        np.testing.assert_array_equal(got.vectors, want)
    # global length bucketing: within a batch the rows are (nearly) equally long, and
    # batches hold texts of several callers
    assert sum(len(c) for c in forward.calls) == sum(len(t) for t in callers)


async def test_forward_threads_side_by_side_keep_the_order_and_count_busy_time_once():
    forward = FakeForward(delay=0.05)
    stage = make_stage(forward, max_batch=2, workers=2)
    callers = [[text_of(1 + (7 * i + j) % 30, i * 10 + j) for j in range(9)] for i in range(3)]
    try:
        started = time.perf_counter()
        results = await asyncio.gather(*(stage.encode(texts) for texts in callers))
        wall = time.perf_counter() - started
    finally:
        stage.close()
    for texts, got in zip(callers, results):
        np.testing.assert_array_equal(got.vectors, np.stack([expected_vector(t, 64) for t in texts]))
    assert forward.most_active == 2  # two forward passes ran at once
    busy = stage.encoded_seconds()
    assert 0.05 * len(forward.calls) / 2 * 0.9 <= busy <= wall  # the union of the passes, not their sum


async def test_waiting_callers_are_batched_together():
    forward = FakeForward(gate=True)
    stage = make_stage(forward, max_batch=8)
    try:
        first = asyncio.create_task(stage.encode([text_of(3, 0)]))
        await wait_for(forward.started.is_set)  # the forward thread is busy with the first caller
        second = asyncio.create_task(stage.encode([text_of(5, 10), text_of(1, 20)]))
        third = asyncio.create_task(stage.encode([text_of(2, 30), text_of(9, 40)]))
        await wait_for(lambda: stage.waiting() == 4)  # both tokenized and waiting for the forward thread
        forward.release.set()
        a, b, c = await asyncio.gather(first, second, third)
    finally:
        stage.close()
    assert stage.forward_calls == 2, [len(x) for x in forward.calls]
    assert [len(x) for x in forward.calls] == [1, 4]  # the second pass merged both waiting callers
    # sorted by length within the merged batch
    lengths = (forward.calls[1] != 0).sum(axis=1)
    assert list(lengths) == sorted(lengths)
    np.testing.assert_array_equal(b.vectors[0], expected_vector(text_of(5, 10), 64))
    np.testing.assert_array_equal(c.vectors[1], expected_vector(text_of(9, 40), 64))


async def test_token_budget_cuts_batches():
    assert plan_batches([5, 1, 3, 9, 2], max_batch=10) == [[1, 4, 2, 0, 3]]
    assert plan_batches([5, 1, 3, 9, 2], max_batch=2) == [[1, 4], [2, 0], [3]]
    # at most 10 padded tokens: (1, 2, 3) pads to 9, then 5 alone... a 12-token text alone
    assert plan_batches([5, 1, 3, 12, 2], max_batch=10, max_tokens=10) == [[1, 4, 2], [0], [3]]
    ids, mask = pad([[1, 2, 3], [4]], pad_id=0)
    np.testing.assert_array_equal(ids, [[1, 2, 3], [4, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])


async def test_empty_call_and_forward_errors():
    class Boom(Exception):
        pass

    def forward(ids, mask):
        if (ids == VOCAB["w99"]).any():
            raise Boom("this batch cannot be encoded")
        return FakeForward()(ids, mask)

    stage = make_stage(forward, max_batch=1)
    try:
        empty = await stage.encode([])
        assert empty.vectors.shape == (0, 3) and empty.truncated == []
        with pytest.raises(Boom):
            await stage.encode([text_of(2, 0), "w99"])
        ok = await stage.encode([text_of(2, 5)])  # the stage goes on
        np.testing.assert_array_equal(ok.vectors[0], expected_vector(text_of(2, 5), 64))
    finally:
        stage.close()


# --- truncation ------------------------------------------------------------------------------
async def test_truncated_flags_and_ids_cut_like_sentence_transformers():
    forward = FakeForward()
    window = 8
    stage = make_stage(forward, window=window, max_batch=1)
    texts = [text_of(6, 0), text_of(7, 10), text_of(30, 20)]  # 8 tokens (fits), 9, 32
    try:
        got = await stage.encode(texts)
    finally:
        stage.close()
    assert got.truncated == [False, True, True]
    for ids in forward.calls:
        row = ids[0][ids[0] != 0]
        assert len(row) <= window
        assert row[0] == CLS and row[-1] == SEP  # the final [SEP] is kept
    np.testing.assert_array_equal(got.vectors[2], expected_vector(texts[2], window))


# --- cancellation and close ----------------------------------------------------------------------
async def test_cancelled_caller_is_not_forwarded():
    forward = FakeForward(gate=True)
    stage = make_stage(forward, max_batch=8)
    try:
        first = asyncio.create_task(stage.encode([text_of(2, 0)]))
        await wait_for(forward.started.is_set)
        doomed = asyncio.create_task(stage.encode([text_of(3, 150), text_of(4, 160)]))
        kept = asyncio.create_task(stage.encode([text_of(3, 100)]))
        await wait_for(lambda: stage.waiting() == 3)  # tokenized, batched, not yet forwarded
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        forward.release.set()
        await first
        got = await kept
    finally:
        stage.close()
    forwarded = np.concatenate([c.ravel() for c in forward.calls])
    assert VOCAB["w150"] not in forwarded and VOCAB["w160"] not in forwarded
    np.testing.assert_array_equal(got.vectors[0], expected_vector(text_of(3, 100), 64))


async def test_close_with_a_slow_forward_returns_at_once_and_fails_waiters():
    forward = FakeForward(delay=30)  # a forward pass that would take half a minute
    stage = make_stage(forward, max_batch=1)
    in_flight = asyncio.create_task(stage.encode([text_of(2, 0)]))
    waiting = asyncio.create_task(stage.encode([text_of(2, 1)]))
    await wait_for(forward.started.is_set)
    started = time.monotonic()
    stage.close()
    assert time.monotonic() - started < 1.0
    for task in (in_flight, waiting):
        with pytest.raises(EncoderClosedError, match="closed"):
            await asyncio.wait_for(task, 1.0)
    assert time.monotonic() - started < 1.0
    assert is_transient(EncoderClosedError())  # the events are retried, no attempt counted
    with pytest.raises(EncoderClosedError):
        await stage.encode(["w1"])


EXIT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, time
    sys.path.insert(0, {repo!r})
    from tests.unit.test_encode_stage import tiny_tokenizer
    from daemon.embedding.stage import EncodeStage
    import threading
    mode = sys.argv[1]
    interrupt = None
    running = threading.Event()
    if mode == "sleep":
        def forward(ids, mask):
            running.set()
            time.sleep(120)
    else:  # torch: a forward pass in C++ operators for minutes, as a model's is
        import torch
        from daemon.embedding.torch_backend import ModuleInterrupter
        torch.set_num_threads(1)
        model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
        x = torch.randn(256, 512)
        interrupt = ModuleInterrupter(model)
        def forward(ids, mask):
            running.set()
            with torch.inference_mode():
                for _ in range(10 ** 6):
                    model(x)
    stage = EncodeStage(tiny_tokenizer(), forward, window=16, dimension=3, max_batch=4, interrupt=interrupt)
    async def main():
        task = asyncio.create_task(stage.encode(["w1 w2"]))
        while not running.is_set():  # until the forward pass runs (it would for minutes)
            await asyncio.sleep(0.01)
        if len(sys.argv) > 2:
            stage.close()
        print("exiting", flush=True)
    asyncio.run(main())
    sys.exit(3)
    """
)


@pytest.mark.parametrize("mode", ["sleep", "torch", "torch-closed"])
def test_exit_does_not_wait_for_a_slow_encode(tmp_path, mode):
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT.format(repo=str(REPO)))
    args = [sys.executable, str(script), mode.split("-")[0]] + (["close"] if mode.endswith("closed") else [])
    started = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process waited for the encode in flight")
    assert "exiting" in out, err
    # the exit code is the program's own: not 134 (a thread re-entering Python from C++ while
    # the interpreter finalises aborts it: "terminate called without an active exception")
    assert proc.returncode == 3, (proc.returncode, err[-2000:])
    assert "terminate called" not in err
    assert time.monotonic() - started < 30


# --- the Embedder in front of a backend ----------------------------------------------------------------
class CountingBackend(Backend):
    kind = "fake"

    def __init__(self) -> None:
        self.stage = make_stage(FakeForward(), max_batch=8)
        self.calls: list[list[str]] = []

    async def load(self) -> BackendInfo:
        return BackendInfo(dimension=3, max_seq_length=64, variant=None, description="fake")

    async def encode(self, texts: list[str]) -> Encoded:
        self.calls.append(list(texts))
        return await self.stage.encode(texts)

    async def close(self) -> None:
        self.stage.close()

    def encoded_seconds(self) -> float:
        return self.stage.encoded_seconds()


async def test_embedder_caches_and_encodes_each_text_once():
    backend = CountingBackend()
    embedder = Embedder(Settings(database_url=None), backend=backend)
    fp = await embedder.load()
    assert fp == ModelFingerprint("sentence-transformers/all-MiniLM-L6-v2", 3, True, 64)
    try:
        texts = {"h1": text_of(3, 1), "h2": text_of(40, 2)}
        (a, n1), (b, n2) = await asyncio.gather(embedder.embed(texts), embedder.embed({"h1": texts["h1"], "h3": "w5"}))
        assert n1 + n2 == 3  # h1 encoded once, awaited by the other batch
        assert a["h1"] == b["h1"]
        assert isinstance(a["h1"].vector, list) and isinstance(a["h1"].vector[0], float)
        again, n = await embedder.embed(texts)
        assert n == 0 and embedder.cached("h2") and again["h2"] == a["h2"]
        assert embedder.encoded == 3 and embedder.cache_hits >= 3
        assert await embedder.embed_query("w7 w8") == expected_vector("w7 w8", 64).tolist()
        assert embedder.encode_seconds > 0
    finally:
        await embedder.close()


# --- precision ----------------------------------------------------------------------------------
def test_precision_decision():
    calls = []

    def agrees(cos):
        def measure(p):
            calls.append(p)
            return cos
        return measure

    assert decide_precision("fp32", "cuda", agrees(0.5)) == ("fp32", None) and calls == []
    assert decide_precision("auto", "cpu", agrees(1.0)) == ("fp32", None) and calls == []  # no fp16 on a CPU
    assert decide_precision("auto", "cuda", agrees(0.9995)) == ("fp16", 0.9995)
    assert decide_precision("auto", "cuda", agrees(0.99)) == ("fp32", 0.99)  # falls back
    assert decide_precision("bf16", "cpu", agrees(0.9999)) == ("bf16", 0.9999)  # kept
    assert decide_precision("fp16", "cuda", agrees(0.9991)) == ("fp16", 0.9991)
    with pytest.raises(ConfigError, match=r"bf16.*0\.987000"):
        decide_precision("bf16", "cpu", agrees(0.987))
    with pytest.raises(ConfigError, match=r"fp16.*-inf"):  # the device cannot run it at all
        decide_precision("fp16", "cpu", agrees(float("-inf")))


# --- the fingerprint --------------------------------------------------------------------------------
# computed with the code before the variant field existed; collections record these ids
TODAY = {
    ("sentence-transformers/all-MiniLM-L6-v2", 384, True, 256): "b9c6b5a44c63669a",
    ("sentence-transformers/all-MiniLM-L6-v2", 384, True, 128): "7cf368c99ff5e84b",
    ("sentence-transformers/all-MiniLM-L6-v2", 384, False, 256): "1ee3760f72956b3a",
    ("sentence-transformers/all-MiniLM-L6-v2", 384, True, None): "f49ec105f0e81049",
}


def test_fingerprint_without_variant_is_unchanged():
    assert ReExported is ModelFingerprint
    for fields, fid in TODAY.items():
        fp = ModelFingerprint(*fields)
        assert fp.id == fid
    fp = ModelFingerprint("sentence-transformers/all-MiniLM-L6-v2", 384, True, 256)
    assert fp.as_dict() == {
        "name": "sentence-transformers/all-MiniLM-L6-v2", "dimension": 384, "normalized": True,
        "max_seq_length": 256, "id": "b9c6b5a44c63669a",
    }
    assert str(fp) == "sentence-transformers/all-MiniLM-L6-v2 (384 dims, normalized, 256 tokens)"
    assert ModelFingerprint.from_dict(fp.as_dict()) == fp
    assert ModelFingerprint.from_dict({"name": fp.name, "dimension": 384, "normalized": True, "max_seq_length": 256}) == fp


def test_fingerprint_with_variant():
    fp = ModelFingerprint("sentence-transformers/all-MiniLM-L6-v2", 384, True, 256, "onnx-int8")
    assert fp.id != "b9c6b5a44c63669a"
    assert fp.as_dict()["variant"] == "onnx-int8"
    assert "onnx-int8" in str(fp)
    assert ModelFingerprint.from_dict(fp.as_dict()) == fp
    assert ModelFingerprint.from_dict({**fp.as_dict(), "variant": None}).variant is None
