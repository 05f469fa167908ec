"""The one lifecycle (daemon.runtime.service): workers and side tasks are
started and watched alike, whatever fails first sets the exit code before the
stop begins, so no deadline can end the process with 0 after a crash; on stop
the workers get drain_timeout to finish, then are cancelled. The claim loop's
lease renewer is a child of its batch."""
from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from uuid import uuid4

import pytest

from daemon.config import Settings
from daemon.errors import ConfigError
from daemon.outbox.queue import Claim, Event
from daemon.outbox.service import ClaimLoop, OutboxService
from daemon.runtime.service import Service, run_service


class Probe(Service):
    """A transport with no services: one worker that waits for the stop, unless
    workers are given; side tasks as given. It records the exit code at the
    moment the shutdown deadline is armed."""

    def __init__(self, side: dict | None = None, *, start_error: BaseException | None = None,
                 workers: dict | None = None, drain_timeout: float = 1) -> None:
        super().__init__(Settings(database_url=None, drain_timeout=drain_timeout))
        self._side = side or {}
        self._workers_given = workers
        self._start_error = start_error
        self.code_when_deadline_armed: list[int] = []

    async def start(self) -> None:
        if self._start_error is not None:
            raise self._start_error
        self.started = True

    def workers(self, **kwargs):
        return self._workers_given if self._workers_given is not None else {"worker-0": self.stop.wait}

    def side_tasks(self):
        return super().side_tasks() | self._side

    def arm_exit_deadline(self, limit=None) -> None:
        self.code_when_deadline_armed.append(self.exit_code)
        super().arm_exit_deadline(limit)


async def test_a_side_task_that_dies_stops_the_service_with_its_error(caplog):
    async def doomed():
        await asyncio.sleep(0)
        raise RuntimeError("the listener's connection broke in a way nobody handles")

    service = Probe({"listener": doomed})
    with caplog.at_level(logging.ERROR):
        code = await asyncio.wait_for(run_service(service), 10)
    assert code == 1
    record = next(r for r in caplog.records if "side task 'listener' crashed; stopping" in r.getMessage())
    assert "nobody handles" in record.error
    assert service.code_when_deadline_armed[0] == 1, "the exit code was not recorded before the stop began"


async def test_a_side_task_that_ends_on_its_own_stops_the_service(caplog):
    async def gives_up():
        return None

    with caplog.at_level(logging.ERROR):
        code = await asyncio.wait_for(run_service(Probe({"backlog": gives_up})), 10)
    assert code == 1
    assert any("side task 'backlog' crashed" in r.getMessage() and "ended on its own" in r.error
               for r in caplog.records)


async def test_an_operator_facing_error_of_a_side_task_keeps_its_exit_code():
    async def refused():
        raise ConfigError("Qdrant refused the API key")

    assert await asyncio.wait_for(run_service(Probe({"readiness-extra": refused})), 10) == 78


async def test_the_first_failure_wins_and_a_clean_stop_is_0():
    async def first():
        raise ConfigError("first")

    async def second():
        await asyncio.sleep(0.01)
        raise RuntimeError("second")

    assert await asyncio.wait_for(run_service(Probe({"a": first, "b": second})), 10) == 78
    clean = Probe()
    asyncio.get_running_loop().call_later(0.05, clean.stop.set)
    assert await asyncio.wait_for(run_service(clean), 10) == 0


async def test_a_failure_at_start_is_recorded_before_the_deadline_is_armed():
    service = Probe(start_error=ConfigError("the schema is not migrated"))
    with pytest.raises(ConfigError):
        await run_service(service)
    assert service.exit_code == 78 and service.code_when_deadline_armed[0] == 78


async def test_a_worker_that_fails_stops_the_service_with_its_exit_code(caplog):
    """The other workers are stopped too, each finishing what it was doing."""
    finished = asyncio.Event()

    async def refused():
        raise ConfigError("Qdrant refused the API key")

    async def busy():
        await service.stop.wait()
        finished.set()  # the stop reached it, and it ended on its own terms

    service = Probe(workers={"worker-0": refused, "worker-1": busy})
    with caplog.at_level(logging.ERROR):
        code = await asyncio.wait_for(run_service(service), 10)
    assert code == 78
    assert finished.is_set()
    assert service.code_when_deadline_armed[0] == 78, "the exit code was not recorded before the stop began"
    assert any("Qdrant refused the API key" in r.getMessage() for r in caplog.records)


async def test_a_crashing_worker_is_reported_by_name_and_exits_1(caplog):
    async def crashes():
        raise RuntimeError("a bug in the claim loop")

    with caplog.at_level(logging.ERROR):
        assert await asyncio.wait_for(run_service(Probe(workers={"worker-3": crashes})), 10) == 1
    record = next(r for r in caplog.records if "worker worker-3 crashed; stopping" in r.getMessage())
    assert "a bug in the claim loop" in record.error


