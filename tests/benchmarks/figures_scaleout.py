"""Figures about scale: N notify daemons on one outbox (5d) and N Kafka
consumers in one group (5e), each a separate `outboxd` process against one
Qdrant server (local mode admits one process: these need a server).

The processes are the CLI as deployed (`python -m daemon.cli run --drain`,
`python -m daemon.cli consume`), settings from the environment, JSON logs on
stderr, read here for their "running", "partitions assigned" and "stopped"
lines."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import orjson
import psycopg

from daemon.embedding.backend import BackendInfo
from tests.benchmarks import kafka_transport
from tests.benchmarks.services import (
    NEEDS_SERVER,
    Postgres,
    QdrantTarget,
    add_chunks,
    converge,
    load_average,
    outbox_pending,
    settings_for,
    update_metadata,
)

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 300.0  # seconds for N processes to load the model and start (N at once on few cores)
RUN_TIMEOUT = 900.0


class OutboxdProcess:
    """One `outboxd` command in its own process; its JSON log lines."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="outboxd-bench-proc-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", *args], env=env, cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        self.exited_at: float | None = None  # time.time() when seen gone

    def lines(self) -> list[dict]:
        out = []
        for raw in Path(self.log.name).read_bytes().splitlines():
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out

    def said(self, msg: str) -> list[dict]:
        return [d for d in self.lines() if d.get("msg") == msg]

    def tail(self) -> str:
        return Path(self.log.name).read_bytes()[-3000:].decode(errors="replace")

    def alive(self) -> bool:
        if self.exited_at is None and self.proc.poll() is not None:
            self.exited_at = time.time()
        return self.exited_at is None

    def stop(self, timeout: float = 60) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.alive()
        return code

    def close(self) -> None:
        self.stop()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def ts(doc: dict) -> float:
    return datetime.fromisoformat(doc["ts"]).timestamp()


