"""The one supervisor (daemon.runtime.service.run_service): side tasks are
watched like the work, and whatever fails first sets the exit code before the
stop begins, so no deadline can end the process with 0 after a crash."""
from __future__ import annotations

import asyncio
import logging

import pytest

from daemon.config import Settings
from daemon.errors import ConfigError
from daemon.runtime.service import Service, run_service


class Probe(Service):
    """A transport with no services: run() waits for the stop; side tasks as given.
    It records the exit code at the moment the shutdown deadline is armed."""

    def __init__(self, side: dict | None = None, *, start_error: BaseException | None = None) -> None:
        super().__init__(Settings(database_url=None, drain_timeout=1))
        self._side = side or {}
        self._start_error = start_error
        self.code_when_deadline_armed: list[int] = []

    async def start(self) -> None:
        if self._start_error is not None:
            raise self._start_error
        self.started = True

    async def run(self, **kwargs) -> int:
        await self.stop.wait()
        return 0

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
