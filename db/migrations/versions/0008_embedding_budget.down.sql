DROP TABLE IF EXISTS outboxd.embedding_budget;