def process_env(dsn: str, qdrant: QdrantTarget, collection: str, data_dir: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOXD_", "QDRANT_"))}
    env.update(DATABASE_URL=dsn, OUTBOXD_COLLECTION=collection, OUTBOXD_LOG_FORMAT="json", OUTBOXD_LOG_LEVEL="INFO",
               OUTBOXD_DATA_DIR=data_dir, HF_HUB_OFFLINE="1", **qdrant.env(), **extra)
    return env


def wait_until(what: str, ok, procs: list[OutboxdProcess], timeout: float, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        for p in procs:
            if not p.alive() and p.proc.returncode != 0:
                raise RuntimeError(f"an outboxd process exited {p.proc.returncode} before {what}:\n{p.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}:\n" + "\n---\n".join(p.tail() for p in procs))
        time.sleep(every)


# --- figure 5d: N daemons on one outbox ---------------------------------------------------------
def _daemons_round(pg: Postgres, dsn: str, qdrant: QdrantTarget, collection: str, doc_id, n: int, count: int,
                   rev: int) -> dict:
    """`count` daemons started and blocked on a lock of the outbox (so their model
    loading is not timed), the update committed, the clock run to the last exit;
    the CPU of each process (its own 'stopped' line), of PostgreSQL and of the
    Qdrant server over the same span, where this run owns them."""
    settled = asyncio.run(qdrant.settle(collection))  # the previous round's index builds are not this round's
    env = process_env(dsn, qdrant, collection, tempfile.mkdtemp(prefix="outboxd-bench-data-"))
    with psycopg.connect(dsn) as lock, psycopg.connect(dsn, autocommit=True) as watch:
        lock.execute("LOCK TABLE outboxd.outbox IN ACCESS EXCLUSIVE MODE")
        procs = [OutboxdProcess(["run", "--drain"], env) for _ in range(count)]
        try:
            wait_until("every daemon running", lambda: all(p.said("outboxd running") for p in procs), procs, START_TIMEOUT)

            def blocked() -> bool:  # each process's claim waits on the lock
                return watch.execute("SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted AND "
                                     "relation = 'outboxd.outbox'::regclass").fetchone()[0] >= count
            try:
                wait_until("every daemon waiting to claim", blocked, procs, 30)
            except TimeoutError:
                pass  # the measure is still right: they claim as soon as they can
            q0, p0, threads0 = qdrant.cpu_seconds(), pg.cpu_seconds(), qdrant.thread_cpu()
            lock.execute("UPDATE chunks SET metadata = jsonb_build_object('rev', %s) WHERE document_id = %s", (rev, doc_id))
            lock.commit()
            committed = time.time()
            wait_until("every daemon's exit", lambda: not any(p.alive() for p in procs), procs, RUN_TIMEOUT, every=0.005)
            q1, p1, threads1 = qdrant.cpu_seconds(), pg.cpu_seconds(), qdrant.thread_cpu()
            codes = [p.proc.returncode for p in procs]
            stopped = [p.said("outboxd stopped") for p in procs]
            acked = [s[-1].get("events_acked", 0) if s else None for s in stopped]
            cpu = [s[-1].get("cpu_seconds") if s else None for s in stopped]
            last_exit = max(p.exited_at for p in procs)
            last_line = max(ts(s[-1]) for s in stopped if s) if all(stopped) else None
        finally:
            for p in procs:
                p.close()
    pending = outbox_pending(dsn)
    assert codes == [0] * count, f"exit codes {codes}"
    assert sum(a or 0 for a in acked) == n and pending == 0, f"acked {acked} of {n}, {pending} left in the outbox"
    seconds = last_exit - committed
    drained = (last_line - committed) if last_line else seconds
    per_10k = lambda v: None if v is None else round(v * 10_000 / n, 3)  # noqa: E731
    return {"daemons": count, "events": n, "seconds": round(seconds, 3), "events_per_s": round(n / seconds),
            "acked_per_process": acked, "cpu_per_process": cpu, "outbox_left": pending,
            "daemons_cpu_s_per_10k": per_10k(sum(c or 0 for c in cpu)),
            "postgresql_cpu_s_per_10k": per_10k(None if p0 is None else p1 - p0),
            "qdrant_cpu_s_per_10k": per_10k(None if q0 is None else q1 - q0),
            "qdrant_threads_cpu_s_per_10k": {k: per_10k(v - threads0.get(k, 0.0)) for k, v in threads1.items()
                                             if v - threads0.get(k, 0.0) > 0.01},
            "seconds_waited_for_idle_optimizers": settled,
            "seconds_to_last_stopped_line": round(drained, 3), "drained_events_per_s": round(n / drained)}


def figure_daemons(pg: Postgres, qdrant: QdrantTarget, info: BackendInfo, n: int, counts: list[int],
                   repeats: int = 1) -> dict | str:
    """N daemons on one outbox, `repeats` times through the counts (1, 2, 4, 1, 2, 4):
    each round's rate over the mean of the single-daemon rounds; the figure is
    the least such ratio (the target holds in every run, or it does not)."""
    if not qdrant.is_server:
        return NEEDS_SERVER
    dsn = pg.fresh()
    collection = qdrant.name("daemons")
    doc_id = add_chunks(dsn, "scale-out", [f"short chunk {i}" for i in range(n)])
    assert asyncio.run(converge(dsn, qdrant, collection, info)) == n
    out: dict = {"qdrant": qdrant.label, "events": n, "load_average_before": load_average(),
                 "collection": asyncio.run(qdrant.params(collection)),
                 "what": "payload-only events, N `python -m daemon.cli run --drain` processes (default settings), "
                         "from the update's commit to the last process's exit (interpreter exit included; drained: to "
                         "the last process's 'outboxd stopped' log line instead); every event acknowledged once (sum "
                         "of the processes' events_acked == events, outbox empty); each round starts once the "
                         "server's optimizers are idle"}
    runs = []
    for k, count in enumerate(counts * repeats):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE outboxd.outbox")
        runs.append(_daemons_round(pg, dsn, qdrant, collection, doc_id, n, count, rev=k + 2))
    singles = [r for r in runs if r["daemons"] == 1]
    one = sum(r["events_per_s"] for r in singles) / len(singles)
    one_drained = sum(r["drained_events_per_s"] for r in singles) / len(singles)
    for r in runs:
        r["ratio_to_one"] = round(r["events_per_s"] / one, 3)
        r["drained_ratio_to_one"] = round(r["drained_events_per_s"] / one_drained, 3)
    out["runs"] = runs
    out["one_events_per_s"] = round(one)
    out["least_ratio"] = {c: min(r["ratio_to_one"] for r in runs if r["daemons"] == c) for c in counts}
    out["least_drained_ratio"] = {c: min(r["drained_ratio_to_one"] for r in runs if r["daemons"] == c) for c in counts}
    out["load_average_after"] = load_average()
    return out


# --- figure 5e: N consumers in one group --------------------------------------------------------
async def _read_topic(bootstrap: str, topic: str) -> list:
    """Every record of the topic (no group, nothing committed)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list = []
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for batch in (await consumer.getmany(timeout_ms=1000, max_records=10_000)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


def _assignment(proc: OutboxdProcess) -> frozenset[int] | None:
    """The partitions of the process's latest assignment; None if revoked since, or never assigned."""
    last = None
    for d in proc.lines():
        if d.get("msg") == "partitions assigned":
            last = frozenset(d.get("partitions") or [])
        elif d.get("msg") == "partitions revoked":
            last = None
    return last


def _group_stable(procs: list[OutboxdProcess], partitions: int) -> bool:
    """Every process running, holding partitions of its own, all of them covered."""
    if not all(p.said("outboxd consume running") for p in procs):
        return False
    held = [_assignment(p) for p in procs]
    return all(held) and len(frozenset().union(*held)) == partitions == sum(len(h) for h in held)


async def _publish_and_watch(bootstrap: str, records: list, topic: str, group: str,
                             procs: list[OutboxdProcess]) -> dict:
    """Publish the pre-published records again, as fast as a producer can, into
    the topic the group reads (same key, value, headers, partition), and sample
    the group's committed offsets every 20 ms until all are committed."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1 << 20, acks="all")
    await admin.start()
    await producer.start()
    total = len(records)
    try:
        started = time.time()

        async def publish() -> float:
            futures = [await producer.send(topic, r.value, key=r.key, partition=r.partition, headers=list(r.headers or []))
                       for r in records]
            await asyncio.gather(*futures)
            return time.time() - started

        publishing = asyncio.create_task(publish())
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            try:
                got = await admin.list_consumer_group_offsets(group)
            except Exception:  # noqa: BLE001 - asked again
                got = {}
            done = sum(max(om.offset, 0) for tp, om in got.items() if tp.topic == topic)
            if done >= total:
                return {"committed_seconds": time.time() - started, "publish_seconds": await publishing}
            for p in procs:
                if not p.alive():
                    raise RuntimeError(f"a consumer exited {p.proc.returncode}:\n{p.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done} of {total} committed")
            await asyncio.sleep(0.02)
    finally:
        await producer.stop()
        await admin.close()


def _consumers_round(dsn: str, qdrant: QdrantTarget, collection: str, bootstrap: str, count: int, partitions: int,
                     batch: int) -> dict:
    """The relay publishes the payload-only events to a staging topic; they are
    read into memory; `count` consumers start on an empty topic and wait until
    the group holds every partition; then the staged records are published to
    that topic at once, and the clock runs until every offset is committed.
    The round starts once the server's optimizers are idle: each payload-only
    write of a versioned point rewrites its vector, which the server indexes again."""
    from consumers.kafka_clients import ensure_topics

    tag = uuid.uuid4().hex[:8]
    staging, topic, group = f"outboxd.bench.stage.{tag}", f"outboxd.bench.scale.{tag}", f"bench-scale-{tag}"
    common = dict(collection=collection, batch_size=batch)
    kafka = dict(bootstrap_servers=bootstrap, partitions=partitions)
    relay_seconds = asyncio.run(kafka_transport._relay(
        settings_for(dsn, qdrant, kafka={**kafka, "topic": staging}, **common), dsn))
    records = asyncio.run(_read_topic(bootstrap, staging))
    asyncio.run(ensure_topics(settings_for(dsn, qdrant, kafka={**kafka, "topic": topic}, **common), [topic, f"{topic}.dlq"]))
    env = process_env(dsn, qdrant, collection, tempfile.mkdtemp(prefix="outboxd-bench-data-"),
                      KAFKA_BOOTSTRAP_SERVERS=bootstrap, OUTBOXD_KAFKA__TOPIC=topic, OUTBOXD_KAFKA__GROUP=group,
                      OUTBOXD_KAFKA__PARTITIONS=str(partitions), OUTBOXD_BATCH_SIZE=str(batch))
    procs = [OutboxdProcess(["consume"], env) for _ in range(count)]
    try:
        wait_until("the group holding every partition", lambda: _group_stable(procs, partitions), procs, START_TIMEOUT)
        time.sleep(0.5)
        wait_until("the group holding every partition", lambda: _group_stable(procs, partitions), procs, START_TIMEOUT)
        held = [sorted(_assignment(p)) for p in procs]
        settled = asyncio.run(qdrant.settle(collection))  # the previous round's index builds are not this round's
        timing = asyncio.run(_publish_and_watch(bootstrap, records, topic, group, procs))
        codes = [p.stop() for p in procs]
        applied = [(p.said("outboxd consume stopped") or [{}])[-1].get("records", 0) for p in procs]
    finally:
        for p in procs:
            p.close()
    total = len(records)
    assert codes == [0] * count, f"exit codes {codes}"
    assert sum(applied) >= total, f"records applied {applied} < {total}"
    seconds = timing["committed_seconds"]
    return {"consumers": count, "partitions": partitions, "events": total, "partitions_held": held,
            "relay_seconds": round(relay_seconds, 2), "publish_seconds": round(timing["publish_seconds"], 3),
            "seconds": round(seconds, 3), "events_per_s": round(total / seconds), "records_per_process": applied,
            "seconds_waited_for_idle_optimizers": settled}


def figure_consumers(pg: Postgres, qdrant: QdrantTarget, info: BackendInfo, n: int, counts: list[int],
                     bootstrap: str, partitions: int = 4, batch: int = 500) -> dict | str:
    if not qdrant.is_server:
        return NEEDS_SERVER
    dsn = pg.fresh()
    collection = qdrant.name("consumers")
    doc_id = add_chunks(dsn, "scale-out, Kafka", [f"short chunk {i}" for i in range(n)])
    assert asyncio.run(converge(dsn, qdrant, collection, info)) == n
    out: dict = {"qdrant": qdrant.label, "events": n, "load_average_before": load_average(),
                 "collection": asyncio.run(qdrant.params(collection))}
    runs = []
    for k, count in enumerate(counts):
        update_metadata(dsn, doc_id, rev=k + 2)
        runs.append(_consumers_round(dsn, qdrant, collection, bootstrap, count, partitions, batch))
    for r in runs:
        r["ratio_to_one"] = round(r["events_per_s"] / runs[0]["events_per_s"], 3)
    out.update(runs=runs, load_average_after=load_average(),
               what="payload-only events published by a relay to a staging topic first; N `python -m daemon.cli "
                    f"consume` processes (OUTBOXD_BATCH_SIZE={batch}) in one group on a new topic of {partitions} "
                    "partitions, started and holding every partition; then the relay's records published into that "
                    "topic at once (a producer in the harness, much faster than the consumers), timed from the "
                    "first publish to the last offset committed; every offset committed, every record applied")
    return out
