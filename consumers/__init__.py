"""The Kafka transport, in one wing: the event contract both sides import
(contract), the relay that publishes the outbox to the topic (relay), the
reusable consumer loop (stream_consumer), the consumer group that applies the
topic to Qdrant (qdrant_consumer), the operator's tail, the Kafka clients and
topics (kafka_clients), its settings (settings: the [kafka] table), and the
commands (commands). It builds on daemon/ (the
core and the runtime shell); daemon/ never imports it."""
