-- The backend variant of the model fingerprint (NULL: vectors that agree with the
-- reference; 'onnx-int8', 'remote:<model>': their own). Without it an int8 daemon's
-- collection read back as the fp32 model's, and the advice to keep it was wrong.
-- Rows made before it existed read NULL; outboxd prefers the collection's own
-- record in Qdrant, which has always had the variant.
ALTER TABLE outboxd.collections ADD COLUMN variant TEXT;
