"""The apply core: what a chunk is (chunk_state), what Qdrant must hold for it
(apply), how it gets there (qdrant_store), and which collection is live
(catalog). It knows nothing about transports."""
