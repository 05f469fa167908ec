"""How `outboxd status` judges and shows what daemon.admin.status gathered: the
--max-* limits checked against the outbox's figures (thresholds), and the
tables printed on a terminal (render); --json prints the report itself."""
from __future__ import annotations

from typing import Any

from daemon.commands.common import print_line, print_table
from daemon.embedding.embedder import ModelFingerprint


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
        rows += [{"": "warning", "value": p} for p in q["shard_problems"]]
        if q["configuration"]:
            rows += [{"": "differs", "value": d} for d in q["configuration"]["differences"]]
    print_table(rows, ["", "value"], title="Qdrant")
    if q["available"] and q["shards"] and q["peers"] > 1:  # a single node holds every shard once: nothing to show
        print_table(
            [{"shard": s["shard"], "active": f"{s['active']} of {q['replication_factor']}",
              "replicas": ", ".join(f"peer {peer}: {state}" for peer, state in s["replicas"].items())}
             for s in q["shards"]],
            ["shard", "active", "replicas"],
            title=f"Shards of {q['collection']} ({q['peers']} peers)",
        )
