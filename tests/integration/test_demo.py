"""`outboxd demo` as a user runs it: a separate process on a machine with
nothing configured. It must converge, search, follow the edits, say what to
try next, and leave nothing running; what it leaves on disk must be converged.
"""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shlex
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from qdrant_client import AsyncQdrantClient

from daemon.commands.demo import DEMO_BATCH_SIZE
from daemon.corpus import corpus_documents, document_url
from daemon.demo import narrative as demo
from tests.folders import server_folder
from tests.processes import on_this_checkout

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
    return on_this_checkout(env)


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


@pytest.fixture
def workdir():
    """Where a demo runs (its cwd and --data-dir's parent), outside pytest's tmp_path: the
    demo's PostgreSQL runs as another user (pgserver, under root) that must reach its data,
    and a pytest session starting beside this one resets /tmp/pytest-of-<user> to 0700."""
    folder = server_folder("test-pg")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


INSTALL_S = 3  # what a `pip install ... &&` before the demo takes, in the shell that then execs it


async def test_demo_end_to_end(workdir):
    """The demo as `pip install -e . && outboxd demo` runs it: the shell does something
    first (INSTALL_S), then execs the demo in its own process. Read line by line, as a
    user reads it: when it says PostgreSQL stopped, the server's process is gone."""
    demo_dir = (workdir / "data" / "demo").resolve()
    pgdata = demo_dir / "postgres"
    demo_cmd = shlex.join([sys.executable, "-m", "daemon.cli", "demo", "--data-dir", str(workdir / "data")])
    started = time.monotonic()
    proc = subprocess.Popen(["bash", "-c", f"sleep {INSTALL_S} && exec {demo_cmd}"],  # the install, then the demo
                            env=clean_env(PYTHONUNBUFFERED="1"), cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines, postmaster, at_done = [], None, None
    try:
        for line in proc.stdout:
            lines.append(line)
            if postmaster is None and "schema migrated" in line:
                postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
            if line.startswith("Done in"):
                at_done = time.monotonic() - started, postmaster is not None and psutil.pid_exists(postmaster)
        proc.wait(DEMO_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.monotonic() - started
    out = "".join(lines)
    report = f"exit={proc.returncode} after {wall:.0f}s\n--- stdout ---\n{out}\n--- stderr ---\n{proc.stderr.read()[-5000:]}"
    assert proc.returncode == 0, report
    assert str(workdir / "data" / "demo") in out or "data/demo" in out, report

    # converged, with every chunk embedded once, in claims small enough for the progress to move
    corpus = corpus_documents()
    chunks = sum(1 for d in corpus for p in d["paragraphs"] if p.strip())
    assert f"converged: {chunks} points for {chunks} chunks" in out, report
    converged = re.search(rf"\({chunks} texts embedded, {chunks} events acknowledged in (\d+) batches\)", out)
    assert converged and int(converged.group(1)) >= chunks // DEMO_BATCH_SIZE, report

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

    # "Done in N s": the demo's own time, without the install before it; by then PostgreSQL is gone
    assert at_done is not None and postmaster is not None, report
    seconds_at_done, postgres_alive_at_done = at_done
    done = int(re.search(r"^Done in (\d+) s", out, re.M).group(1))
    assert done <= seconds_at_done - INSTALL_S + 0.5, f"{done} s claimed, {seconds_at_done:.1f} s since the shell began\n{report}"
    assert not postgres_alive_at_done, f"'PostgreSQL stopped' while its process {postmaster} was still there\n{report}"

    # nothing left running
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


def test_the_progress_bar_moves_on_a_terminal(workdir):
    """On a terminal (a real pseudo-terminal here) the demo shows the chunks converging as
    the claims are applied: counts between none and all, not 0 and then everything."""
    chunks = sum(1 for d in corpus_documents() for p in d["paragraphs"] if p.strip())
    terminal, child_side = pty.openpty()
    fcntl.ioctl(child_side, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "demo", "--data-dir", str(workdir / "data")],
        env=clean_env(TERM="xterm"), cwd=workdir, stdin=child_side, stdout=child_side, stderr=child_side,
    )
    os.close(child_side)
    screen = bytearray()
    deadline = time.monotonic() + DEMO_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if not select.select([terminal], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: the demo exited, and the terminal has no writer left
                break
            if not chunk:
                break
            screen += chunk
        assert proc.wait(30) == 0, screen.decode(errors="replace")[-5000:]
    finally:
        os.close(terminal)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = screen.decode(errors="replace")
    shown = {int(n) for n in re.findall(rf"\b(\d+)/{chunks}\b", text)}
    between = sorted(n for n in shown if 0 < n < chunks)
    assert len(between) >= 2, f"the bar showed {sorted(shown)} of {chunks}\n{text[-3000:]}"


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
