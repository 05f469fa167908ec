"""The core and the long-running services: the apply core (core), embedding
(embedding), the runtime shell every transport runs in (runtime), the outbox
side and the notify daemon (outbox), the operator commands' logic (admin) and
the CLI (cli, commands). The Kafka transport lives in consumers/."""
