"""The continuous verifier's settings: the `verify` table of daemon.config.Settings.

    OUTBOXD_VERIFY__CHUNKS_PER_SECOND=50       (or [verify] chunks_per_second = 50 in --config)

Read by the verifier (daemon.outbox.verifier); kept apart from it so that
building the settings imports only pydantic.
"""
from __future__ import annotations

from pydantic import Field

from daemon.settings.names import Table


class VerifySettings(Table):
    """The continuous verifier of `outboxd run` (docs/verification.md): one daemon of
    the fleet at a time walks chunk ids and point ids in order, a range at a time,
    and enqueues a repair event for whatever differs."""

    chunks_per_second: float = Field(
        50.0, ge=0, description="Chunk ids the verifier checks per second at most (0: no verifier in this daemon)."
    )
    range_size: int = Field(
        500, ge=1, le=10_000,
        description="Chunk ids per checked range: one PostgreSQL page and one Qdrant scroll, then a checkpoint.",
    )
    lease_seconds: float = Field(
        30.0, gt=0,
        description="Another daemon takes over the verifier when its holder has not renewed it for this long.",
    )

    @property
    def enabled(self) -> bool:
        return self.chunks_per_second > 0
