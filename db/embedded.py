"""The embedded default: a real PostgreSQL 16 from the pgserver wheel.

This module owns the embedded server's lifecycle. pgserver records the pid of
every process holding a server in `<pgdata>/.handle_pids.json` and stops the
server when the last holder lets go, from an atexit hook. A process that ends
without running it (SIGKILL, an `os._exit`) leaves its pid there, and the server
would then never be stopped again. So: start_embedded_postgres() cleans such
stale pids first (and adopts a server left running with no live holder), and
release_embedded_postgres() lets go explicitly, which every way out of an
outboxd process calls before it ends (daemon.cli, the shutdown deadline).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

HANDLES = ".handle_pids.json"  # pgserver's record of the pids holding the server
PYTHON_NAMES = ("python", "outboxd", "pytest")  # what a process holding a pgserver handle runs as

_held: list = []  # the pgserver handles this process holds
_lock = threading.Lock()  # one release at a time: the main thread and the shutdown deadline both call it


def _pgserver():
    with warnings.catch_warnings():
        # platformdirs warns on import when XDG_RUNTIME_DIR is unset (containers, CI, `su`)
        # and falls back to a folder of its own, which serves pgserver's lock as well
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pgserver  # imported lazily: production runs never need it
    return pgserver


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or attach to) a PostgreSQL under data_dir/postgres and return its URL.

    pgserver keeps the server running while any process holds a handle and stops
    it when the last one lets go (release_embedded_postgres, or at exit); the data
    stays for the next start.
    """
    server = _hold(data_dir)
    log.debug("embedded PostgreSQL is up", extra={"pgdata": str(server.pgdata)})  # `run` prints its URL
    return server.get_uri()


def release_embedded_postgres() -> None:
    """Let go of every embedded PostgreSQL this process holds: the last holder's
    release stops the server (`pg_ctl stop`). From any thread, any number of
    times; never raises (it runs on the way out)."""
    with _lock:
        while _held:
            _release(_held.pop())


def _hold(data_dir: Path):
    pgserver = _pgserver()
    pgdata = (data_dir / "postgres").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    _clean_stale_handles(pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    with _lock:
        if server not in _held:
            # pgserver records a process once per handle it creates: again after a release
            with pgserver.postgres_server.PostgresServer._lock:
                server.global_process_id_list.get_and_add(os.getpid())
            _held.append(server)
    return server


def _release(server) -> None:
    try:
        server.cleanup()
    except Exception as exc:  # noqa: BLE001 - the next start cleans what is left
        log.warning("could not stop the embedded PostgreSQL; the next outboxd command on this data directory "
                    "stops it", extra={"pgdata": str(server.pgdata), "error": repr(exc)})


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid of the PostgreSQL serving pgdata, if one runs."""
    import psutil

    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if psutil.pid_exists(pid) else None


def stop_abandoned_postgres(data_dir: Path) -> int | None:
    """Stop the server under data_dir/postgres if it runs with no live holder
    (adopted, then let go). Returns its pid if it stays up: another live process
    holds it."""
    pgdata = (data_dir / "postgres").resolve()
    if postmaster_pid(pgdata) is None:
        return None
    if _clean_stale_handles(pgdata):
        return postmaster_pid(pgdata)
    server = _hold(data_dir)
    with _lock:
        _held.remove(server)
        _release(server)
    return postmaster_pid(pgdata)


def _clean_stale_handles(pgdata: Path) -> list[int]:
    """Drop the pids in pgserver's record that hold nothing any more (a process
    that is gone, or whose pid another program now has), saying so in one log
    line; returns the live holders. A server left running with none is adopted:
    the start that follows attaches to it, and its release stops it."""
    record = pgdata / HANDLES
    if not record.exists():
        return []
    with _pgserver().postgres_server.PostgresServer._lock:  # pgserver's inter-process lock on its record
        try:
            pids = [int(p) for p in json.loads(record.read_text())]
        except (OSError, ValueError, TypeError):  # pgserver itself would fail on it
            record.write_text("[]")
            log.warning("the embedded PostgreSQL's record of its holders was unreadable; reset",
                        extra={"pgdata": str(pgdata)})
            return []
        written = record.stat().st_mtime
        live = [pid for pid in pids if _holds(pid, written)]
        stale = [pid for pid in pids if pid not in live]
        if stale:
            record.write_text(json.dumps(live))
    if stale:
        named = ", ".join(str(p) for p in stale)
        what = f"pid {named}, which is" if len(stale) == 1 else f"pids {named}, which are"
        running = None if live else postmaster_pid(pgdata)
        adopted = "" if running is None else f"; its server (pid {running}) is used and stops when this command exits"
        log.warning(f"the embedded PostgreSQL's record named {what} gone; cleaned{adopted}",
                    extra={"pgdata": str(pgdata), "stale_pids": stale})
    return live


def _holds(pid: int, record_written: float) -> bool:
    """Whether pid can be a live holder: this process; or a running Python process
    (pgserver runs in one) that started before the record was last written, since
    every holder wrote its pid there after it started: a later process only got a
    dead holder's pid from the system."""
    import psutil

    if pid == os.getpid():
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or proc.create_time() > record_written + 1:
            return False
        names = [proc.name()]
        try:
            names += [Path(proc.exe()).name, *(Path(arg).name for arg in proc.cmdline()[:1])]
        except psutil.AccessDenied:  # another user's process: its name alone
            pass
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # cannot tell: keep it, as pgserver would
        return True
    return any(name.startswith(PYTHON_NAMES) for name in names)
