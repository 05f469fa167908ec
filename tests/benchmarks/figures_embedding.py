"""Figures about embedding: the pipeline against raw `encode` (1), each backend
(1b), the fastest encoder the harness can build (1c, the limit), the pipeline
with encoding made free (1d, the ceiling), and the GPU (7)."""
from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path

from daemon.config import Settings
from daemon.embedding.embedder import Embedder
from tests.benchmarks import e2e_throughput
from tests.benchmarks.services import NO_QDRANT, Postgres, QdrantTarget, free_embedder, load_average, settings_for

MODELS_DIR = Path("/tmp/outboxd-bench-models")  # the ONNX exports, kept between runs (export takes a while)


def gpu_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


# --- figure 1 (and 7): the pipeline against raw encode -----------------------------------
def figure_pipeline(pg: Postgres, target: QdrantTarget, embedder: Embedder, n: int, claim_batches: list[int]) -> dict:
    texts = e2e_throughput.make_texts(n)
    st = e2e_throughput.reference_st(embedder)
    st.encode(texts[:64], batch_size=embedder.batch_size, show_progress_bar=False)  # warm up
    bs = embedder.batch_size
    e2e_throughput.backend_encode_rate(embedder, texts[:64])  # warm up the stage
    raw_before = e2e_throughput.raw_encode_rate(embedder, texts, bs)
    backend_before = e2e_throughput.backend_encode_rate(embedder, texts)
    sweep = []
    for claim in claim_batches:
        embedder._cache.clear()  # the same texts run again: no cache hit may flatter the pipeline
        dsn = pg.fresh()
        settings = settings_for(dsn, target, batch_size=claim, collection=target.name(f"pipeline_{claim}"))
        rate, share = asyncio.run(e2e_throughput.pipeline_rate(dsn, embedder, texts, settings, qdrant=target.client()))
        sweep.append({"claim_batch_size": claim, "pipeline_chunks_per_s": round(rate, 1), "encode_share": round(share, 3)})
    raw_after = e2e_throughput.raw_encode_rate(embedder, texts, bs)
    backend_after = e2e_throughput.backend_encode_rate(embedder, texts)
    raw = (raw_before + raw_after) / 2
    backend = (backend_before + backend_after) / 2
    for row in sweep:
        row["efficiency"] = round(row["pipeline_chunks_per_s"] / raw, 3)
        row["vs_backend_encode"] = round(row["pipeline_chunks_per_s"] / backend, 3)
    default_claim = Settings.model_fields["batch_size"].default
    main = next((r for r in sweep if r["claim_batch_size"] == default_claim), sweep[-1])
    return {
        "qdrant": target.label,
        "chunks": n,
        "device": str(getattr(st, "device", embedder._settings.embedding.device)),
        "backend": embedder.info.description if embedder.info else None,
        "embed_batch_size": bs,
        "raw_encode_chunks_per_s": round(raw, 1),
        "raw_encode_runs": [round(raw_before, 1), round(raw_after, 1)],
        "backend_encode_chunks_per_s": round(backend, 1),
        "backend_encode_runs": [round(backend_before, 1), round(backend_after, 1)],
        "claim_batch_size": main["claim_batch_size"],
        "vs_backend_encode": main["vs_backend_encode"],
        "sweep": sweep,
        "pipeline_chunks_per_s": main["pipeline_chunks_per_s"],
        "efficiency": main["efficiency"],
    }


# --- figure 1b: each backend ------------------------------------------------------------------
def figure_backends(n: int, device: str, rounds: int) -> dict:
    """tests.benchmarks.backends.measure_backends on make_texts(n): sentence-transformers'
    encode as it is, the torch backend through its stage, ONNX fp32 and int8 (CPU only)."""
    from tests.benchmarks.backends import measure_backends

    names = ["torch"]
    skipped = {}
    if device == "cpu":
        names += ["onnx_fp32", "onnx_int8"]
    else:
        skipped = {"onnx_fp32": "the onnx backend runs on the CPU", "onnx_int8": "the onnx backend runs on the CPU"}
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    base = Settings(database_url=None, data_dir=MODELS_DIR, embedding={"device": device}, log_level="WARNING")
    texts = e2e_throughput.make_texts(n)
    result = measure_backends(texts, base, rounds=rounds, backends=names)
    result["device"] = device
    result["qdrant"] = NO_QDRANT
    result["not_measured"] = skipped
    return result


