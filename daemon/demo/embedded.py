"""The plumbing under `outboxd demo`: its own folder (`<data-dir>/demo`, marked
so that --fresh wipes only what the demo created), a real PostgreSQL from
pgserver in it, Qdrant's local mode next to it, and the signal handling of its
synchronous part (starting PostgreSQL, loading the corpus), where SIGTERM stops
the demo like Ctrl-C: everything it started is closed and PostgreSQL stops.
While the daemon runs, the runtime's shell handles the signals, as for
`outboxd run`.
"""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import psutil

from db import migrate
from db.embedded import postmaster_pid, release_embedded_postgres, start_embedded_postgres, stop_abandoned_postgres

POSTGRES_GONE_TIMEOUT = 10.0  # seconds to wait for the stopped server's process to be gone
MARKER = ".outboxd-demo"  # written into the demo folder: --fresh wipes only a folder that has it


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path.resolve())


class EmbeddedStores:
    """The demo's PostgreSQL (under <demo_dir>/postgres) and its Qdrant folder."""

    def __init__(self, demo_dir: Path) -> None:
        self.demo_dir = demo_dir
        self.pgdata = demo_dir / "postgres"
        self.dsn: str | None = None

    def prepare(self, *, fresh: bool) -> str | None:
        """Create the demo folder (wiping it first with --fresh). A reason it cannot, or None."""
        demo_dir = self.demo_dir
        if fresh and demo_dir.exists():
            if any(demo_dir.iterdir()) and not (demo_dir / MARKER).exists():
                return f"--fresh would delete {demo_dir}, which the demo did not create; remove it yourself"

            pid = stop_abandoned_postgres(demo_dir)  # a server left running by a process that is gone stops here
            if pid is not None:
                return (
                    f"the demo's PostgreSQL is running (pid {pid}), probably for an `outboxd run --data-dir "
                    f"{shown(demo_dir)}`; stop that first, then run `outboxd demo --fresh` again"
                )
            shutil.rmtree(demo_dir)
        demo_dir.mkdir(parents=True, exist_ok=True)
        (demo_dir / MARKER).write_text("created by `outboxd demo`; `outboxd demo --fresh` deletes this folder\n")
        return None

    def start_postgres(self) -> str:
        """Start (or attach to) the demo's PostgreSQL and migrate it; its URL."""
        self.dsn = start_embedded_postgres(self.demo_dir.resolve())
        migrate.upgrade(self.dsn)
        return self.dsn

    def stop_postgres(self) -> int | None:
        """Let go of the embedded PostgreSQL now: pgserver stops it when the last
        handle closes. Returns its pid if it is still up (another process, e.g. an
        `outboxd run` on the same folder, holds a handle), else None once its
        process is gone: `pg_ctl stop` returns when the server has removed its pid
        file, and its process lingers (a zombie, still in `ps`) until its parent,
        init, collects it: in a container that can take seconds."""
        if self.dsn is None:  # never started
            return None

        pgdata = self.pgdata.resolve()
        pid = postmaster_pid(pgdata)
        release_embedded_postgres()
        still_up = postmaster_pid(pgdata)
        if still_up is None and pid is not None:
            deadline = time.monotonic() + POSTGRES_GONE_TIMEOUT
            while psutil.pid_exists(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        return still_up


# --- signals ------------------------------------------------------------------------------
def _interrupt(signum, frame) -> None:
    """SIGTERM outside the daemon's run (the shell's own handlers stand in for it there)."""
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """Outside the event loop: SIGTERM stops the demo like Ctrl-C (KeyboardInterrupt)."""
    signal.signal(signal.SIGTERM, _interrupt)
