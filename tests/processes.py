"""Running `outboxd` as real child processes in tests: the environment it gets,
its JSON log lines, waiting for what it says, killing it. The `spawn` fixture
(tests/conftest.py) starts them and kills what is left at teardown."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support import add_document

MODEL_LOAD_S = 90  # generous: importing torch and loading MiniLM on a busy 2-core machine

VOCAB = (
    "postgres qdrant vector outbox chunk document source embedding model daemon worker lease batch claim "
    "commit transaction trigger notify listen payload point collection cosine distance search index query "
    "replica primary failover backup restore schema migration version upgrade rollback snapshot segment "
    "shard cluster node memory disk network latency throughput backlog retry backoff jitter deadline signal "
    "process thread loop future task queue stream partition offset consumer producer topic record event "
    "state hash text token window sentence paragraph title author summary metadata label category river "
    "mountain forest harbor lantern violin copper marble saffron thunder meadow glacier orchard compass"
).split()


@contextmanager
def serving(argv: list[str], ready: str, what: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`python -m ARGV` as a child server; yields its first stdout line once it
    starts with `ready`, and terminates it (kills it after 10 s) on the way out."""
    proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=Path(__file__).resolve().parents[1], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        if not line.startswith(ready):
            raise RuntimeError(f"{what} did not start (exit {proc.poll()}): {line!r}")
        yield line
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def long_texts(n: int, words: int = 60, seed: int = 0) -> list[str]:
    """n distinct texts of about `words` words each (embedding them takes real time)."""
    rng = random.Random(seed)
    return [f"Record {seed}-{i}. " + " ".join(rng.choice(VOCAB) for _ in range(words)) for i in range(n)]


def insert_backlog(conn: psycopg.Connection, texts: list[str], per_document: int = 50) -> None:
    for start in range(0, len(texts), per_document):
        add_document(conn, texts[start : start + per_document], title=f"Document {start // per_document}")


def outbox_counts(dsn: str) -> tuple[int, int]:
    """(rows in the outbox, rows currently claimed by some worker)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        total, claimed = c.execute("SELECT count(*), count(locked_by) FROM outboxd.outbox").fetchone()
    return total, claimed


CHECKOUT = Path(__file__).resolve().parents[1]


def on_this_checkout(env: dict[str, str]) -> dict[str, str]:
    """env with this checkout first on PYTHONPATH: a child `python -m daemon.cli`
    started in another folder (tmp_path) runs the code under test, not whatever
    checkout the virtualenv's editable install points at."""
    return {**env, "PYTHONPATH": os.pathsep.join([str(CHECKOUT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def base_env(**settings: Any) -> dict[str, str]:
    """The test runner's environment without any outboxd, PostgreSQL or Qdrant
    setting, plus the given ones; on this checkout."""
    env = on_this_checkout({
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OUTBOXD_") and k not in ("DATABASE_URL", "QDRANT_URL", "QDRANT_API_KEY")
    })
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OUTBOXD_LOG_FORMAT="json")
    env.update({k: str(v) for k, v in settings.items()})
    return env


def qdrant_env(local_path: Path) -> dict[str, str]:
    """How an outboxd process reaches the session's Qdrant: its server (with the
    API key, gRPC port and CA the session has), else local mode at local_path."""
    if not os.environ.get("QDRANT_URL"):
        return {"OUTBOXD_QDRANT__PATH": str(local_path)}
    names = ("QDRANT_URL", "QDRANT_API_KEY", "OUTBOXD_QDRANT__GRPC_PORT", "OUTBOXD_QDRANT__CA_FILE")
    return {k: os.environ[k] for k in names if os.environ.get(k)}


def daemon_env(dsn: str, qdrant_path: Path, collection: str, *, local_mode: bool = False, **settings: Any) -> dict[str, str]:
    """An outboxd process's environment: this database, the session's Qdrant
    (local mode at qdrant_path where there is no server, or with local_mode),
    this collection, and short timings."""
    values: dict[str, Any] = dict(
        DATABASE_URL=dsn,
        **({"OUTBOXD_QDRANT__PATH": str(qdrant_path)} if local_mode else qdrant_env(qdrant_path)),
        OUTBOXD_COLLECTION=collection,
        OUTBOXD_LEASE_SECONDS=3,
        OUTBOXD_POLL_INTERVAL=0.5,
        OUTBOXD_STARTUP_TIMEOUT=20,
    )
    values.update(settings)
    return base_env(**values)


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


class DaemonProcess:
    """One `python -m daemon.cli ...` child; stdout and stderr go to files."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, name: str) -> None:
        self.stdout_path = cwd / f"{name}.stdout"
        self.stderr_path = cwd / f"{name}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", *args], env=on_this_checkout(env), cwd=cwd, stdout=out,
                stderr=err,
            )
        self.pid = self.popen.pid

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        return json_lines(self.stderr)

    def log(self, msg: str) -> dict[str, Any] | None:
        return next((d for d in self.logs() if d.get("msg") == msg), None)

    def describe(self) -> str:
        return f"exit={self.popen.poll()}\n--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-6000:]}"

    def wait_for(self, predicate, what: str, timeout: float, interval: float = 0.05):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.popen.poll() is not None:
                value = predicate()  # one last look: it may have been written just before exiting
                if value:
                    return value
                pytest.fail(f"outboxd exited before {what}\n{self.describe()}")
            time.sleep(interval)
        pytest.fail(f"timed out after {timeout}s waiting for {what}\n{self.describe()}")

    def wait_running(self, timeout: float = MODEL_LOAD_S) -> dict[str, Any]:
        return self.wait_for(lambda: self.log("outboxd running"), "'outboxd running'", timeout, 0.1)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"outboxd did not exit within {timeout}s\n{self.describe()}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


def run_drain(spawn, env: dict[str, str], timeout: float = MODEL_LOAD_S + 120, **kw) -> DaemonProcess:
    proc = spawn("run", "--drain", env=env, **kw)
    proc.wait(timeout)
    return proc


# --- as systemd and Prometheus see it ----------------------------------------------------
class NotifyListener:
    """A bound AF_UNIX datagram socket, read continuously by a thread (so a chatty
    watchdog never fills its queue), at a path short enough for sun_path."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="sd-"))
        self.path = str(self.folder / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue
            except OSError:
                return

    def seen(self, predicate) -> str | None:
        return next((m for m in list(self.messages) if predicate(m)), None)

    def index(self, message: str) -> int:
        return self.messages.index(message)

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def health_port(proc) -> int:
    line = proc.wait_for(lambda: proc.log("health endpoint listening"), "the health endpoint", MODEL_LOAD_S, 0.05)
    assert line["host"] == "127.0.0.1"
    return int(line["port"])


def sample(metrics_text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus text, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" ([0-9.e+-]+)$"
    found = re.search(pattern, metrics_text, re.M)
    return float(found.group(1)) if found else None
