"""The continuous verifier of `outboxd run`: proof, while the daemon runs, that
the collection holds what PostgreSQL says, and repair where it does not.

Writes the capture triggers never saw (a restore with --disable-triggers,
ALTER TABLE ... DISABLE TRIGGER, session_replication_role = replica) and
points changed behind outboxd's back leave no event; `outboxd reconcile`
catches them when someone runs it. The verifier runs all the time, slowly:

- one daemon of the fleet at a time verifies, the holder of a lease in
  PostgreSQL (outboxd.verifier, one row per collection alias, taken and renewed
  with one statement); when its holder dies the lease runs out and another
  daemon takes it over;
- the holder walks chunk ids and point ids in the same order, one bounded
  range after the checkpoint at a time (daemon.admin.reconcile: Reconciler.
  check_range), judging each pair with the apply core's decision
  (daemon.core.plan) on the point's small keys, never its vector;
- a chunk with a pending event is in flight, not drift; confirmed drift is
  repaired by enqueueing an event per chunk, as `reconcile --repair` does, so
  the normal claim and acknowledgement apply it (a point with no chunk gets an
  event for the gone chunk, which deletes it);
- after each range the checkpoint moves, in the lease's row, so a new holder
  resumes there; a pass that reaches the highest id records itself and the
  next starts at the lowest;
- at most one range of `range_size` ids every range_size / chunks_per_second
  seconds, so the work is bounded whatever the collection holds.

A failure of its own (an outage, an error) is logged and retried with the one
backoff while the daemon goes on applying events; a verifier that stays stuck
shows as a pass that never completes (outboxd_verify_pass_started_timestamp_seconds,
alert OutboxdVerifyPassOverdue). Only what no waiting heals stops the daemon, as
it would the apply path: a configuration error (exit 78), such as Qdrant
refusing the key, or the collection retired by a reindex.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from daemon.admin.reconcile import KINDS, Reconciler, Repair
from daemon.errors import Failure, describe
from daemon.outbox.settings import VerifySettings
from daemon.runtime.backoff import OUTAGE
from daemon.runtime.retry import Failed, Retry, Stopped, wait_for_any
from daemon.telemetry import Metrics
from db.coordination import CoordinationRepository

log = logging.getLogger(__name__)

UUID_SPACE = 2**128
# below this share of the id space, a pass's chunk count says too little about the whole
MIN_POSITION_TO_EXTRAPOLATE = 0.01


def position_of(after: UUID | None) -> float:
    """How far a pass is, 0 to 1: the share of the uuid space up to its checkpoint,
    which for random (version 4, the schema's default) chunk ids is the share of
    the chunks checked."""
    return 0.0 if after is None else after.int / UUID_SPACE


def expected_pass_seconds(settings: VerifySettings, last_pass_checked: int | None, pass_checked: int,
                          position: float) -> float | None:
    """Seconds a full pass should take at this rate: one range per range_size /
    chunks_per_second seconds, for the chunks of the last full pass (in the first
    pass: what this one checked, extrapolated from how far it is). None: not
    known yet, or the verifier is off."""
    if not settings.enabled:
        return None
    if last_pass_checked is not None:
        chunks = last_pass_checked
    elif position >= MIN_POSITION_TO_EXTRAPOLATE:
        chunks = pass_checked / position
    else:
        return None
    ranges = max(1, math.ceil(chunks / settings.range_size))
    return ranges * settings.range_size / settings.chunks_per_second


def add_counts(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    """Drift counts by kind, summed; kinds with none left out."""
    out = dict(total)
    for kind, n in more.items():
        if n:
            out[kind] = out.get(kind, 0) + n
    return out


@dataclass(frozen=True)
class PassState:
    """The verifier's row as one statement returned it."""

    holder: str
    held: bool  # this daemon holds the lease now
    after: UUID | None
    pass_started_at: datetime
    pass_checked: int
    pass_drift: dict[str, int]
    passes: int
    last_pass_completed_at: datetime | None
    last_pass_seconds: float | None
    last_pass_checked: int | None
    last_pass_drift: dict[str, int] | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "PassState":
        return cls(row["holder"], row["held"], row["after_id"], row["pass_started_at"], row["pass_checked"],
                   dict(row["pass_drift"] or {}), row["passes"], row["last_pass_completed_at"],
                   row["last_pass_seconds"], row["last_pass_checked"], row["last_pass_drift"])


class VerifierLease:
    """The verifier's row of one collection alias, as this worker holds it: each
    method one short statement of db.coordination (never a transaction across a
    Qdrant call)."""

    def __init__(self, pool: AsyncConnectionPool, collection: str, worker: str, lease_seconds: float) -> None:
        self.pool = pool
        self.db = CoordinationRepository(pool)
        self.collection = collection
        self.worker = worker
        self.lease_seconds = lease_seconds

    async def take(self) -> PassState:
        """Take or renew the lease; the row either way (held: whether this worker has it)."""
        return PassState.from_row(await self.db.take_verifier_lease(self.collection, self.worker, self.lease_seconds))

    async def checkpoint(self, after: UUID, checked: int, drift: dict[str, int]) -> PassState | None:
        """Record a checked range; None: the lease was taken over."""
        row = await self.db.save_verifier_checkpoint(self.collection, self.worker, self.lease_seconds,
                                                     after=after, checked=checked, drift=drift)
        return PassState.from_row(row) if row else None

    async def complete(self, checked: int, drift: dict[str, int]) -> PassState | None:
        """Record a full pass and start the next at the lowest id; None: the lease was taken over."""
        row = await self.db.complete_verifier_pass(self.collection, self.worker, self.lease_seconds,
                                                   checked=checked, drift=drift)
        return PassState.from_row(row) if row else None

    async def release(self) -> None:
        await self.db.release_verifier_lease(self.collection, self.worker)


class Verifier:
    def __init__(self, reconciler: Reconciler, lease: VerifierLease, settings: VerifySettings, metrics: Metrics,
                 repair: Repair, stop: asyncio.Event) -> None:
        self.reconciler = reconciler
        self.lease = lease
        self.settings = settings
        self.metrics = metrics
        self.repair = repair
        self.stop = stop
        self.holding = False
        # a range every range_size / rate seconds; non-holders ask for the lease this often
        self.range_seconds = settings.range_size / settings.chunks_per_second
        self.poll_seconds = settings.lease_seconds / 3

    async def run(self) -> None:
        """Until stopped (or cancelled): verify while holding the lease, else wait
        for it. Its own failures, outages and bugs alike, are logged and retried:
        the daemon's real work goes on without it. Only what no waiting heals
        (a refused key, a retired collection) is raised."""
        retry = Retry(OUTAGE, stop=self.stop, retries=(Failure.TRANSIENT, Failure.OTHER), on_retry=self._failed)
        # a series of each from the start, so that increase() sees the first drift of a kind
        self.metrics.verify_chunks_checked.add(0)
        self.metrics.verify_repaired.add(0)
        for kind in KINDS:
            self.metrics.verify_drift.add(0, {"kind": kind})
        try:
            while not self.stop.is_set():
                await retry.call(self._turn)
        except Stopped:
            pass  # stopped while waiting to retry
        finally:
            if self.holding:  # hand the lease on now, not when it runs out
                with suppress(Exception):
                    await asyncio.wait_for(self.lease.release(), 2.0)
            self.metrics.set_verify(holder=0)

    async def _turn(self) -> None:
        """Take (or renew) the lease; verify while holding it, else wait a while for it."""
        state = await self.lease.take()
        self._observe(state)
        if state.held:
            self._note_taken(state)
            await self._verify(state)
        else:
            self.holding = False
            await wait_for_any([self.stop], self.poll_seconds)

    @staticmethod
    def _failed(failed: Failed) -> None:
        outage = failed.failure is Failure.TRANSIENT  # a bug gets its traceback
        log.log(logging.WARNING if outage else logging.ERROR, "verifier failed; retrying",
                exc_info=None if outage else failed.error,
                extra={"error": describe(failed.error), "retry_in": round(failed.delay, 2)})

    def _note_taken(self, state: PassState) -> None:
        if not self.holding:
            log.info("verifier lease taken", extra={
                "collection": self.lease.collection, "resume_after": str(state.after) if state.after else None,
                "pass_checked": state.pass_checked, "passes": state.passes,
            })
        self.holding = True

    async def _verify(self, state: PassState) -> None:
        """Check one range after another while this daemon holds the lease."""
        after, checked, drift = state.after, state.pass_checked, state.pass_drift
        while not self.stop.is_set():
            began = time.monotonic()
            result = await self.reconciler.check_range(after, self.settings.range_size, self.repair)
            report = result.report
            checked += report.chunks
            drift = add_counts(drift, report.counts)
            self.metrics.verify_chunks_checked.add(report.chunks)
            for kind in KINDS:
                if report.counts[kind]:
                    self.metrics.verify_drift.add(report.counts[kind], {"kind": kind})
            if report.repaired:
                self.metrics.verify_repaired.add(report.repaired)
            if report.drift:
                log.warning("verifier found drift; repair events enqueued", extra={
                    "counts": {k: n for k, n in report.counts.items() if n},
                    "examples": {k: v for k, v in report.examples.items() if v},
                    "repaired": report.repaired,
                })
            if result.complete:
                state = await self.lease.complete(checked, drift)
                if state is not None:
                    log.info("verification pass complete", extra={
                        "collection": self.lease.collection, "chunks": state.last_pass_checked,
                        "seconds": round(state.last_pass_seconds or 0.0, 3), "drift": state.last_pass_drift,
                        "passes": state.passes,
                    })
            else:
                state = await self.lease.checkpoint(result.end, checked, drift)
            if state is None or not await self._pace(began + self.range_seconds):
                log.info("verifier lease taken over by another daemon", extra={"collection": self.lease.collection})
                self.holding = False
                return
            self._observe(state)
            after, checked, drift = state.after, state.pass_checked, state.pass_drift

    async def _pace(self, until: float) -> bool:
        """Wait until the next range is due, renewing the lease meanwhile; False: it was lost."""
        while (remaining := until - time.monotonic()) > 0 and not self.stop.is_set():
            await wait_for_any([self.stop], min(remaining, self.poll_seconds))
            if until - time.monotonic() > 0:
                state = await self.lease.take()
                self._observe(state)
                if not state.held:
                    return False
        return True

    def _observe(self, state: PassState) -> None:
        position = position_of(state.after)
        last = state.last_pass_completed_at
        self.metrics.set_verify(
            holder=int(state.held),
            position=position,
            pass_started_timestamp_seconds=state.pass_started_at.timestamp(),
            last_pass_timestamp_seconds=last.timestamp() if last else None,
            expected_pass_seconds=expected_pass_seconds(self.settings, state.last_pass_checked, state.pass_checked,
                                                        position),
        )
