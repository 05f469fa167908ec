"""Operator commands on real PostgreSQL and Qdrant: `outboxd status` reports
exactly what the outbox, the catalog and the live collection hold, and its
--max-* limits set the exit code; `outboxd dead-letters` lists, retries and
purges by id, by error pattern or all, and never purges unasked."""
from __future__ import annotations

import asyncio
import io
import re
from dataclasses import replace

import orjson
import psycopg
import pytest
from psycopg.rows import dict_row
from qdrant_client import AsyncQdrantClient

from daemon import cli
from daemon.admin import status
from daemon.core.catalog import CollectionRecord
from daemon.errors import CollectionElsewhereError
from daemon.runtime.backoff import EVENTS
from tests.conftest import REPO
from tests.support import add_document, drain, open_qdrant, outbox_rows, qdrant_flags, server_settings


@pytest.fixture(autouse=True)
def _no_kafka(monkeypatch):
    """These tests are about the notify transport; a developer's KAFKA_BOOTSTRAP_SERVERS would add a section."""
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)



def event_ids(conn) -> list[int]:
    return [r[0] for r in conn.execute("SELECT id FROM outboxd.outbox ORDER BY id").fetchall()]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def run_status(capsys, *argv) -> tuple[int, str, str]:
    """`outboxd status` makes its own event loop (asyncio.run), as the console
    script does: from an async test it runs in a thread, like another process would."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["status", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def cli_env(monkeypatch, dsn, collection):
    """What an operator exports before running the CLI against the test database."""
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("OUTBOXD_COLLECTION", collection)
    monkeypatch.setenv("OUTBOXD_LOG_FORMAT", "json")


async def status_json(capsys, dsn, tmp_path, collection, *extra, local: bool = False) -> tuple[int, dict, str]:
    """`status --json` on the session's Qdrant (local: on the local-mode folder in any session)."""
    where = ["--qdrant-path", str(tmp_path / "qdrant")] if local else qdrant_flags(tmp_path / "qdrant")
    code, out, err = await run_status(capsys, "--json", *where, *extra)
    return code, orjson.loads(out), err


def documented_json_keys() -> set[str]:
    """The keys docs/operating.md says `status --json` prints."""
    text = (REPO / "docs" / "operating.md").read_text(encoding="utf-8")
    sentence = re.search(r"`--json` prints the same as one JSON document(.*?)\.\n", text, re.S).group(1)
    return set(re.findall(r"`([a-z_]+)`", sentence))


def make_dead(conn, ids: list[int], error: str) -> None:
    """Park events as fail_events does after max_attempts."""
    conn.execute(
        "UPDATE outboxd.outbox SET status = 'dead', attempts = 5, last_error = %s, "
        "first_failed_at = now() - interval '1 minute', last_failed_at = now() WHERE id = ANY(%s)",
        (error, ids),
    )


def statuses(conn) -> dict[int, tuple[str, int]]:
    return {r["id"]: (r["status"], r["attempts"]) for r in outbox_rows(conn)}


# --- outboxd status: the outbox ----------------------------------------------------------
@pytest.fixture
async def busy_outbox(conn, make_outbox):
    """Six events: e1 old (300 s) and leased by worker-a, e2 waiting on a retry
    backoff, e3 dead, e4 leased by worker-b, e5 and e6 ready."""
    add_document(conn, [f"text {i}" for i in range(6)])
    e = event_ids(conn)
    conn.execute("UPDATE outboxd.outbox SET created_at = now() - interval '300 seconds' WHERE id = %s", (e[0],))
    a = await make_outbox("worker-a", 30)
    b = await make_outbox("worker-b", 90)
    assert [x.id for x in await a.claim(3)] == e[:3]
    assert [x.id for x in await b.claim(1)] == [e[3]]
    await a.fail([e[1]], "TimeoutError: slow", max_attempts=5, backoff=replace(EVENTS, base=100.0, cap=100.0))
    await a.fail([e[2]], "ValueError: poison", max_attempts=1, backoff=replace(EVENTS, base=1.0, cap=1.0))
    return e


