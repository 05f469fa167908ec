"""Everything that lives in PostgreSQL: schema, outbox, triggers, migrations,
named SQL queries and the connection pool."""
