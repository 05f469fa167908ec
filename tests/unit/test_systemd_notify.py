"""sd_notify without libsystemd: notifications arrive as datagrams on a real
AF_UNIX socket (a path or an abstract name), and nothing breaks without one."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

from daemon.runtime.systemd import SystemdNotifier


@pytest.fixture
def notify_socket():
    """A bound AF_UNIX datagram socket at a short path (sun_path holds 108 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="sd-"))
    path = folder / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()
    shutil.rmtree(folder, ignore_errors=True)


def test_notifications_arrive_on_a_path_socket(notify_socket):
    """ready, status, watchdog and stopping send READY=1, STATUS=..., WATCHDOG=1, STOPPING=1 in order."""
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.status("backlog 3, lag 1.5s")
    assert notifier.watchdog()
    assert notifier.stopping()
    received = [sock.recv(4096).decode() for _ in range(4)]
    assert received == ["READY=1", "STATUS=backlog 3, lag 1.5s", "WATCHDOG=1", "STOPPING=1"]
    notifier.close()


def test_stopping_is_sent_once_and_status_is_one_line(notify_socket):
    """STOPPING=1 goes once however often it is asked for; a multi-line status becomes one line."""
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.stopping()
    assert not notifier.stopping()
    notifier.status("first\nsecond")
    assert sock.recv(4096) == b"STOPPING=1"
    assert sock.recv(4096) == b"STATUS=first second"


def test_abstract_socket_name():
    """'@name' addresses the abstract namespace (Linux), as systemd may hand out."""
    name = f"outboxd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + name)
        sock.settimeout(2)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op():
    """Not started by systemd: no socket, no watchdog, and every call returns without sending."""
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()


def test_reads_the_process_environment(notify_socket, monkeypatch):
    """By default NOTIFY_SOCKET and WATCHDOG_USEC come from os.environ."""
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = SystemdNotifier()
    assert notifier.watchdog_interval == 1.5
    notifier.ready()
    assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize(
    "env, interval",
    [
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),  # another process's watchdog
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(env, interval, notify_socket):
    _, path = notify_socket
    assert SystemdNotifier({"NOTIFY_SOCKET": path, **env}).watchdog_interval == interval


def test_a_send_that_fails_never_raises(tmp_path, caplog):
    """A socket that is gone (systemd restarted, a stale variable) is logged at debug, never raised."""
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "missing"), "WATCHDOG_USEC": "1000000"})
    with caplog.at_level("DEBUG", logger="daemon.runtime.systemd"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    assert any("not sent" in r.getMessage() for r in caplog.records)
    assert all(r.levelname == "DEBUG" for r in caplog.records if r.name == "daemon.runtime.systemd")
    # a relative name is neither a path nor abstract: ignored
    assert not SystemdNotifier({"NOTIFY_SOCKET": "relative/name"}).enabled


async def test_watchdog_pings_only_while_the_heartbeat_is_fresh(notify_socket):
    """The supervisor's watchdog task sends WATCHDOG=1 at watchdog_interval while the
    heartbeat is fresh, and withholds it (systemd then restarts the service) once stale."""
    import asyncio
    import time
    from types import SimpleNamespace

    from daemon.runtime.health import Heartbeat
    from daemon.runtime.service import _watchdog
    from tests.clock import ManualClock

    sock, path = notify_socket
    sock.setblocking(False)
    clock = ManualClock()  # the heartbeat's age is what the test sets, however slow the machine
    heartbeat = Heartbeat(clock)
    daemon = SimpleNamespace(
        notifier=SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}),
        heartbeat=heartbeat,
        settings=SimpleNamespace(health=SimpleNamespace(heartbeat_timeout=1.0)),
        stuck_workers=lambda: [],
    )
    pings: list[bytes] = []

    def received() -> list[bytes]:
        while True:
            try:
                pings.append(sock.recv(4096))
            except BlockingIOError:
                return pings

    async def until(condition) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, "the watchdog task did not get there"
            await asyncio.sleep(0.01)

    task = asyncio.create_task(_watchdog(daemon))
    try:
        await until(lambda: received().count(b"WATCHDOG=1") >= 3)  # every 0.05 s
        clock.advance(5)  # the loop stopped beating five seconds ago
        received().clear()  # what was sent while it was fresh
        looked = clock.reads
        await until(lambda: clock.reads >= looked + 4)  # the task judged the stale heartbeat three times or more
        assert received() == []
        heartbeat.beat()
        await until(lambda: b"WATCHDOG=1" in received())
    finally:
        task.cancel()
