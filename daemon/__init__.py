"""The long-running process: config, CLI, supervisor, NOTIFY listener, outbox
claimer, embedder, Qdrant sink and the apply core they share."""
