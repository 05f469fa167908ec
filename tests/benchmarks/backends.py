"""Texts per second of each embedding backend, on the same texts, in one run.

    python -m tests.benchmarks.backends [--chunks 1000] [--rounds 2] [--out backends.json]

Measured, each warm and `rounds` times, alternating (so that a busy neighbour
slows all of them alike):

- sentence-transformers' own `SentenceTransformer.encode` (as it is, one call,
  at the torch backend's forward-pass size): the reference the daemon is held to
- the torch backend through the encode stage (`backend.encode`, one call)
- ONNX Runtime fp32 through the stage
- ONNX Runtime int8 through the stage (other vectors: its own fingerprint)

For each: texts/s by the wall clock, and by CPU time (texts / (process CPU
seconds / cores)), which a busy shared machine distorts less; the load average
before and after says how busy it was. `measure_backends(texts, settings)` is
the function the benchmark harness calls.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

import orjson

from daemon.config import Settings
from daemon.embedding.embedder import Embedder
from daemon.embedding.settings import EmbeddingShared

BACKENDS = {
    "torch": {"backend": "sentence-transformers"},
    "onnx_fp32": {"backend": "onnx"},
    "onnx_int8": {"backend": "onnx", "quantize": True},
    # not measured unless asked for (--backends): bf16 is used only when asked for, where it agrees
    "torch_bf16": {"backend": "sentence-transformers", "precision": "bf16"},
}
DEFAULT_BACKENDS = ["torch", "onnx_fp32", "onnx_int8"]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure_backends(texts: list[str], settings_base: Settings, *, rounds: int = 2,
                     backends: list[str] | None = None, reference: bool = True) -> dict:
    """{name: {texts_per_s, runs, cpu_texts_per_s, ...}} for sentence-transformers'
    encode and each backend, plus the ratios, on `texts`. settings_base gives the
    model, device, window, forward-pass size and data_dir (the ONNX cache)."""
    names = backends or DEFAULT_BACKENDS
    loop = asyncio.new_event_loop()
    embedders: dict[str, Embedder] = {}
    result: dict = {"texts": len(texts), "cores": _cores(), "load_average_before": os.getloadavg()}
    try:
        for name in names:
            shared = settings_base.embedding.model_dump(include=set(EmbeddingShared.model_fields))
            embedding = {**shared, **BACKENDS[name]}
            settings = Settings.model_validate({**settings_base.model_dump(), "embedding": embedding})
            embedder = Embedder(settings)
            started = time.perf_counter()
            loop.run_until_complete(embedder.load())
            result.setdefault("load_seconds", {})[name] = round(time.perf_counter() - started, 2)
            meta = getattr(embedder.backend, "meta", None)
            if meta:
                result.setdefault("onnx", {})[name] = {
                    k: meta.get(k) for k in ("export_seconds", "optimized", "fused", "agreement_min_cosine")
                } | {"exported_now": embedder.backend.exported}
            embedders[name] = embedder
        runners = {}
        if reference:
            from daemon.embedding.torch_backend import reference_model

            shared = settings_base.embedding
            st = reference_model(shared.name, shared.device, shared.max_seq_length)
            st_batch = next(iter(embedders.values())).batch_size if embedders else 32
            result["sentence_transformers_batch_size"] = st_batch
            def st_encode(batch: list[str] = texts) -> None:
                import torch

                # as it is: torch's own thread count (the torch backend sets its own per pass)
                torch.set_num_threads(_cores())
                st.encode(batch, batch_size=st_batch, normalize_embeddings=True, show_progress_bar=False)

            runners["sentence_transformers_encode"] = st_encode
        lags: dict[str, list[float]] = {}

        async def encode_and_probe(name: str, backend) -> None:
            """The backend's encode, and how late a 5 ms timer on the same event loop
            fires meanwhile (the loop must stay free for leases and health checks)."""
            done = asyncio.Event()

            async def probe() -> None:
                while not done.is_set():
                    started = loop.time()
                    await asyncio.sleep(0.005)
                    lags.setdefault(name, []).append(loop.time() - started - 0.005)

            task = asyncio.ensure_future(probe())
            try:
                await backend.encode(texts)
            finally:
                done.set()
                await task

        for name, embedder in embedders.items():
            runners[name] = (lambda n, b: lambda: loop.run_until_complete(encode_and_probe(n, b)))(name, embedder.backend)
        warm = texts[:64]  # warm: the first calls pay for allocations and kernel choices
        if reference:
            st_encode(warm)
        for embedder in embedders.values():
            loop.run_until_complete(embedder.backend.encode(warm))
        runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in runners}
        for _ in range(rounds):
            for name, fn in runners.items():
                busy_before = embedders[name].encode_seconds if name in embedders else 0.0
                wall, cpu = _timed(fn)
                busy = (embedders[name].encode_seconds - busy_before) if name in embedders else wall
                runs[name].append((wall, cpu, busy))
        cores = _cores()
        for name, rs in runs.items():
            wall = sum(r[0] for r in rs)
            cpu = sum(r[1] for r in rs)
            result[name] = {
                "texts_per_s": round(len(texts) * len(rs) / wall, 1),
                "runs_texts_per_s": [round(len(texts) / r[0], 1) for r in rs],
                "cpu_texts_per_s": round(len(texts) * len(rs) / (cpu / cores), 1),
                "forward_share": round(sum(r[2] for r in rs) / wall, 3),  # device busy / wall
            }
            if name in lags:
                lag = sorted(lags[name])
                result[name]["event_loop_lag_ms"] = {
                    "p50": round(1000 * lag[len(lag) // 2], 2),
                    "p99": round(1000 * lag[int(len(lag) * 0.99)], 2),
                    "max": round(1000 * lag[-1], 2),
                }
            if name in embedders:
                result[name]["fingerprint"] = embedders[name].fingerprint.id
                result[name]["backend"] = embedders[name].info.description
                result[name]["batch_size"] = embedders[name].batch_size
                result[name]["forward_threads"] = getattr(embedders[name].backend, "workers", 1)
        result["load_average_after"] = os.getloadavg()
        ratios = {}
        for a, b in [("onnx_fp32", "torch"), ("onnx_int8", "torch"), ("torch_bf16", "torch"),
                     ("torch", "sentence_transformers_encode"),
                     ("onnx_fp32", "sentence_transformers_encode"), ("onnx_int8", "sentence_transformers_encode")]:
            if a in result and b in result:
                ratios[f"{a}/{b}"] = round(result[a]["texts_per_s"] / result[b]["texts_per_s"], 3)
                ratios[f"{a}/{b} (cpu)"] = round(result[a]["cpu_texts_per_s"] / result[b]["cpu_texts_per_s"], 3)
        result["ratios"] = ratios
        return result
    finally:
        for embedder in embedders.values():
            loop.run_until_complete(embedder.close())
        loop.close()


def main() -> None:
    from tests.benchmarks.e2e_throughput import make_texts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="OUTBOXD_EMBEDDING__BATCH_SIZE (default: each backend's)")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS), help="comma-separated: " + ", ".join(BACKENDS))
    parser.add_argument("--no-reference", action="store_true", help="leave out sentence-transformers' own encode")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the ONNX export is cached (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="outboxd-bench-models-"))
    settings = Settings(database_url=None, data_dir=data_dir, embedding={"batch_size": args.batch_size},
                        log_level="WARNING")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {_cores()} cores, {platform.python_version()}",
        **measure_backends(make_texts(args.chunks), settings, rounds=args.rounds,
                           backends=[b for b in args.backends.split(",") if b], reference=not args.no_reference),
    }
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
