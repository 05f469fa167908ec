"""The embedded PostgreSQL (db/embedded.py) as users of the defaults meet it: the
server an `outboxd run` started stops with it however the process ends (two or
three Ctrl-Cs or two SIGTERMs while the model loads: the shutdown deadline), and a holder's pid that
a process could not take back (SIGKILL) is cleaned at the next start, which then
stops the server on its way out as usual; `demo --fresh` no longer refuses over it.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from contextlib import suppress
from pathlib import Path

import psutil
import pytest

from daemon.demo.embedded import EmbeddedStores
from db.embedded import HANDLES, postmaster_pid
from tests.folders import server_folder
from tests.processes import MODEL_LOAD_S, base_env

pytestmark = [pytest.mark.slow]

GONE_S = 30  # generous: a fast shutdown of an idle server takes well under a second


@pytest.fixture
def data_dir():
    """A --data-dir outside pytest's tmp_path (the server runs as another user under
    root: see test_demo.py's workdir); whatever server is left in it is stopped."""
    folder = server_folder("test-pg")
    yield folder / "data"
    for pgdata in (folder / "data" / "postgres", folder / "data" / "demo" / "postgres"):
        pid = postmaster_pid(pgdata)
        if pid is not None:  # a failed test left it up
            with suppress(psutil.Error):
                psutil.Process(pid).send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
                psutil.Process(pid).wait(GONE_S)
    shutil.rmtree(folder, ignore_errors=True)


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for init to collect it has, too)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, what: str) -> None:
    deadline = time.monotonic() + GONE_S
    while not gone(pid):
        assert time.monotonic() < deadline, f"{what} (pid {pid}) still runs {GONE_S}s later"
        time.sleep(0.1)


def start_embedded(spawn, data_dir: Path, name: str, **settings):
    """`outboxd run` on the embedded defaults; (the process, its DATABASE_URL) once it printed it."""
    env = base_env(OUTBOXD_POLL_INTERVAL=0.5, **settings)
    assert "DATABASE_URL" not in env and "QDRANT_URL" not in env
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    daemon = spawn("run", "--data-dir", str(data_dir), env=env, cwd=data_dir.parent, name=name)
    found = daemon.wait_for(lambda: re.search(r"DATABASE_URL=(postgresql://\S+)", daemon.stdout),
                            "the printed DATABASE_URL", MODEL_LOAD_S)
    return daemon, found.group(1)


@pytest.mark.model
@pytest.mark.parametrize("signals", [("SIGINT", "SIGINT"), ("SIGINT", "SIGINT", "SIGINT"), ("SIGTERM", "SIGTERM")])
def test_signals_during_start_up_stop_the_embedded_postgresql(spawn, data_dir, signals):
    """Ctrl-C twice (or three times, or SIGTERM twice) while the model loads, as people
    do who will not wait for it: the first signal starts the stop, the second ends the
    process (130) within the second-signal grace, by the shutdown deadline's os._exit
    while the load still runs; and the PostgreSQL it started is stopped with it, its
    record of holders left empty."""
    daemon, _ = start_embedded(spawn, data_dir, "-".join(signals).lower(), OUTBOXD_HEALTH__PORT=0,
                               OUTBOXD_HEALTH__HOST="127.0.0.1")
    pgdata = data_dir / "postgres"
    server = postmaster_pid(pgdata)
    assert server is not None
    # the health endpoint listens once the signals are handled, just before the model loads
    daemon.wait_for(lambda: daemon.log("health endpoint listening"), "the health endpoint", MODEL_LOAD_S)

    first, *more = signals
    daemon.popen.send_signal(signal.Signals[first])
    daemon.wait_for(lambda: any(d.get("signal") == first for d in daemon.logs()), "the first signal's log line", 30)
    for sig in more:  # each once the one before was seen: signals sent at once may arrive as one
        daemon.popen.send_signal(signal.Signals[sig])
        daemon.wait_for(lambda: daemon.popen.poll() is not None or daemon.log("second signal: stopping now"),
                        "the second signal's log line", 30)
    assert daemon.wait(60) == 130, daemon.describe()

    wait_gone(server, "the embedded PostgreSQL")
    assert json.loads((pgdata / HANDLES).read_text()) == [], daemon.describe()
    assert "Traceback" not in daemon.stderr, daemon.describe()


def test_a_holder_killed_is_cleaned_at_the_next_start(spawn, data_dir):
    """SIGKILL leaves the daemon's pid in pgserver's record and its server running.
    The next command on that folder says, in one line, that it cleaned the record
    (the dead pid, and a live process that is not Python and so holds nothing),
    uses the server left running, and stops it when it exits."""
    bystander = subprocess.Popen(["sleep", "600"])  # a live pid that holds nothing
    try:
        daemon, _ = start_embedded(spawn, data_dir, "killed")
        pgdata = data_dir / "postgres"
        server = postmaster_pid(pgdata)
        daemon.popen.kill()
        daemon.popen.wait(30)
        assert json.loads((pgdata / HANDLES).read_text()) == [daemon.pid]
        assert postmaster_pid(pgdata) == server, "SIGKILL cannot stop it: that is what the next start is for"
        (pgdata / HANDLES).write_text(json.dumps([daemon.pid, bystander.pid]))

        migrate = spawn("migrate", "--data-dir", str(data_dir), env=base_env(), cwd=data_dir.parent, name="next")
        assert migrate.wait(120) == 0, migrate.describe()
        cleaned = [d for d in migrate.logs() if "record named" in d.get("msg", "")]
        assert [d["msg"] for d in cleaned] == [
            (f"the embedded PostgreSQL's record named pids {daemon.pid}, {bystander.pid}, which are gone; "
             f"cleaned; its server (pid {server}) is used and stops when this command exits")
        ], migrate.describe()
        assert cleaned[0]["level"] == "warning"
        wait_gone(server, "the embedded PostgreSQL left running")
        assert json.loads((pgdata / HANDLES).read_text()) == []
    finally:
        bystander.kill()
        bystander.wait()


def test_demo_fresh_stops_a_server_no_process_holds(spawn, data_dir):
    """`demo --fresh` over a folder whose server outlived its holder (SIGKILL): the
    server is stopped and the folder wiped, instead of a refusal naming an
    `outboxd run` that does not exist."""
    demo_dir = data_dir / "demo"
    daemon, _ = start_embedded(spawn, demo_dir, "killed-demo")
    server = postmaster_pid(demo_dir / "postgres")
    daemon.popen.kill()
    daemon.popen.wait(30)
    (demo_dir / ".outboxd-demo").write_text("created by `outboxd demo`\n")

    assert EmbeddedStores(demo_dir).prepare(fresh=True) is None
    wait_gone(server, "the embedded PostgreSQL left running")
    assert not (demo_dir / "postgres").exists(), "--fresh wipes the demo's folder"
