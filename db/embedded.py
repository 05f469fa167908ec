"""The embedded default: a real PostgreSQL 16 from the pgserver wheel."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or attach to) a PostgreSQL under data_dir/postgres and return its URL.

    pgserver keeps the server running while any process holds a handle and stops
    it when the last one exits; the data stays for the next start.
    """
    with warnings.catch_warnings():
        # platformdirs warns on import when XDG_RUNTIME_DIR is unset (containers, CI, `su`)
        # and falls back to a folder of its own, which serves pgserver's lock as well
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pgserver  # imported lazily: production runs never need it

    pgdata = data_dir / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    url = server.get_uri()
    log.debug("embedded PostgreSQL is up", extra={"pgdata": str(pgdata)})  # `run` prints its URL
    return url
