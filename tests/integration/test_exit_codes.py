"""The exit-code contract (daemon/errors.py, README "Exit codes"), command by
command, as a supervisor, a probe or a shell sees it: `outboxd` as a real
process. 69: a service is unreachable (one line, no traceback); 78: the
configuration cannot work (an invalid value, an unknown name with --strict);
2: usage; 3: a check found a problem; 0: all is well. Plus a real pipe whose
reader goes away (`outboxd status | head -1`, `outboxd tail | head`): the
command ends quietly with the exit code it would have had.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qdrant_client import models

from tests.conftest import REPO
from tests.processes import base_env, json_lines, qdrant_env
from tests.support import add_document, drain, open_qdrant, physical_collection, qdrant_choice

pytestmark = [pytest.mark.integration]

EXIT_CHECK_FAILED, EXIT_UNAVAILABLE, EXIT_CONFIG, EXIT_USAGE = 3, 69, 78, 2

# every command that reaches PostgreSQL, as an operator would run it
POSTGRES_COMMANDS = [
    ["run", "--drain"],
    ["migrate"],
    ["status"],
    ["reconcile", "--check"],
    ["backfill"],
    ["dead-letters", "list"],
    ["search", "anything"],
    ["reindex"],
    ["roles", "--apply"],
    ["relay"],
]
KAFKA_COMMANDS = [["consume"], ["tail"]]  # no database: Kafka is what they need first
ALL_COMMANDS = POSTGRES_COMMANDS + KAFKA_COMMANDS


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outboxd(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**env, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.run([sys.executable, "-m", "daemon.cli", *argv], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def report(result: subprocess.CompletedProcess) -> str:
    out, err = result.stdout or "", result.stderr or ""
    return f"exit={result.returncode}\n--- stdout ---\n{out[-2000:]}\n--- stderr ---\n{err[-4000:]}"


@pytest.fixture
def unreachable(tmp_path) -> dict[str, str]:
    """PostgreSQL and Kafka at closed ports; everything else local, in tmp_path."""
    return base_env(
        DATABASE_URL=f"postgresql://outboxd@127.0.0.1:{closed_port()}/outboxd",
        KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port()}",
        OUTBOXD_STARTUP_TIMEOUT=2,
        OUTBOXD_QDRANT__PATH=str(tmp_path / "qdrant"),
        OUTBOXD_DATA_DIR=str(tmp_path / "data"),
    )


# --- 69: unreachable ----------------------------------------------------------------------
@pytest.mark.parametrize("argv", ALL_COMMANDS, ids=" ".join)
def test_an_unreachable_service_exits_69_with_one_line(argv, unreachable, tmp_path):
    """PostgreSQL (or, for consume and tail, Kafka) down for OUTBOXD_STARTUP_TIMEOUT: exit 69,
    one line saying what is unreachable (outboxd's; a client library may log its own
    connection errors before it), no traceback."""
    started = time.monotonic()
    result = outboxd(argv, unreachable, tmp_path)
    assert result.returncode == EXIT_UNAVAILABLE, report(result)
    assert "Traceback" not in result.stderr, report(result)
    errors = [line for line in json_lines(result.stderr) if "exit_code" in line]
    assert len(errors) == 1 and errors[0]["exit_code"] == EXIT_UNAVAILABLE, report(result)
    assert errors[0]["level"] == "error" and "\n" not in errors[0]["msg"], report(result)
    what = "kafka" if argv in KAFKA_COMMANDS else "postgresql"
    assert what in errors[0]["msg"].lower() or what in str(errors[0].get("dependency", "")), report(result)
    assert time.monotonic() - started < 60, "it gave up long after OUTBOXD_STARTUP_TIMEOUT"


# --- 78: configuration ---------------------------------------------------------------------
@pytest.mark.parametrize("argv", ALL_COMMANDS, ids=" ".join)
def test_an_invalid_setting_exits_78_naming_the_variable(argv, unreachable, tmp_path):
    result = outboxd(argv, {**unreachable, "OUTBOXD_BATCH_SIZE": "0"}, tmp_path)
    assert result.returncode == EXIT_CONFIG, report(result)
    assert result.stderr.strip().splitlines() == [
        "outboxd: invalid settings: OUTBOXD_BATCH_SIZE: Input should be greater than or equal to 1 (given: '0')"
    ], report(result)


@pytest.mark.parametrize("argv", ALL_COMMANDS, ids=" ".join)
def test_strict_refuses_an_unknown_variable_with_78(argv, unreachable, tmp_path):
    """--strict: a mistyped OUTBOXD_ variable stops the command before it touches anything."""
    result = outboxd([*argv, "--strict"], {**unreachable, "OUTBOXD_BATCH_SIZ": "8"}, tmp_path)
    assert result.returncode == EXIT_CONFIG, report(result)
    assert "OUTBOXD_BATCH_SIZ;" in result.stderr and "did you mean OUTBOXD_BATCH_SIZE?" in result.stderr


@pytest.mark.parametrize("argv, code", [(["roles"], 0), (["dead-letters", "list"], EXIT_UNAVAILABLE)], ids=str)
def test_an_unknown_variable_is_a_warning_and_the_command_runs_as_normal(argv, code, unreachable, tmp_path):
    """Without --strict the typo is a warning naming the closest setting; the exit code is what it
    would have been without it (0 for printing the roles, 69 for an unreachable database)."""
    result = outboxd(argv, {**unreachable, "OUTBOXD_BATCH_SIZ": "8"}, tmp_path)
    assert result.returncode == code, report(result)
    warnings = [line["msg"] for line in json_lines(result.stderr) if line.get("level") == "warning"]
    assert any("OUTBOXD_BATCH_SIZ;" in w and "did you mean OUTBOXD_BATCH_SIZE?" in w for w in warnings), report(result)


# --- 2: usage --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, says", [
    (["run", "--drain=yes"], "--drain"),
    (["migrate", "--capture-triggers", "sometimes"], "--capture-triggers"),
    (["status", "--max-lag", "-1"], "--max-lag"),
    (["reconcile", "--source", "not-a-uuid"], "is not a valid UUID"),
    (["backfill", "--page-size", "0"], "--page-size"),
    (["dead-letters", "frobnicate"], "frobnicate"),
    (["dead-letters", "purge"], "needs a selection"),
    (["search"], "Missing argument 'QUERY'"),
    (["reindex", "--rollback", "--drop-retired"], "choose one"),
    (["roles", "--writer", "1bad"], "not a plain role name"),
    (["relay", "--from-beginning"], "No such option"),
    (["consume", "extra"], "unexpected extra argument"),
    (["tail", "-n", "0"], "-n"),
    (["tail", "--document", "nope"], "is not a valid UUID"),
    (["no-such-command"], "No such command"),
    (["stauts"], "No such command 'stauts'. Did you mean 'status'?"),
    (["dead-leters", "list"], "Did you mean 'dead-letters'?"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_usage_error_exits_2(argv, says, unreachable, tmp_path):
    result = outboxd(argv, unreachable, tmp_path)
    assert result.returncode == EXIT_USAGE, report(result)
    assert says in result.stderr and "Error:" in result.stderr and "Traceback" not in result.stderr, report(result)


async def converge(make_settings, path, dsn, embedder, collection, lose: str | None = None) -> None:
    """Drain into the session's Qdrant (local mode at `path` where there is no server); then,
    if asked, lose the point `lose` behind the daemon's back."""
    client = open_qdrant(path)
    try:
        await drain(make_settings(**qdrant_choice(path)), dsn, embedder, client)
        if lose:
            await client.delete(await physical_collection(client, collection), models.PointIdsList(points=[lose]))
    finally:
        await client.close()


