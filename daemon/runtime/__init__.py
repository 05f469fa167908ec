"""The shell every long-running transport runs in: one stop event and the
signals that set it, start-up waiting, the batch policy (retry, isolate,
record), stats, secrets, health, systemd and telemetry."""