async def test_status_figures_match_the_outbox(dsn, conn, tmp_path, collection, busy_outbox, capsys):
    """Backlog, lag, in-flight leases by worker, backoff and dead letters are exactly the database's."""
    code, doc, err = await status_json(capsys, dsn, tmp_path, collection)
    assert code == 0, err
    o = doc["outbox"]
    assert (o["backlog"], o["in_flight"], o["backing_off"], o["dead_letters"], o["ready"]) == (5, 2, 1, 1, 2)
    assert (o["failed_before"], o["expired_leases"]) == (1, 0)
    assert 300.0 <= o["lag_seconds"] < 360.0
    truth = conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'dead') FROM outboxd.outbox"
    ).fetchone()
    assert (o["backlog"], o["dead_letters"]) == truth
    leases = {r["worker"]: r for r in doc["leases"]}
    assert set(leases) == {"worker-a", "worker-b"}
    assert leases["worker-a"]["events"] == 1 and leases["worker-b"]["events"] == 1
    assert 20.0 < leases["worker-a"]["expires_in_seconds"] <= 30.0
    assert 80.0 < leases["worker-b"]["expires_in_seconds"] <= 90.0
    assert doc["kafka"] is None  # KAFKA_BOOTSTRAP_SERVERS unset: no consumer group to report
    assert doc["relay"]["transport"] == "notify" and doc["relay"]["lag_seconds"] is None  # no relay: `run` applies
    assert doc["capture"] == {"mode": "origin", "note": None}
    assert doc["thresholds"] == {}


@pytest.mark.parametrize("local", [True, False], ids=["local-mode", "session-qdrant"])
async def test_status_of_an_empty_outbox(dsn, tmp_path, collection, capsys, local):
    """Nothing pending: backlog 0, lag 0, no leases, no oldest event. No collection yet:
    in local mode the folder is not created; a server says the daemon creates it."""
    code, doc, _ = await status_json(capsys, dsn, tmp_path, collection, local=local)
    assert code == 0
    assert set(doc) == documented_json_keys()  # docs/operating.md lists every key, and only those
    o = doc["outbox"]
    assert (o["backlog"], o["lag_seconds"], o["oldest_pending_at"], o["dead_letters"]) == (0, 0.0, None, 0)
    assert doc["leases"] == [] and doc["catalog"] == []
    if local or server_settings() is None:
        assert doc["qdrant"]["available"] is False and "no local Qdrant storage" in doc["qdrant"]["reason"]
        assert not (tmp_path / "qdrant").exists()
    else:
        assert doc["qdrant"]["available"] is True and doc["qdrant"]["collection"] is None
        assert doc["qdrant"]["notes"] == ["no collection yet: the daemon creates it when it starts"]


async def test_expired_lease_is_reported(dsn, conn, tmp_path, collection, make_outbox, capsys):
    """A claim whose lease ran out unreleased (a dead worker) counts as expired, not in flight."""
    add_document(conn, ["one", "two"])
    a = await make_outbox("worker-gone", 30)
    await a.claim(1)
    conn.execute("UPDATE outboxd.outbox SET locked_until = now() - interval '5 seconds' WHERE locked_by = 'worker-gone'")
    _, doc, _ = await status_json(capsys, dsn, tmp_path, collection)
    o = doc["outbox"]
    assert (o["backlog"], o["in_flight"], o["expired_leases"], o["ready"]) == (2, 0, 1, 2)
    assert doc["leases"] == []


