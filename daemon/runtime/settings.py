"""The health endpoint's settings: the `health` table of daemon.config.Settings.

    OUTBOXD_HEALTH__PORT=9464                  (or [health] port = 9464 in --config)

Read by start_health and the systemd watchdog (daemon.runtime.service); kept
apart from them so that building the settings imports only pydantic.
"""
from __future__ import annotations

from pydantic import Field

from daemon.settings.names import Table


class HealthSettings(Table):
    port: int | None = Field(
        None, ge=0, le=65535, description="Serve /healthz, /readyz and /metrics on this port (unset: off)."
    )
    host: str = Field("0.0.0.0", description="Address the health endpoint listens on.")
    heartbeat_timeout: float = Field(
        120.0, gt=0, description="/healthz fails when the main loop has not beaten for this many seconds."
    )
