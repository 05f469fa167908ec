"""Alembic environment: runs on the connection that db.migrate hands over."""
from alembic import context

from db.migrate import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=None,
    # Not "alembic_version": the application may run its own Alembic in this database.
    version_table=VERSION_TABLE,
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations()