@pytest.mark.parametrize(
    ("flag", "limit", "code", "names"),
    [
        ("--max-pending", "4", 3, "--max-pending 4"),
        ("--max-pending", "5", 0, None),
        ("--max-dead-letters", "0", 3, "--max-dead-letters 0"),
        ("--max-dead-letters", "1", 0, None),
        ("--max-lag", "120", 3, "--max-lag 120"),
        ("--max-lag", "3600", 0, None),
    ],
)
async def test_status_thresholds_set_the_exit_code(dsn, tmp_path, collection, busy_outbox, capsys, flag, limit, code, names):
    """A --max-* limit that is passed exits 3 (a check found a problem) and names itself on stderr;
    one that holds exits 0."""
    got, doc, err = await status_json(capsys, dsn, tmp_path, collection, flag, limit)
    assert got == code
    (check,) = doc["thresholds"].values()
    assert check["exceeded"] is (code == 3) and check["limit"] == float(limit)
    if names:
        assert names in err
    else:
        assert "over --" not in err


async def test_status_threshold_exit_code_with_tables(dsn, tmp_path, collection, busy_outbox, capsys):
    """Without --json the tables are printed and the exit code still follows the limits."""
    base = qdrant_flags(tmp_path / "qdrant")
    code, out, err = await run_status(capsys, *base, "--max-pending", "10", "--max-dead-letters", "0")
    assert code == 3
    assert "backlog (pending)" in out and "worker-a" in out and "Kafka" not in out
    assert "relay lag" in out and "— (notify transport)" in out and "capture triggers" in out and "origin" in out
    assert "1 dead letters, over --max-dead-letters 0" in err and "--max-pending" not in err
    assert (await run_status(capsys, *base, "--max-pending", "10"))[0] == 0


def test_negative_limit_is_a_usage_error(capsys):
    """A negative --max-* value is rejected by the command line (exit 2)."""
    assert cli.main(["status", "--max-lag", "-1"]) == 2
    assert "--max-lag" in capsys.readouterr().err


async def test_status_shows_a_capture_mode_that_misses_writes(dsn, conn, tmp_path, collection, capsys):
    """Capture triggers switched off (a bulk load that forgot to re-enable them): status says
    `disabled` and what to do, in the table, in JSON and on stderr."""
    conn.execute("ALTER TABLE public.chunks DISABLE TRIGGER outboxd_capture_insert")
    code, doc, err = await status_json(capsys, dsn, tmp_path, collection)
    assert code == 0
    assert doc["capture"]["mode"] == "disabled" and "NOT being captured" in doc["capture"]["note"]
    assert "capture mode disabled" in err and "outboxd reconcile --repair" in err
    code, out, _ = await run_status(capsys, *qdrant_flags(tmp_path / "qdrant"))
    assert code == 0 and "capture triggers" in out and "note: capture mode disabled" in out

    conn.execute("ALTER TABLE public.chunks ENABLE TRIGGER ALL")  # every trigger plain ENABLE: captured twice
    _, doc, _ = await status_json(capsys, dsn, tmp_path, collection)
    assert doc["capture"]["mode"] == "mixed" and "captured twice" in doc["capture"]["note"]


async def test_status_reports_the_relay_as_the_outbox_backlog(dsn, conn, tmp_path, collection, make_outbox, capsys,
                                                              monkeypatch):
    """With the Kafka transport configured, the relay's lag is the outbox's, with the relays holding
    leases, each connected (a session named after its worker) or not (it died: its leases expire)."""
    add_document(conn, ["one", "two", "three"])
    conn.execute("UPDATE outboxd.outbox SET created_at = now() - interval '100 seconds'")
    live = await make_outbox("relay-live", 30)  # its pool's sessions are named outboxd:relay-live
    await live.claim(2)
    gone = await make_outbox("relay-gone", 30, application_name="outboxd:cli")  # no session of its own name
    await gone.claim(1)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")  # nothing listens: the kafka section says so
    monkeypatch.setenv("OUTBOXD_KAFKA__TOPIC", "docs.chunks")
    code, doc, err = await status_json(capsys, dsn, tmp_path, collection)
    assert code == 0, err
    relay = doc["relay"]
    assert relay["transport"] == "kafka" and relay["topic"] == "docs.chunks"
    assert (relay["backlog"], relay["lag_seconds"]) == (doc["outbox"]["backlog"], doc["outbox"]["lag_seconds"])
    assert relay["backlog"] == 3 and relay["lag_seconds"] >= 100
    assert relay["workers"] == [
        {"worker": "relay-gone", "events": 1, "connected": False},
        {"worker": "relay-live", "events": 2, "connected": True},
    ]
    assert "relay-live" in relay["connected"] and "relay-gone" not in relay["connected"]
    assert "error" in doc["kafka"]
    code, out, _ = await run_status(capsys, *qdrant_flags(tmp_path / "qdrant"))
    assert "2 relay(s) holding leases, 1 of them not connected" in out


