DROP TABLE IF EXISTS outboxd.verifier;
