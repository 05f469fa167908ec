"""The outbox side: the claim/lease/ack queries (queue), the NOTIFY wake-up
(listener), and the claim loop (claim_loop, service) that both the notify
daemon (notify_daemon) and the Kafka relay (consumers.relay) run."""
