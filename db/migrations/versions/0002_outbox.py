"""Outbox, capture triggers, NOTIFY wake-up and the chunk_state projection.

Revision ID: 0002
Revises: 0001
"""
from db.migrations.sql_files import run_sql_file

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0002_outbox.up.sql")


def downgrade() -> None:
    run_sql_file("0002_outbox.down.sql")
