"""`outboxd collection`: the live collection's configuration beside the [qdrant]
settings, each difference named; --apply makes those Qdrant can make in place.

A daemon never changes a collection that exists: rebuilding an HNSW index or
quantizing a million vectors is the operator's decision, taken here, with a
dry run first (the default). What Qdrant fixes at creation (the shard number)
takes a reindex into a new collection, which readers never miss; the message
says so.
"""
from __future__ import annotations

import sys

import click

from daemon.commands.options import json_option, settings_options, verdict
from daemon.errors import EXIT_CHECK_FAILED


@click.command(help="Show the live collection's configuration (shards, replicas, HNSW, quantization, on-disk "
               "storage, payload indexes) beside the [qdrant] settings, naming each difference. A dry run by "
               "default; --apply makes the changes Qdrant can make in place (and adds the shard replicas a raised "
               "replication factor asks for). --check exits 3 while any difference remains.")
@click.option("--apply", is_flag=True, help="make the in-place changes now (Qdrant rebuilds indexes in the "
              "background; searches keep answering)")
@click.option("--check", is_flag=True, help="exit 3 when the collection differs from the settings")
@json_option
@settings_options(qdrant=True)
def command(settings, apply: bool, check: bool, as_json: bool) -> int:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    import asyncio

    from daemon.commands.common import print_json

    report = asyncio.run(_collection(settings, apply))
    left = report["differences"]
    fixed = [d for d in left if not d["in_place"]]
    failed = (check and left) or (apply and fixed)
    code = verdict(EXIT_CHECK_FAILED if failed else 0)
    if as_json:
        print_json(report)
    else:
        _print(report, apply)
    return code


async def _collection(settings, apply: bool) -> dict:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.commands.common import live_collection, open_services
    from daemon.core.cluster import placement
    from daemon.core.collection_shape import CollectionShape
    from daemon.core.qdrant_store import QdrantStore

    shape = CollectionShape.of(settings)
    async with open_services(settings) as (pool, client):
        live = await live_collection(settings, pool, client)
        store = QdrantStore(client, settings.collection, live.name, shape=shape)
        server = settings.qdrant.url is not None
        info = await client.get_collection(live.name)
        differences = shape.differences(info) if server else []
        factor = info.config.params.replication_factor
        applied: list[str] = []
        if apply and server:
            await store.reshape(differences)
            applied = [d.name for d in differences if d.in_place]
            info = await client.get_collection(live.name)
            differences = shape.differences(info)
            # the factor just applied: the node may not show it yet (a cluster applies it through consensus)
            factor = shape.settings.replication_factor or factor
            moves = (await placement(client, live.name, factor)).replications()
            await store.add_replicas(moves)
            applied += [f"shard {m.shard_id}: a replica from peer {m.from_peer_id} to peer {m.to_peer_id}"
                        for m in moves]
        shards = await placement(client, live.name, factor) if server else None
        return {
            "collection": live.name,
            "alias": settings.collection,
            "server": server,
            "configured": shape.wanted(),
            "actual": shape.actual(info) if server else {},
            "indexes": {name: (index.data_type.value, bool(getattr(index.params, "is_tenant", False)))
                        for name, index in sorted((info.payload_schema or {}).items())} if server else {},
            "differences": [{"name": d.name, "configured": d.configured, "actual": d.actual,
                             "in_place": d.in_place, "message": str(d)} for d in differences],
            "applied": applied,
            "shards": [s.as_dict() for s in shards.shards] if shards else [],
            "shard_problems": shards.problems() if shards else [],
        }


def _print(report: dict, apply: bool) -> None:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.core.collection_shape import show

    print(f"collection {report['collection']} (alias {report['alias']})")
    if not report["server"]:
        print("  local mode: no shards, HNSW settings, quantization or payload indexes to configure; the [qdrant] "
              "collection settings apply to a Qdrant server")
        return
    configured = report["configured"]
    for name, value in report["actual"].items():
        wanted = f"  (configured {show(configured[name])})" if name in configured else ""
        print(f"  {name:<26} {show(value)}{wanted}")
    for name, (kind, tenant) in report["indexes"].items():
        print(f"  index {name:<20} {kind}{' (tenant)' if tenant else ''}")
    for shard in report["shards"]:
        replicas = ", ".join(f"peer {p}: {state}" for p, state in shard["replicas"].items())
        print(f"  shard {shard['shard']:<20} {replicas}")
    for line in report["applied"]:
        print(f"applied: {line}")
    for problem in report["shard_problems"]:
        print(f"warning: {problem}", file=sys.stderr)
    if not report["differences"]:
        print("the collection is as configured")
        return
    for d in report["differences"]:
        print(f"differs: {d['message']}")
    if not apply and any(d["in_place"] for d in report["differences"]):
        print("run `outboxd collection --apply` to make the in-place changes")
