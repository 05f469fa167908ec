"""`outboxd status`: what an operator (or a probe) needs at a glance: the
backlog and its lag, leases by worker, retries and dead letters, the catalog of
collections, and the live Qdrant collection with its point count and model.

With --max-lag / --max-pending / --max-dead-letters it exits 1 when a limit is
passed (and says which on stderr), so cron or a monitoring probe can alert.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import psycopg

from daemon.commands.common import connect, print_json, print_table
from daemon.embedding.embedder import ModelFingerprint
from daemon.errors import EXIT_FAILURE, EXIT_OK, SchemaNotReadyError, ServiceUnavailableError, describe
from daemon.core.qdrant_store import QdrantSink, describe_target, make_client
from db.queries import query



def _limit(kind):
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def register(sub, parents) -> None:
    p = sub.add_parser(
        "status",
        parents=parents,
        help="backlog, lag, leases, dead letters, catalog and the live Qdrant collection",
        description="Show the outbox backlog and lag, leases by worker, retries, dead letters, the "
        "collection catalog and the live Qdrant collection. With a --max-* limit, exit 1 when it is passed.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--max-lag", type=_limit(float), metavar="SECONDS",
                   help="exit 1 if the oldest pending event is older than this")
    p.add_argument("--max-pending", type=_limit(int), metavar="N", help="exit 1 if more than N events are pending")
    p.add_argument("--max-dead-letters", type=_limit(int), metavar="N", help="exit 1 if there are more than N dead letters")
    p.set_defaults(func=execute)


# --- PostgreSQL ------------------------------------------------------------------------
def read_database(settings) -> dict[str, Any]:
    try:
        conn = connect(settings)
    except psycopg.OperationalError as exc:
        raise ServiceUnavailableError(f"PostgreSQL is unreachable: {describe(exc)}") from exc
    with conn:
        try:
            outbox = conn.execute(query("status_outbox")).fetchone()
            leases = conn.execute(query("status_leases")).fetchall()
            catalog = conn.execute(query("list_collections"), {"alias": None}).fetchall()
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            raise SchemaNotReadyError(
                f"the outboxd schema is missing or out of date ({describe(exc)}); run `outboxd migrate`"
            ) from exc
    return {"outbox": outbox, "leases": leases, "catalog": catalog}


# --- Qdrant ----------------------------------------------------------------------------
def _unavailable(section: dict[str, Any], reason: str) -> dict[str, Any]:
    return {**section, "available": False, "reason": reason}


async def read_qdrant(settings, catalog_live: dict[str, Any] | None) -> dict[str, Any]:
    """The live collection of settings.collection as Qdrant has it. Never raises:
    a Qdrant that cannot be opened (a server down, or the local-mode folder that
    a running daemon holds: local mode allows one process) is reported as such."""
    section: dict[str, Any] = {"target": describe_target(settings), "alias": settings.collection}
    if not settings.qdrant_url:
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
        return await asyncio.wait_for(_inspect(client, settings, catalog_live, section), settings.qdrant_timeout)
    except Exception as exc:  # unreachable server, timeout, refused request
        return _unavailable(section, describe(exc))
    finally:
        await client.close()


async def _inspect(client, settings, catalog_live, section) -> dict[str, Any]:
    sink = QdrantSink(client, settings.collection)
    alias_target = await sink.resolve()
    live_name = catalog_live["name"] if catalog_live else None
    physical = live_name or alias_target
    notes: list[str] = []
    section = {
        **section,
        "available": True,
        "alias_target": alias_target,
        "catalog_live": live_name,
        "collection": physical,
        "points": None,
        "fingerprint": None,
        "notes": notes,
    }
    if physical is None:
        notes.append("no collection yet: the daemon creates it when it starts")
        return section
    if not await client.collection_exists(physical):
        notes.append(f"the catalog's live collection {physical!r} is missing in Qdrant")
        return section
    if live_name and alias_target != live_name:
        notes.append(f"alias {settings.collection!r} points at {alias_target!r}, not at the live collection")
    sink.collection = physical
    section["points"] = (await client.count(physical, exact=True)).count
    fingerprint = await sink.recorded_fingerprint()
    section["fingerprint"] = fingerprint.as_dict() if fingerprint else None
    if fingerprint is None:
        notes.append("the collection records no outboxd model fingerprint")
    elif catalog_live and catalog_live.get("fingerprint_id") != fingerprint.id:
        notes.append(
            f"the catalog records model fingerprint {catalog_live.get('fingerprint_id')}, "
            f"the collection {fingerprint.id}"
        )
    return section


# --- the report ------------------------------------------------------------------------
def thresholds(args, outbox: dict[str, Any]) -> dict[str, dict[str, Any]]:
    checks = {
        "max_lag": (args.max_lag, outbox["lag_seconds"], "oldest pending event is {value:.1f} s old"),
        "max_pending": (args.max_pending, outbox["backlog"], "{value} events pending"),
        "max_dead_letters": (args.max_dead_letters, outbox["dead_letters"], "{value} dead letters"),
    }
    return {
        name: {"limit": limit, "value": value, "exceeded": value > limit,
               "message": template.format(value=value) + f", over --{name.replace('_', '-')} {limit}"}
        for name, (limit, value, template) in checks.items()
        if limit is not None
    }


def collect(settings, args) -> dict[str, Any]:
    db = read_database(settings)
    outbox = dict(db["outbox"])
    db_now = outbox.pop("db_now")
    live = next((r for r in db["catalog"] if r["alias"] == settings.collection and r["status"] == "live"), None)
    return {
        "db_now": db_now,
        "outbox": outbox,
        "leases": db["leases"],
        "kafka": read_kafka(settings),
        "catalog": db["catalog"],
        "qdrant": asyncio.run(read_qdrant(settings, live)),
        "thresholds": thresholds(args, outbox),
    }


def read_kafka(settings) -> dict[str, Any] | None:
    """The consumer group's lag, where KAFKA_BOOTSTRAP_SERVERS is set (the
    relay's own lag is the outbox's: it claims from it)."""
    if not settings.kafka_bootstrap_servers:
        return None
    from consumers.kafka_clients import group_lag

    try:
        return asyncio.run(asyncio.wait_for(group_lag(settings), 20))
    except Exception as exc:  # status reports what it can reach
        return {"topic": settings.kafka_topic, "group": settings.kafka_group, "error": describe(exc)}


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def render(report: dict[str, Any]) -> None:
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
        ],
        ["", "value"],
        title="Outbox",
    )
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
        print("Catalog: no collections recorded yet")
    q = report["qdrant"]
    rows = [{"": "target", "value": q["target"]}, {"": "alias", "value": q["alias"]}]
    if not q["available"]:
        rows.append({"": "unavailable", "value": q["reason"]})
    else:
        fp = q["fingerprint"]
        rows += [
            {"": "alias points at", "value": q["alias_target"]},
            {"": "live collection", "value": q["collection"]},
            {"": "points", "value": q["points"]},
            {"": "model", "value": f"{ModelFingerprint.from_dict(fp)}, id {fp['id']}" if fp else None},
        ]
        rows += [{"": "note", "value": n} for n in q["notes"]]
    print_table(rows, ["", "value"], title="Qdrant")


def execute(args, settings) -> int:
    report = collect(settings, args)
    if args.json:
        print_json(report)
    else:
        render(report)
    exceeded = [t["message"] for t in report["thresholds"].values() if t["exceeded"]]
    for message in exceeded:
        print(f"outboxd status: {message}", file=sys.stderr)
    return EXIT_FAILURE if exceeded else EXIT_OK