# --- 3: a check found a problem; 0: it did not ------------------------------------------------
@pytest.mark.slow
def test_checks_exit_3_on_a_problem_and_0_without(conn, dsn, collection, embedder, make_settings, tmp_path):
    """`reconcile --check`: 0 when the collection matches, 3 once a point is lost behind the
    daemon's back. `status --max-pending`: 0 within the limit, 3 past it."""
    path = tmp_path / "qdrant"
    _, ids = add_document(conn, ["the first chunk", "the second chunk", "the third chunk"])

    asyncio.run(converge(make_settings, path, dsn, embedder, collection))
    env = base_env(DATABASE_URL=dsn, OUTBOXD_COLLECTION=collection, **qdrant_env(path))
    flags: list[str] = []

    clean = outboxd(["reconcile", "--check", *flags], env, tmp_path)
    assert clean.returncode == 0 and "0 drifted" in clean.stdout, report(clean)
    asyncio.run(converge(make_settings, path, dsn, embedder, collection, lose=str(ids[1])))
    drift = outboxd(["reconcile", "--check", *flags], env, tmp_path)
    assert drift.returncode == EXIT_CHECK_FAILED and "1 drifted" in drift.stdout, report(drift)
    assert "Traceback" not in drift.stderr

    conn.execute("UPDATE chunks SET text = 'an edit, pending' WHERE id = %s", (ids[0],))
    within = outboxd(["status", "--max-pending", "1", *flags], env, tmp_path)
    assert within.returncode == 0, report(within)
    past = outboxd(["status", "--max-pending", "0", *flags], env, tmp_path)
    assert past.returncode == EXIT_CHECK_FAILED, report(past)
    assert "1 events pending, over --max-pending 0" in past.stderr


