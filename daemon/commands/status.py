"""`outboxd status`: what an operator (or a probe) needs at a glance: the
backlog and its lag, the relay's share of it, leases by worker, retries and
dead letters, the capture-trigger mode, the continuous verifier (its holder,
how far its pass is, its last full pass, the drift it found), the catalog of
collections, and the live Qdrant collection with its point count and model.

With --max-lag / --max-pending / --max-dead-letters it exits 3 (a check found
a problem) when a limit is passed, and says which on stderr, so cron or a
monitoring probe can alert; an unreachable PostgreSQL is 69, not 3.
"""
from __future__ import annotations

import sys
from typing import Any

import click

from daemon.commands.options import json_option, settings_options, verdict

CAPTURE_NOTES = {
    "mixed": "the capture triggers match neither mode: some changes are missed or captured twice. "
    "Repair with `outboxd migrate --capture-triggers origin` (or always), then `outboxd reconcile --repair`",
    "disabled": "ordinary writes are NOT being captured (a capture trigger is missing or disabled): the "
    "collection stops following the table. Repair with `outboxd migrate --capture-triggers origin` "
    "(or always), then `outboxd reconcile --repair` catches up what was missed",
}


@click.command(help="Show the outbox backlog and lag, the relay (Kafka transport), leases by worker, retries, "
               "dead letters, the capture-trigger mode, the continuous verifier, the collection catalog and the "
               "live Qdrant collection. "
               "With a --max-* limit, exit 3 when it is passed.")
@json_option
@click.option("--max-lag", type=click.FloatRange(min=0), metavar="SECONDS",
              help="exit 3 if the oldest pending event is older than this")
@click.option("--max-pending", type=click.IntRange(min=0), metavar="N", help="exit 3 if more than N events are pending")
@click.option("--max-dead-letters", type=click.IntRange(min=0), metavar="N",
              help="exit 3 if there are more than N dead letters")
@settings_options(qdrant=True, settings="stream_settings")  # the Kafka wing's, where it is installed
def command(settings, as_json: bool, max_lag: float | None, max_pending: int | None,
            max_dead_letters: int | None) -> int:
    from daemon.commands.common import print_json
    from daemon.errors import EXIT_CHECK_FAILED, EXIT_CONFIG

    limits = {"max_lag": max_lag, "max_pending": max_pending, "max_dead_letters": max_dead_letters}
    report = collect(settings, limits)
    exceeded = [t["message"] for t in report["thresholds"].values() if t["exceeded"]]
    # what it could read is printed either way; a Qdrant setting that cannot work is 78, as for every command
    misconfigured = report["qdrant"]["reason"] if report["qdrant"].get("config_error") else None
    code = verdict(EXIT_CONFIG if misconfigured else EXIT_CHECK_FAILED if exceeded else 0)
    if as_json:
        print_json(report)
    else:
        render(report)
    note = report["capture"]["note"]
    if note and as_json:  # the tables say it on stdout
        print(f"outboxd status: capture mode {report['capture']['mode']}: {note}", file=sys.stderr)
    for message in exceeded:
        print(f"outboxd status: {message}", file=sys.stderr)
    if misconfigured:
        print(f"outboxd status: {misconfigured}", file=sys.stderr)
    return code


# --- PostgreSQL ------------------------------------------------------------------------
def read_database(settings) -> dict[str, Any]:
    import psycopg

    from daemon.commands.common import connect
    from daemon.errors import SchemaNotReadyError, describe
    from db import capture
    from db.queries import query

    # a refusal (78) or an outage (69, with the stopped-embedded hint) is the exit-code contract's to report
    with connect(settings) as conn:
        try:
            outbox = conn.execute(query("status_outbox")).fetchone()
            leases = conn.execute(query("status_leases")).fetchall()
            catalog = conn.execute(query("list_collections"), {"alias": None}).fetchall()
            verifier = conn.execute(query("verify_status"), {"collection": settings.collection}).fetchone()
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            raise SchemaNotReadyError(
                f"the outboxd schema is missing or out of date ({describe(exc)}); run `outboxd migrate`"
            ) from exc
        processes = conn.execute(query("status_processes"), {}).fetchall()
        mode = capture.capture_mode(conn)
    return {"outbox": outbox, "leases": leases, "catalog": catalog, "processes": processes, "capture": mode,
            "verifier": verifier}


