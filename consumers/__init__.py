"""Kafka event-stream consumers (the event contract, the Qdrant-applying group,
and a reusable base) land with the Kafka transport."""