# --- outboxd tail | head ---------------------------------------------------------------------
def test_tail_ends_quietly_when_its_reader_goes_away(conn, dsn, make_settings, kafka_bootstrap, tmp_path):
    """`outboxd tail --from-beginning | head -c 100`, a real shell pipe: head exits after 100
    bytes; tail's next write meets a closed pipe and it ends with 0, no traceback, well
    within 30 s. The topic holds far more than a pipe buffer (64 KiB), so tail is still
    writing when head goes."""
    from tests.kafka_support import kafka_names, relay_drain

    names = kafka_names()
    for i in range(8):
        add_document(conn, [f"Paragraph {i}-{j}: the outbox carries every change to the stream." for j in range(100)],
                     title=f"Document {i}")
    asyncio.run(relay_drain(make_settings(kafka={"bootstrap_servers": kafka_bootstrap, **names}), dsn))

    env = base_env(KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, OUTBOXD_KAFKA__TOPIC=names["topic"],
                   PYTHONPATH=str(REPO))
    err = tmp_path / "tail.stderr"
    tail = shlex.join([sys.executable, "-m", "daemon.cli", "tail", "--from-beginning"])
    script = (f'set -o pipefail; {tail} 2> {shlex.quote(str(err))} | head -c 100; statuses="${{PIPESTATUS[*]}}"; '
              'echo; echo "status $statuses"')
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - started
    stderr = err.read_text()
    describe = f"{report(result)}\n--- tail's stderr ---\n{stderr[-4000:]}"
    assert elapsed < 30, f"the pipeline took {elapsed:.0f}s\n{describe}"
    assert result.stdout.rstrip().endswith("status 0 0"), describe  # tail's exit status, then head's
    assert result.returncode == 0, describe
    first = result.stdout.split("\n", 1)[0]
    assert " upsert " in first and "chunk=" in first, describe  # what head passed on: tail's first line
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, describe