def capture_section(mode: str | None) -> dict[str, Any]:
    if mode is None:
        return {"mode": None, "note": "this schema predates capture modes; run `outboxd migrate`"}
    return {"mode": mode, "note": CAPTURE_NOTES.get(mode)}


def verifier_section(settings, row: dict[str, Any] | None) -> dict[str, Any]:
    """The continuous verifier of settings.collection, as its row in PostgreSQL has it:
    every daemon of the fleet shares the one row."""
    from daemon.outbox.verifier import position_of

    if row is None:
        return {"collection": settings.collection, "holder": None, "lease_live": False,
                "note": "no daemon has verified this collection yet: `outboxd run` verifies it while "
                        "OUTBOXD_VERIFY__CHUNKS_PER_SECOND is above 0 (the default)"}
    section = {k: v for k, v in row.items() if k not in ("db_now", "lease_until", "updated_at")}
    section["position"] = round(position_of(row["after_id"]), 4)
    section["note"] = None if row["lease_live"] else (
        f"the lease of {row['holder']} ran out and no daemon holds it: no `outboxd run` verifies now "
        "(every one stopped, or OUTBOXD_VERIFY__CHUNKS_PER_SECOND=0)")
    return section


def relay_section(settings, outbox: dict[str, Any], leases: list[dict], processes: list[dict]) -> dict[str, Any]:
    """The relay's work is the outbox's backlog: it claims events like `outboxd run`
    and publishes them. With KAFKA_BOOTSTRAP_SERVERS set the processes holding
    leases are relays; each is `connected` when a session named after its worker
    (application_name outboxd:<worker name>) is open, so a lease of a relay that
    died shows as not connected until it expires."""
    kafka = kafka_of(settings)
    if kafka is None:
        return {"transport": "notify", "backlog": None, "lag_seconds": None, "workers": [], "connected": [],
                "note": "no relay: `outboxd run` applies the outbox itself (KAFKA_BOOTSTRAP_SERVERS is unset)"}
    connected = sorted(p["worker"] for p in processes)
    workers = [
        {"worker": lease["worker"], "events": lease["events"],
         "connected": f"outboxd:{lease['worker']}"[:63][len("outboxd:"):] in connected}
        for lease in leases
    ]
    return {"transport": "kafka", "topic": kafka.topic, "backlog": outbox["backlog"],
            "lag_seconds": outbox["lag_seconds"], "workers": workers, "connected": connected, "note": None}


# --- Qdrant ----------------------------------------------------------------------------
def _unavailable(section: dict[str, Any], reason: str, *, config_error: bool = False) -> dict[str, Any]:
    """Qdrant could not be read, and why; config_error: a reason no waiting heals (status exits 78)."""
    return {**section, "available": False, "reason": reason, "config_error": config_error}


async def read_qdrant(settings, record) -> dict[str, Any]:
    """The live collection of settings.collection as Qdrant has it. Never raises:
    a Qdrant that cannot be opened (a server down, or the local-mode folder that
    a running daemon holds: local mode allows one process) is reported as such."""
    import asyncio
    from pathlib import Path

    from daemon.core.qdrant_connect import check_named, describe_target, make_client
    from daemon.errors import ConfigError, describe, refusal

    section: dict[str, Any] = {"target": describe_target(settings), "alias": settings.collection}
    try:
        check_named(settings)
    except ConfigError as exc:
        return _unavailable(section, str(exc), config_error=True)
    if not settings.qdrant.url:
        path = settings.local_qdrant_path
        if path == ":memory:":
            return _unavailable(section, "in-memory local mode keeps nothing another process can read")
        if not Path(path).exists():  # opening it would create an empty storage folder
            return _unavailable(section, f"no local Qdrant storage at {path} (the daemon has not run yet)")
    try:
        client = make_client(settings)
    except Exception as exc:  # e.g. RuntimeError: the storage folder is held by the running daemon
        return _unavailable(section, describe(exc))
    try:
        return await asyncio.wait_for(_inspect(client, settings, record, section), settings.qdrant.timeout)
    except ConfigError as exc:  # a server that is not Qdrant; the live collection is not in this Qdrant
        return _unavailable(section, str(exc), config_error=True)
    except Exception as exc:  # unreachable server, timeout, refused request
        if (refused := refusal(exc)) is not None:  # a refused key does not heal by waiting: 78
            return _unavailable(section, str(refused), config_error=True)
        return _unavailable(section, describe(exc))
    finally:
        await client.close()


