"""Text to vectors: the backends (sentence-transformers, ONNX Runtime, an
OpenAI-compatible endpoint) behind one interface, the encode stage the local
ones share, and the Embedder in front that encodes each distinct text once."""