async def test_workers_that_end_their_work_end_the_run_with_0():
    """A drain: each worker ends once nothing is left, and the service is done."""
    ended = []

    async def drains():
        ended.append(True)

    service = Probe(workers={"worker-0": drains, "worker-1": drains})
    assert await asyncio.wait_for(service.run(), 10) == 0
    assert ended == [True, True] and not service.stop.is_set()


def stuck_worker() -> tuple[asyncio.Event, asyncio.Event, object]:
    """A worker whose batch never ends, and events for its start and its cancellation."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck():
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    return started, cancelled, stuck


async def test_a_worker_still_busy_at_the_drain_deadline_is_cancelled(caplog):
    """On stop, a worker gets drain_timeout to finish its batch; one still busy
    after it is cancelled (a claim loop then hands its claims back)."""
    started, cancelled, stuck = stuck_worker()
    service = Probe(workers={"worker-0": stuck}, drain_timeout=0.05)
    with caplog.at_level(logging.WARNING):
        running = asyncio.create_task(run_service(service))
        await asyncio.wait_for(started.wait(), 10)
        service.stop.set()
        assert await asyncio.wait_for(running, 10) == 0
    assert cancelled.is_set()
    assert any("drain timeout" in r.getMessage() and r.batches == 1 for r in caplog.records)


async def test_a_worker_finishes_its_batch_within_the_drain_timeout():
    started, cancelled, finishing = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def batch():
        started.set()
        try:
            await service.stop.wait()
            await finishing.wait()  # the rest of its batch, after the stop
        except asyncio.CancelledError:
            cancelled.set()
            raise

    service = Probe(workers={"worker-0": batch}, drain_timeout=3600)
    running = asyncio.create_task(run_service(service))
    await asyncio.wait_for(started.wait(), 10)
    service.stop.set()
    finishing.set()
    assert await asyncio.wait_for(running, 10) == 0
    assert not cancelled.is_set()


async def test_a_second_signal_cancels_the_workers_at_once():
    started, cancelled, stuck = stuck_worker()
    service = Probe(workers={"worker-0": stuck}, drain_timeout=3600)  # the drain alone would never end
    running = asyncio.create_task(service.run())
    await asyncio.wait_for(started.wait(), 10)
    service.stop.set()
    service.on_second_signal()
    assert await asyncio.wait_for(running, 10) == 0
    assert cancelled.is_set()


async def test_no_worker_outlives_a_run_that_is_cancelled():
    started, cancelled, stuck = stuck_worker()
    service = Probe(workers={"worker-0": stuck})
    running = asyncio.create_task(service.run())
    await asyncio.wait_for(started.wait(), 10)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert cancelled.is_set()


# --- the lease renewer: a child of its batch ----------------------------------------------
class Released:
    """The outbox as far as a batch's end sees it: which claims were handed back."""

    def __init__(self) -> None:
        self.ids: list[list[int]] = []

    async def release(self, ids: list[int]) -> None:
        self.ids.append(ids)


def claim_loop() -> tuple[ClaimLoop, Released, Claim]:
    service = OutboxService(Settings(database_url=None), "postgresql://nowhere/unused")
    service.outbox = Released()
    claim = Claim([Event(7, uuid4(), "upsert", 0, datetime.now(UTC))], {})
    return ClaimLoop("worker/0", service), service.outbox, claim


async def test_the_renewers_failure_reaches_its_batch():
    """The batch is cancelled, its claims handed back, and the renewer's error is the
    batch's (so the worker fails, and the service stops with its exit code)."""
    loop, outbox, claim = claim_loop()
    batch_cancelled = asyncio.Event()

    async def renew_fails(ids):
        await asyncio.sleep(0)
        raise RuntimeError("the renewer broke")

    async def deliver_forever(events, states):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            batch_cancelled.set()
            raise

    loop._renew, loop._once = renew_fails, deliver_forever
    with pytest.raises(RuntimeError, match="the renewer broke"):
        await asyncio.wait_for(loop.process(claim, claimed=(0, 0)), 10)
    assert batch_cancelled.is_set()
    assert outbox.ids == [[7]]


async def test_the_renewer_does_not_outlive_its_batch():
    loop, outbox, claim = claim_loop()
    renewers: list[asyncio.Task] = []
    renewing = asyncio.Event()

    async def renew_forever(ids):
        renewers.append(asyncio.current_task())
        renewing.set()
        await asyncio.Event().wait()

    async def deliver(events, states):
        await renewing.wait()

    loop._renew, loop._once = renew_forever, deliver
    await asyncio.wait_for(loop.process(claim, claimed=(0, 0)), 10)
    assert len(renewers) == 1 and renewers[0].done()
    assert outbox.ids == []  # delivered: nothing handed back


async def test_a_batchs_own_error_is_raised_as_itself():
    loop, _, claim = claim_loop()

    async def renew_forever(ids):
        await asyncio.Event().wait()

    async def deliver(events, states):
        raise ConfigError("the collection was retired")

    loop._renew, loop._once = renew_forever, deliver
    with pytest.raises(ConfigError, match="retired"):
        await asyncio.wait_for(loop.process(claim, claimed=(0, 0)), 10)