async def _inspect(client, settings, record, section) -> dict[str, Any]:
    """The live collection as Qdrant has it; `record`: the catalog's live row (a CollectionRecord), if any."""
    from daemon.core.catalog import view
    from daemon.core.qdrant_connect import describe_target, probe
    from daemon.core.qdrant_store import read_fingerprint
    from daemon.embedding.fingerprint import check_fingerprint
    from daemon.errors import ConfigError

    info = await probe(client, settings)  # None in local mode, which is the client's own
    version = info.version if info is not None else None
    live = await view(client, settings.collection, record)
    live.check_home(describe_target(settings))  # missing here, or another collection of its name: 78
    notes: list[str] = []
    section = {
        **section,
        "available": True,
        "server_version": version,
        "alias_target": live.alias_target,
        "catalog_live": record.name if record else None,
        "collection": live.name,
        "points": None,
        "fingerprint": None,
        "notes": notes,
    }
    if live.name is None:
        notes.append("no collection yet: the daemon creates it when it starts")
        return section
    if record and live.alias_target != record.name:
        notes.append(f"alias {settings.collection!r} points at {live.alias_target!r}, not at the live collection")
    section["points"] = (await client.count(live.name, exact=True)).count
    recorded = await read_fingerprint(client, live.name)
    section["fingerprint"] = recorded.as_dict() if recorded else None
    if recorded is None:
        try:
            check_fingerprint(None, record.fingerprint if record else None, settings.collection, live.name)
        except ConfigError as exc:
            notes.append(str(exc))
    elif record and record.fingerprint_id != recorded.id:  # the catalog's own consistency, not the model's
        notes.append(f"the catalog records model fingerprint {record.fingerprint_id}, the collection {recorded.id}")
    return section


# --- Kafka -------------------------------------------------------------------------------
def kafka_of(settings):
    """The [kafka] table where the Kafka wing is installed (its settings class is
    what this command builds then) and KAFKA_BOOTSTRAP_SERVERS is set, else None."""
    kafka = getattr(settings, "kafka", None)
    return kafka if kafka is not None and kafka.bootstrap_servers else None


def read_kafka(settings) -> dict[str, Any] | None:
    """The consumer group's lag, where KAFKA_BOOTSTRAP_SERVERS is set: the Kafka
    wing's report, found by name (the core never imports consumers/)."""
    if kafka_of(settings) is None:
        return None
    from daemon.wings import plugin

    return plugin("kafka_status")(settings)


# --- the report ------------------------------------------------------------------------
def thresholds(limits: dict[str, Any], outbox: dict[str, Any]) -> dict[str, dict[str, Any]]:
    checks = {
        "max_lag": (outbox["lag_seconds"], "oldest pending event is {value:.1f} s old"),
        "max_pending": (outbox["backlog"], "{value} events pending"),
        "max_dead_letters": (outbox["dead_letters"], "{value} dead letters"),
    }
    return {
        name: {"limit": limits[name], "value": value, "exceeded": value > limits[name],
               "message": template.format(value=value) + f", over --{name.replace('_', '-')} {limits[name]}"}
        for name, (value, template) in checks.items()
        if limits.get(name) is not None
    }


