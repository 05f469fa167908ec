"""`outboxd demo` as a user runs it: a separate process on a machine with
nothing configured. It must converge, search, follow the edits, say what to
try next, and leave nothing running; what it leaves on disk must be converged.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from qdrant_client import AsyncQdrantClient

from daemon.corpus import corpus_documents, document_url
from daemon.demo import narrative as demo

pytestmark = [pytest.mark.slow]

DEMO_TIMEOUT = 480  # model load and ~100 chunks on a busy 2-core machine take well under a minute


def clean_env(**extra: str) -> dict[str, str]:
    """The runner's environment without any outboxd, PostgreSQL or Qdrant setting."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OUTBOXD_") and k not in ("DATABASE_URL", "QDRANT_URL", "QDRANT_API_KEY")
    }
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_demo(tmp_path: Path, env: dict[str, str], *args: str, timeout: float = DEMO_TIMEOUT):
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "demo", "--data-dir", str(tmp_path / "data"), *args],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
    )


def postgres_processes(pgdata: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(pgdata) in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


async def test_demo_end_to_end(tmp_path):
    started = time.monotonic()
    result = run_demo(tmp_path, clean_env())
    wall = time.monotonic() - started
    out = result.stdout
    report = f"exit={result.returncode} after {wall:.0f}s\n--- stdout ---\n{out}\n--- stderr ---\n{result.stderr[-5000:]}"
    assert result.returncode == 0, report
    demo_dir = (tmp_path / "data" / "demo").resolve()
    assert str(tmp_path / "data" / "demo") in out or "data/demo" in out, report

    # converged, with every chunk embedded once
    corpus = corpus_documents()
    chunks = sum(1 for d in corpus for p in d["paragraphs"] if p.strip())
    assert f"converged: {chunks} points for {chunks} chunks" in out, report
    assert f"({chunks} texts embedded, {chunks} events acknowledged" in out, report

    # the example searches, with hits from the corpus (rank, score, both component ranks, title)
    titles = {d["title"] for d in corpus}
    for query in demo.QUERIES:
        assert f'"{query}"' in out, report
    hit_rows = re.findall(r"^\s+(\d)\s+(\d\.\d{3})\s+(\d+|—)\s+(\d+|—)\s{2}(.+?)\s{2}", out, re.M)
    assert len(hit_rows) >= 3 * len(demo.QUERIES), report
    shown_titles = {t.rstrip("…") for *_, t in hit_rows}
    assert any(t in titles for t in shown_titles), report
    assert "Reading PostgreSQL error codes" in out and "Babbage, Lovelace and the Analyti" in out, report

    # the edits: one new embedding, payload-only retitle, the deleted document's points gone
    by_slug = {d["slug"]: d for d in corpus}
    retitled, deleted = by_slug[demo.TITLE_EDIT_DOC], by_slug[demo.DELETE_DOC]
    n_retitled, n_deleted = len(retitled["paragraphs"]), len(deleted["paragraphs"])
    assert "Changes follow" in out, report
    assert "1 point upserted with 1 new embedding" in out, report
    assert f"{n_retitled} payloads updated, no embedding" in out, report
    assert f"{n_deleted} points deleted" in out, report
    assert f"points in 'chunks': {chunks} → {chunks - n_deleted}; of the deleted document: {n_deleted} → 0" in out, report
    after = out.split("after the edits:", 1)[1]
    first_hit = re.search(r"^\s+1\s+\S+\s+(\S+)\s+(\S+)\s{2}.*\(edited\) Cold brew coffee", after, re.M)
    assert first_hit and first_hit.groups() == ("1", "1"), report  # top of both sides now

    # what to try next, pointed at the demo's stores
    assert "What to try next" in out, report
    for command in ("run", "status", "reconcile --check"):
        assert re.search(rf"outboxd {command} --data-dir \S*data/demo", out), report
    assert re.search(r'outboxd search ".+" --data-dir \S*data/demo', out), report
    assert f"host={demo_dir / 'postgres'}" in out, report  # the DATABASE_URL to write to
    assert "Nothing is left running" in out, report

    # nothing left running
    pgdata = demo_dir / "postgres"
    assert not postgres_processes(pgdata), f"a PostgreSQL for {pgdata} outlived the demo"
    assert not (pgdata / "postmaster.pid").exists()

    # on disk: the collection (through its alias) holds one point per chunk with text, and the edits
    client = AsyncQdrantClient(path=str(demo_dir / "qdrant"))
    try:
        count = (await client.count("chunks", exact=True)).count
        points, offset = {}, None
        while True:
            batch, offset = await client.scroll("chunks", limit=256, offset=offset, with_payload=True)
            points.update({str(p.id): p.payload for p in batch})
            if offset is None:
                break
    finally:
        await client.close()
    import pgserver

    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            rows = conn.execute(
                r"SELECT c.id::text, c.text, d.title, d.url FROM chunks c JOIN documents d ON d.id = c.document_id "
                r"WHERE c.text ~ '\S'"
            ).fetchall()
    finally:
        server.cleanup()
    assert count == len(rows) == chunks - n_deleted
    assert set(points) == {r[0] for r in rows}
    for chunk_id, text, title, url in rows:
        assert points[chunk_id]["text"] == text[:1000] and points[chunk_id]["title"] == title
        assert url != document_url(demo.DELETE_DOC)
        if url == document_url(demo.TITLE_EDIT_DOC):
            assert title == retitled["title"] + demo.TITLE_SUFFIX
    assert sum(text in demo.EDIT_TEXTS for _, text, _, _ in rows) == 1


@pytest.mark.parametrize("variable, value", [
    ("DATABASE_URL", "postgresql://app@db.internal/app"),
    ("QDRANT_URL", "http://qdrant.internal:6333"),
])
def test_demo_refuses_configured_servers(tmp_path, variable, value):
    """The demo writes a corpus: never into a configured database or Qdrant."""
    result = run_demo(tmp_path, clean_env(**{variable: value}), timeout=120)
    assert result.returncode == 2, result.stderr
    assert variable in result.stderr and "demo" in result.stderr
    assert value not in result.stdout + result.stderr  # a URL may carry a password
    assert not (tmp_path / "data" / "demo").exists(), "it must refuse before creating anything"
