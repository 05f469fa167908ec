"""The outbox's chunk index also keys the status, for "is an event pending for this chunk?".

Revision ID: 0009
Revises: 0008
"""
from db.migrations.sql_files import run_sql_file

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0009_outbox_chunk_status_index.up.sql")


def downgrade() -> None:
    run_sql_file("0009_outbox_chunk_status_index.down.sql")