# --- outboxd status: catalog and Qdrant --------------------------------------------------
async def test_status_reports_catalog_and_point_count_after_a_drain(dsn, conn, tmp_path, collection, embedder, make_settings, capsys):
    """After a drain into a local Qdrant folder, status shows the live catalog row, the exact point count and the model fingerprint."""
    settings = make_settings()
    add_document(conn, ["alpha beta", "gamma delta", "   ", "epsilon"])  # the blank chunk has no point
    client = open_qdrant(tmp_path / "qdrant")
    try:
        await drain(settings, dsn, embedder, client)
    finally:
        await client.close()

    code, doc, err = await status_json(capsys, dsn, tmp_path, collection)
    assert code == 0, err
    (row,) = doc["catalog"]
    assert (row["alias"], row["status"], row["model_name"], row["dimension"]) == (
        collection, "live", embedder.fingerprint.name, embedder.fingerprint.dimension,
    )
    q = doc["qdrant"]
    assert q["available"] is True, q
    assert q["collection"] == q["catalog_live"] == q["alias_target"] == row["name"]
    assert q["points"] == 3
    assert q["fingerprint"] == embedder.fingerprint.as_dict()
    assert q["notes"] == []
    if server_settings():  # one node without cluster mode: one shard, held once
        assert (q["peers"], q["replication_factor"], q["shard_problems"]) == (1, 1, []), q
        assert [(s["shard"], s["active"]) for s in q["shards"]] == [(0, 1)], q
    else:
        assert q["shards"] is None and q["shard_problems"] == []
    assert doc["outbox"]["backlog"] == 0 and doc["outbox"]["lag_seconds"] == 0.0

    # status closed its client: the folder opens again at once
    again = open_qdrant(tmp_path / "qdrant")
    assert (await again.count(row["name"], exact=True)).count == 3
    await again.close()


async def test_status_reports_qdrant_unavailable_when_the_folder_is_held(dsn, conn, tmp_path, collection, capsys):
    """A local Qdrant folder held by another client (a running daemon) makes only the Qdrant section unavailable."""
    add_document(conn, ["one"])
    holder = AsyncQdrantClient(path=str(tmp_path / "qdrant"))
    try:
        code, doc, err = await status_json(capsys, dsn, tmp_path, collection, "--max-pending", "5", local=True)
    finally:
        await holder.close()
    assert code == 0, err
    assert doc["outbox"]["backlog"] == 1
    assert doc["qdrant"]["available"] is False
    assert "already" in doc["qdrant"]["reason"]  # held by another process (qdrant-client: "already accessed")


async def test_inspect_counts_the_live_collection_in_process(conn, dsn, qdrant, collection, embedder, make_settings):
    """status's Qdrant inspection, on the qdrant fixture's client, finds the catalog's live collection and its points."""
    settings = make_settings()
    add_document(conn, ["one", "two"])
    await drain(settings, dsn, embedder, qdrant)
    with psycopg.connect(dsn, row_factory=dict_row) as c:
        (live,) = c.execute("SELECT * FROM outboxd.collections WHERE alias = %s AND status = 'live'", (collection,)).fetchall()
    section = await status.inspect_collection(qdrant, settings, CollectionRecord(**live), {})
    assert (section["collection"], section["points"]) == (live["name"], 2)
    assert section["fingerprint"]["id"] == live["fingerprint_id"]

    await qdrant.delete_collection(live["name"])  # lost, or the wrong Qdrant: status cannot tell, and refuses
    with pytest.raises(CollectionElsewhereError, match="does not have it"):
        await status.inspect_collection(qdrant, settings, CollectionRecord(**live), {})