def collect(settings, limits: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    from daemon.core.catalog import CollectionRecord, live_of

    db = read_database(settings)
    outbox = dict(db["outbox"])
    db_now = outbox.pop("db_now")
    live = live_of([CollectionRecord(**r) for r in db["catalog"]], settings.collection)
    return {
        "db_now": db_now,
        "outbox": outbox,
        "relay": relay_section(settings, outbox, db["leases"], db["processes"]),
        "capture": capture_section(db["capture"]),
        "verifier": verifier_section(settings, db["verifier"]),
        "leases": db["leases"],
        "kafka": read_kafka(settings),
        "catalog": db["catalog"],
        "qdrant": asyncio.run(read_qdrant(settings, live)),
        "thresholds": thresholds(limits, outbox),
    }


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def _relay_value(relay: dict[str, Any]) -> str:
    if relay["transport"] != "kafka":
        return "— (notify transport)"
    gone = sum(not w["connected"] for w in relay["workers"])
    return (f"{_seconds(relay['lag_seconds'])} ({len(relay['workers'])} relay(s) holding leases"
            + (f", {gone} of them not connected: their leases expire" if gone else "") + ")")


def _drift(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "—"
    found = {k: n for k, n in counts.items() if n}
    return ", ".join(f"{n} {k}" for k, n in sorted(found.items())) if found else "none"


def render_verifier(v: dict[str, Any]) -> None:
    from daemon.commands.common import print_line, print_table

    if v["holder"] is None:
        print_line(f"Verifier: {v['note']}")
        return
    lease = (f"lease ends in {_seconds(v['lease_expires_in_seconds'])}" if v["lease_live"]
             else "lease ran out: nobody verifies now")
    last = "none yet"
    if v["last_pass_completed_at"] is not None:
        last = (f"{v['last_pass_completed_at']:%Y-%m-%d %H:%M:%S %Z}, {v['last_pass_checked']} chunks in "
                f"{_seconds(v['last_pass_seconds'])}")
    print_table(
        [
            {"": "holder", "value": f"{v['holder']} ({lease})"},
            {"": "position", "value": f"{v['position']:.1%} of the pass ({v['pass_checked']} chunks checked, "
                                      f"started {v['pass_started_at']:%Y-%m-%d %H:%M:%S %Z})"},
            {"": "drift found this pass", "value": _drift(v["pass_drift"])},
            {"": "last full pass", "value": last},
            {"": "drift found in it", "value": _drift(v["last_pass_drift"])},
            {"": "full passes", "value": v["passes"]},
        ],
        ["", "value"],
        title=f"Verifier of {v['collection']!r}",
    )
    if v["note"]:
        print_line(f"note: verifier: {v['note']}")


def render(report: dict[str, Any]) -> None:
    from daemon.commands.common import print_line, print_table
    from daemon.embedding.embedder import ModelFingerprint

    o = report["outbox"]
    print_table(
        [
            {"": "backlog (pending)", "value": o["backlog"]},
            {"": "lag (oldest pending)", "value": _seconds(o["lag_seconds"])},
            {"": "ready to claim", "value": o["ready"]},
            {"": "in flight (leased)", "value": o["in_flight"]},
            {"": "waiting on retry backoff", "value": o["backing_off"]},
            {"": "failed before, retrying", "value": o["failed_before"]},
            {"": "expired leases", "value": o["expired_leases"]},
            {"": "dead letters", "value": o["dead_letters"]},
            {"": "relay lag", "value": _relay_value(report["relay"])},
            {"": "capture triggers", "value": report["capture"]["mode"] or "unknown"},
        ],
        ["", "value"],
        title="Outbox",
    )
    if report["capture"]["note"]:
        print_line(f"note: capture mode {report['capture']['mode']}: {report['capture']['note']}")
    render_verifier(report["verifier"])
    kafka = report["kafka"]
    if kafka is not None:
        value = kafka.get("error") or f"{kafka['consumer_lag']} messages behind"
        print_table(
            [{"": f"group {kafka['group']!r} on {kafka['topic']!r}", "value": value}]
            + [{"": f"  partition {p}", "value": lag} for p, lag in (kafka.get("partitions") or {}).items() if lag],
            ["", "value"],
            title="Kafka consumers",
        )
    if report["leases"]:
        print_table(
            [{**r, "next lease ends in": _seconds(r["expires_in_seconds"]),
              "last lease ends in": _seconds(r["last_expires_in_seconds"])} for r in report["leases"]],
            ["worker", "events", "next lease ends in", "last lease ends in"],
            title="Leases by worker",
        )
    if report["catalog"]:
        print_table(report["catalog"], ["alias", "name", "model_name", "dimension", "status"], title="Catalog")
    else:
        print_line("Catalog: no collections recorded yet")
    q = report["qdrant"]
    rows = [{"": "target", "value": q["target"]}, {"": "alias", "value": q["alias"]}]
    if not q["available"]:
        rows.append({"": "unavailable", "value": q["reason"]})
    else:
        fp = q["fingerprint"]
        if q["server_version"]:
            rows.append({"": "server version", "value": q["server_version"]})
        rows += [
            {"": "alias points at", "value": q["alias_target"]},
            {"": "live collection", "value": q["collection"]},
            {"": "points", "value": q["points"]},
            {"": "model", "value": f"{ModelFingerprint.from_dict(fp)}, id {fp['id']}" if fp else None},
        ]
        rows += [{"": "note", "value": n} for n in q["notes"]]
    print_table(rows, ["", "value"], title="Qdrant")
