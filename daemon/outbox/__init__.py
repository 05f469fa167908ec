"""The outbox side: the claim/lease/ack queries (queue), the NOTIFY wake-up
(listener), and the outbox service with its claim loops (service) that both the
notify daemon (notify_daemon) and the Kafka relay (consumers.relay) run."""
