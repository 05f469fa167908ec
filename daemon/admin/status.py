"""What `outboxd status` reads, gathered into one report (a dict whose keys are
those of `status --json`): PostgreSQL through db.reads.OperatorReads (the
outbox, leases, connected processes, the capture mode, the continuous verifier,
the catalog), the live Qdrant collection (on a server, its shards and their
replicas too), and, where KAFKA_BOOTSTRAP_SERVERS is set, the Kafka wing's
consumer-group lag. Reading never judges: the limits and the text are
daemon.commands.status_render's."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psycopg

from daemon.core.catalog import CollectionRecord, live_of, view
from daemon.core.cluster import placement
from daemon.core.collection_shape import CollectionShape
from daemon.core.qdrant_connect import check_named, describe_target, make_client, probe
from daemon.core.qdrant_store import identity
from daemon.embedding.fingerprint import check_fingerprint
from daemon.errors import ConfigError, SchemaNotReadyError, describe, refusal
from daemon.outbox.verifier import position_of
from daemon.wings import plugin
from db.reads import OperatorReads

CAPTURE_NOTES = {
    "mixed": "the capture triggers match neither mode: some changes are missed or captured twice. "
    "Repair with `outboxd migrate --capture-triggers origin` (or always), then `outboxd reconcile --repair`",
    "disabled": "ordinary writes are NOT being captured (a capture trigger is missing or disabled): the "
    "collection stops following the table. Repair with `outboxd migrate --capture-triggers origin` "
    "(or always), then `outboxd reconcile --repair` catches up what was missed",
}


async def gather(settings, reads: OperatorReads) -> dict[str, Any]:
    """Everything `outboxd status` shows but its limits (the command adds `thresholds`).
    PostgreSQL's errors are raised (the exit-code contract reports them); Qdrant's and
    Kafka's are reported in their sections."""
    db = await read_database(settings, reads)
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
        "kafka": await read_kafka(settings),
        "catalog": db["catalog"],
        "qdrant": await read_qdrant(settings, live),
    }


# --- PostgreSQL ------------------------------------------------------------------------
async def read_database(settings, reads: OperatorReads) -> dict[str, Any]:
    try:
        outbox = await reads.outbox()
        leases = await reads.leases()
        catalog = await reads.catalog()
        verifier = await reads.verifier(settings.collection)
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        raise SchemaNotReadyError(
            f"the outboxd schema is missing or out of date ({describe(exc)}); run `outboxd migrate`"
        ) from exc
    return {"outbox": outbox, "leases": leases, "catalog": catalog, "processes": await reads.processes(),
            "capture": await reads.capture_mode(), "verifier": verifier}


def capture_section(mode: str | None) -> dict[str, Any]:
    if mode is None:
        return {"mode": None, "note": "this schema predates capture modes; run `outboxd migrate`"}
    return {"mode": mode, "note": CAPTURE_NOTES.get(mode)}


def verifier_section(settings, row: dict[str, Any] | None) -> dict[str, Any]:
    """The continuous verifier of settings.collection, as its row in PostgreSQL has it:
    every daemon of the fleet shares the one row."""
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
        return await asyncio.wait_for(inspect_collection(client, settings, record, section), settings.qdrant.timeout)
    except ConfigError as exc:  # a server that is not Qdrant; the live collection is not in this Qdrant
        return _unavailable(section, str(exc), config_error=True)
    except Exception as exc:  # unreachable server, timeout, refused request
        if (refused := refusal(exc)) is not None:  # a refused key does not heal by waiting: 78
            return _unavailable(section, str(refused), config_error=True)
        return _unavailable(section, describe(exc))
    finally:
        await client.close()


async def inspect_collection(client, settings, record, section) -> dict[str, Any]:
    """The live collection as Qdrant has it; `record`: the catalog's live row (a CollectionRecord), if any."""
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
        "peers": None,
        "replication_factor": None,
        "shards": None,
        "shard_problems": [],
        "configuration": None,
        "notes": notes,
    }
    if live.name is None:
        notes.append("no collection yet: the daemon creates it when it starts")
        return section
    if record and live.alias_target != record.name:
        notes.append(f"alias {settings.collection!r} points at {live.alias_target!r}, not at the live collection")
    section["points"] = (await client.count(live.name, exact=True)).count
    collection = await client.get_collection(live.name)
    if info is not None:  # a server: its configuration, shards and replicas (local mode has none)
        shape = CollectionShape.of(settings)
        section["configuration"] = {
            "configured": shape.wanted(), "actual": shape.actual(collection),
            "differences": [str(d) for d in shape.differences(collection)],
        }
        try:
            shards = await placement(client, live.name, collection.config.params.replication_factor)
        except Exception as exc:  # noqa: BLE001 - a key that may not read the cluster's state: the rest stands
            notes.append(f"the shards' placement could not be read ({describe(exc)})")
        else:
            section["peers"] = len(shards.peers)
            section["replication_factor"] = shards.replication_factor
            section["shards"] = [s.as_dict() for s in shards.shards]
            section["shard_problems"] = shards.problems()
    recorded = identity(collection)[0]
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


async def read_kafka(settings) -> dict[str, Any] | None:
    """The consumer group's lag, where KAFKA_BOOTSTRAP_SERVERS is set: the Kafka
    wing's report, found by name (the core never imports consumers/)."""
    if kafka_of(settings) is None:
        return None
    return await plugin("kafka_status")(settings)