# --- outboxd dead-letters ---------------------------------------------------------------------
@pytest.fixture
def dead(conn):
    """Five events: e1, e2 dead with a ValueError, e3 dead with a timeout, e4 and e5 pending."""
    add_document(conn, [f"text {i}" for i in range(5)])
    e = event_ids(conn)
    make_dead(conn, e[:2], "ValueError: metadata is a JSON list")
    make_dead(conn, [e[2]], "TimeoutError: Qdrant took too long")
    return e


def dl(capsys, dsn, *argv) -> tuple[int, str, str]:
    return run_cli(capsys, "dead-letters", *argv)


def test_list_shows_dead_letters_with_their_errors(dsn, dead, capsys, monkeypatch):
    """list --json gives each dead letter's id, chunk, op, attempts, failure times and error; a selection filters it."""
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: rich squeezes tables to 80 columns otherwise
    code, out, _ = dl(capsys, dsn, "list", "--json")
    assert code == 0
    rows = orjson.loads(out)
    assert [r["id"] for r in rows] == dead[:3]
    assert {"id", "chunk_id", "op", "attempts", "first_failed_at", "last_failed_at", "last_error"} <= set(rows[0])
    assert rows[2]["last_error"] == "TimeoutError: Qdrant took too long" and rows[0]["attempts"] == 5

    code, out, _ = dl(capsys, dsn, "list", "--json", "--error", "timeout")
    assert [r["id"] for r in orjson.loads(out)] == [dead[2]]

    code, out, _ = dl(capsys, dsn, "list")
    assert code == 0 and "3 dead letter(s)" in out
    assert "TimeoutError: Qdrant took too long" in out and str(rows[0]["chunk_id"]) in out


@pytest.mark.parametrize("columns", [120, 80])
def test_list_piped_is_one_line_per_dead_letter(dsn, conn, dead, capsys, monkeypatch, columns):
    """Each dead letter takes one line of the table, its ids whole and its error cut
    with an ellipsis, however long and many-lined the error; --json has it whole."""
    monkeypatch.setenv("COLUMNS", str(columns))
    long_error = "ValueError: " + " ".join(f"word{i}" for i in range(300)) + "\nTraceback (most recent call last):"
    make_dead(conn, [dead[3]], long_error)
    code, out, _ = dl(capsys, dsn, "list")
    assert code == 0
    lines = out.splitlines()
    assert max(map(len, lines)) <= columns, out
    rows = orjson.loads(dl(capsys, dsn, "list", "--json")[1])
    assert [r["id"] for r in rows] == dead[:4] and rows[3]["last_error"] == long_error
    assert len(lines) <= len(rows) + 8, out  # title, borders, header and caption around one line per row
    for r in rows:
        (line,) = [line for line in lines if str(r["chunk_id"]) in line]
        assert re.match(rf"│ +{r['id']} │ {r['chunk_id']} │", line), out
    (cut,) = [line for line in lines if str(rows[3]["chunk_id"]) in line]
    assert "ValueError: word0" in cut and "…" in cut and "Traceback" not in out, out
    assert "--json" in out


def test_retry_by_id(dsn, conn, dead, capsys):
    """retry --id sends back exactly those dead letters, attempts reset; an id that is not dead is named."""
    code, out, err = dl(capsys, dsn, "retry", "--id", str(dead[1]), "--id", str(dead[3]))
    assert code == 0
    assert "1 dead letter(s) back to pending" in out
    assert f"not a dead letter: {dead[3]}" in err
    s = statuses(conn)
    assert s[dead[1]] == ("pending", 0)
    assert s[dead[0]] == ("dead", 5) and s[dead[2]] == ("dead", 5)
    row = next(r for r in outbox_rows(conn) if r["id"] == dead[1])
    assert (row["last_error"], row["first_failed_at"], row["locked_by"]) == (None, None, None)