# --- outboxd status | head -1 --------------------------------------------------------------------
def outboxd_into_a_closed_pipe(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """outboxd with stdout a real pipe whose reader has gone already (a `| head -1` that
    read its line): every write outboxd makes to stdout meets the broken pipe."""
    read, write = os.pipe()
    os.close(read)
    try:
        env = {**env, "PYTHONPATH": str(REPO)}
        return subprocess.run([sys.executable, "-m", "daemon.cli", *argv], env=env, cwd=cwd, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)


@pytest.mark.slow
def test_a_reader_that_goes_away_ends_a_command_quietly(conn, dsn, collection, embedder, make_settings, tmp_path):
    """`outboxd status | head -1` and `outboxd reconcile --check | head -1` under pipefail: a
    reader that closes early ends the command quietly, with the exit code it would have had
    (0; 3 for a check that found drift before printing it), never 1 (a bug) or 69 (the pipe
    taken for an outage), and with no traceback."""
    path = tmp_path / "qdrant"
    _, ids = add_document(conn, ["the first chunk", "the second chunk"])

    asyncio.run(converge(make_settings, path, dsn, embedder, collection))
    env = base_env(DATABASE_URL=dsn, OUTBOXD_COLLECTION=collection, **qdrant_env(path))
    for argv, code in [(["status"], 0), (["reconcile", "--check"], 0), (["status", "--json"], 0),
                       (["--help"], 0)]:
        result = outboxd_into_a_closed_pipe(argv, env, tmp_path)
        describe = f"{' '.join(argv)}: {report(result)}"
        assert result.returncode == code, describe
        assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, describe
        assert "unreachable" not in result.stderr, describe

    asyncio.run(converge(make_settings, path, dsn, embedder, collection, lose=str(ids[1])))
    drift = outboxd_into_a_closed_pipe(["reconcile", "--check"], env, tmp_path)
    assert drift.returncode == EXIT_CHECK_FAILED, report(drift)
    assert "Traceback" not in drift.stderr, report(drift)

    # the same through a shell pipeline, as a user types it
    script = (f"set -o pipefail; {shlex.join([sys.executable, '-m', 'daemon.cli', 'status'])} | head -1 > /dev/null; "
              'echo "status ${PIPESTATUS[*]}"')
    shell = subprocess.run(["bash", "-c", script], env={**env, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert shell.stdout.strip() == "status 0 0", report(shell)


# --- settings that no waiting heals: 78 at once, naming the setting --------------------------
def test_postgresql_settings_that_cannot_heal_exit_78_at_once(empty_dsn, tmp_path):
    """A database that does not exist, an invalid sslmode, a role that does not exist: 78
    naming DATABASE_URL, on the first connection attempt (the start-up timeout is long, so a
    retry would show as a 69 much later), for the daemon and an operator command alike."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    base = conninfo_to_dict(empty_dsn)
    cases = {
        "database": make_conninfo(**{**base, "dbname": "no_such_database"}),
        "sslmode": make_conninfo(**{**base, "sslmode": "bogus"}),
        "role": make_conninfo(**{**base, "user": "no_such_role"}),
    }
    for argv in (["run", "--drain"], ["status"], ["reconcile", "--check"], ["dead-letters", "list"], ["migrate"],
                 ["roles", "--apply"], ["backfill"]):
        for what, url in cases.items():
            env = base_env(DATABASE_URL=url, OUTBOXD_STARTUP_TIMEOUT=300, OUTBOXD_QDRANT__PATH=str(tmp_path / "q"))
            result = outboxd(argv, env, tmp_path, timeout=120)
            assert result.returncode == EXIT_CONFIG, f"{what}: {report(result)}"
            assert "PostgreSQL refused the connection" in result.stderr and "DATABASE_URL" in result.stderr, report(result)
            assert "Traceback" not in result.stderr, report(result)


@pytest.mark.parametrize("url", ["not a url", "postgresql://postgres:hunter2@[::1:5432/app"])
def test_a_malformed_database_url_exits_78_without_showing_it(url, tmp_path):
    result = outboxd(["status"], base_env(DATABASE_URL=url), tmp_path)
    assert result.returncode == EXIT_CONFIG, report(result)
    assert result.stderr.startswith("outboxd: invalid settings: DATABASE_URL: not a PostgreSQL URL"), report(result)
    assert "hunter2" not in result.stderr


@pytest.fixture
def not_qdrant():
    """An HTTP server that is not Qdrant: every path is a 404 page."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the handler's name
            self.send_error(404, "File not found")

        do_POST = do_PUT = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("argv", [["run", "--drain"], ["reconcile", "--check"], ["status"], ["search", "stars"]],
                         ids=" ".join)
def test_a_qdrant_url_that_is_not_qdrant_exits_78(argv, dsn, not_qdrant, tmp_path):
    """QDRANT_URL answers HTTP, but not as Qdrant: 78 naming QDRANT_URL, no traceback and no
    HTML page in the output, before the model loads."""
    env = base_env(DATABASE_URL=dsn, QDRANT_URL=not_qdrant, OUTBOXD_STARTUP_TIMEOUT=300)
    result = outboxd(argv, env, tmp_path)
    assert result.returncode == EXIT_CONFIG, report(result)
    assert f"QDRANT_URL={not_qdrant} answers, but not as a Qdrant server does" in result.stderr, report(result)
    assert "Traceback" not in result.stderr and "<html" not in result.stderr.lower(), report(result)