# --- figure 1c: the limit ------------------------------------------------------------------------
def limit_recipe(texts: list[str], model_name: str, device: str, dtype: str, batch: int, max_seq_length=None) -> dict:
    """../shared/gpu/limit.py's recipe on the real model: Rust tokenizers' parallel
    encode_batch, length-sorted batches, the transformer in `dtype`, mean pooling,
    normalisation. texts/s of the whole (tokenization included)."""
    import torch

    from daemon.embedding.torch_backend import reference_model, rust_tokenizer

    st = reference_model(model_name, device, max_seq_length)
    tok = rust_tokenizer(st)
    tok.enable_truncation(int(st.max_seq_length))
    tok.no_padding()
    bert = st[0].auto_model
    if dtype == "fp16":
        bert = copy.deepcopy(bert).half()  # the cached reference stays fp32
    bert = bert.eval()
    dev = next(bert.parameters()).device

    def run(subset: list[str]) -> float:
        started = time.perf_counter()
        encs = tok.encode_batch(subset)
        order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
        with torch.inference_mode():
            for s in range(0, len(order), batch):
                idx = order[s:s + batch]
                width = max(len(encs[i].ids) for i in idx)
                ids = torch.zeros((len(idx), width), dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    e = encs[i].ids
                    ids[r, :len(e)] = torch.tensor(e)
                    mask[r, :len(e)] = 1
                ids, mask = ids.to(dev, non_blocking=True), mask.to(dev, non_blocking=True)
                h = bert(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(h.dtype)
                v = torch.nn.functional.normalize(((h * m).sum(1) / m.sum(1)).float(), dim=-1).cpu()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        del v
        return len(subset) / (time.perf_counter() - started)

    run(texts[:min(len(texts), 2 * batch)])  # warm up
    return {"dtype": dtype, "batch": batch, "texts_per_s": round(run(texts), 1)}


def figure_limit(texts_n: int, settings: Settings, device: str, backends: dict | None, pipeline: dict) -> dict:
    """The fastest encoder the harness can build on figure 1's texts and device,
    and the pipeline (figure 1, the default claim batch) against it and against raw encode."""
    texts = e2e_throughput.make_texts(texts_n)
    candidates: dict[str, float] = {}
    recipes = []
    plans = [("fp16", 256), ("fp16", 1024)] if device == "cuda" else [("fp32", 32), ("fp32", 256)]
    for dtype, batch in plans:
        r = limit_recipe(texts, settings.embedding.name, device, dtype, batch, settings.embedding.max_seq_length)
        recipes.append(r)
        candidates[f"limit recipe {dtype}, batch {batch}"] = r["texts_per_s"]
    excluded = {}
    if backends:  # figure 1b's, on other texts of the same kind: rates only, the same vectors only
        for name in ("sentence_transformers_encode", "torch", "onnx_fp32"):
            if name in backends:
                candidates[f"backend {name} (figure 1b)"] = backends[name]["texts_per_s"]
        if "onnx_int8" in backends:
            excluded["onnx_int8"] = "other vectors (its own fingerprint): not the same encoder"
    best = max(candidates, key=candidates.get)
    limit = candidates[best]
    return {
        "qdrant": NO_QDRANT,
        "device": device,
        "texts": texts_n,
        "recipes": recipes,
        "candidates": candidates,
        "excluded": excluded,
        "limit_encoder": best,
        "limit_texts_per_s": limit,
        "raw_encode_texts_per_s": pipeline["raw_encode_chunks_per_s"],
        "pipeline_chunks_per_s": pipeline["pipeline_chunks_per_s"],
        "pipeline_vs_encode": round(pipeline["pipeline_chunks_per_s"] / pipeline["raw_encode_chunks_per_s"], 3),
        "pipeline_vs_backend_encode": pipeline["vs_backend_encode"],
        "pipeline_vs_limit": round(pipeline["pipeline_chunks_per_s"] / limit, 3),
    }


# --- figure 1d: the ceiling ------------------------------------------------------------------------
def figure_ceiling(pg: Postgres, target: QdrantTarget, n: int, claims: list[int]) -> dict:
    """The notify pipeline with encoding made free: RandomBackend through the
    Embedder's backend seam (no monkeypatching), no embedding cache."""
    texts = e2e_throughput.make_texts(n)
    out: dict = {"qdrant": target.label, "chunks": n, "encoder": "RandomBackend: random unit vectors",
                 "load_average_before": load_average()}
    for claim in claims:
        dsn = pg.fresh()
        settings = settings_for(dsn, target, batch_size=claim, embedding={"cache_size": 0},
                                collection=target.name(f"ceiling_{claim}"))
        embedder = free_embedder(settings)
        asyncio.run(embedder.load())
        rate, share = asyncio.run(e2e_throughput.pipeline_rate(dsn, embedder, texts, settings, qdrant=target.client()))
        out[f"claim_{claim}"] = {"chunks_per_s": round(rate, 1), "encode_share": round(share, 4),
                                 "encode_calls": embedder.backend.calls}
    out["load_average_after"] = load_average()
    return out


# --- figure 7: the GPU -------------------------------------------------------------------------------
def figure_gpu(pg: Postgres, target: QdrantTarget, n: int, device: str) -> dict:
    """Figure 1 and the limit with the model on `device` (cuda; the CPU in quick
    mode, so that CI runs this code path)."""
    embedder = Embedder(Settings(database_url=pg.base, collection="bench", log_level="WARNING",
                                 embedding={"device": device}))
    asyncio.run(embedder.load())
    try:
        p = figure_pipeline(pg, target, embedder, n, [64, 256])
        lim = figure_limit(n, embedder._settings, device, None, p)
    finally:
        asyncio.run(embedder.close())
    return {**p, "limit": lim, "pipeline_vs_limit": lim["pipeline_vs_limit"], "ran_on": device}