def test_retry_by_error_pattern_is_case_insensitive(dsn, conn, dead, capsys):
    """retry --error matches a case-insensitive substring of last_error."""
    code, out, _ = dl(capsys, dsn, "retry", "--error", "valueerror: METADATA", "--json")
    assert code == 0
    assert orjson.loads(out) == {"retried": 2, "ids": dead[:2]}
    s = statuses(conn)
    assert [s[i] for i in dead] == [("pending", 0), ("pending", 0), ("dead", 5), ("pending", 0), ("pending", 0)]


def test_retry_all(dsn, conn, dead, capsys):
    """retry --all sends every dead letter back, and only dead letters are touched."""
    conn.execute("UPDATE outboxd.outbox SET attempts = 2 WHERE id = %s", (dead[4],))
    code, out, _ = dl(capsys, dsn, "retry", "--all")
    assert code == 0 and "3 dead letter(s) back to pending" in out
    s = statuses(conn)
    assert [s[i] for i in dead] == [("pending", 0)] * 4 + [("pending", 2)]


@pytest.mark.parametrize(
    "argv",
    [
        ["retry"],
        ["purge", "--yes"],
        ["retry", "--all", "--id", "1"],
        ["purge", "--error", "x", "--all", "--yes"],
        ["retry", "--error", "  "],
        ["retry", "--all", "--yes"],
    ],
)
def test_selection_errors_are_usage_errors(dsn, conn, dead, capsys, argv):
    """retry/purge without exactly one selection (or with a misplaced --yes) exit 2 and change nothing."""
    before = statuses(conn)
    code, _, err = dl(capsys, dsn, *argv)
    assert code == 2
    assert "Usage: outboxd dead-letters" in err and "Error:" in err and "Traceback" not in err
    assert statuses(conn) == before


def test_purge_with_yes_deletes_the_selection(dsn, conn, dead, capsys):
    """purge --error PATTERN --yes deletes the matching dead letters and nothing else."""
    code, out, _ = dl(capsys, dsn, "purge", "--error", "TIMEOUTERROR", "--yes")
    assert code == 0 and "1 dead letter(s) deleted" in out
    assert set(statuses(conn)) == set(dead) - {dead[2]}

    code, out, _ = dl(capsys, dsn, "purge", "--all", "--yes", "--json")
    assert code == 0 and orjson.loads(out) == {"deleted": 2, "ids": dead[:2]}
    assert statuses(conn) == {dead[3]: ("pending", 0), dead[4]: ("pending", 0)}


def test_purge_without_yes_and_without_a_terminal_refuses(dsn, conn, dead, capsys):
    """Without a TTY and without --yes, purge deletes nothing, exits 2 and says to add --yes."""
    before = statuses(conn)
    code, out, err = dl(capsys, dsn, "purge", "--all")
    assert code == 2
    assert "add --yes" in err and "3 dead letter(s)" in err
    assert statuses(conn) == before


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "deleted"), [("y\n", True), ("n\n", False), ("", False)])
def test_purge_on_a_terminal_asks_first(dsn, conn, dead, capsys, monkeypatch, answer, deleted):
    """On a TTY purge asks `Delete N dead letters? [y/N]` and deletes only on yes."""
    monkeypatch.setattr("sys.stdin", FakeTerminal(answer))
    code, out, err = dl(capsys, dsn, "purge", "--id", str(dead[0]), "--id", str(dead[1]))
    assert code == 0
    assert "Delete 2 dead letters? [y/N]" in err
    remaining = set(statuses(conn))
    if deleted:
        assert "2 dead letter(s) deleted" in out and remaining == set(dead[2:])
    else:
        assert "nothing deleted" in out and remaining == set(dead)
