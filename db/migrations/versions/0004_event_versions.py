"""Versions for the events the Kafka relay publishes.

Revision ID: 0004
Revises: 0003
"""
from db.migrations.sql_files import run_sql_file

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0004_event_versions.up.sql")


def downgrade() -> None:
    run_sql_file("0004_event_versions.down.sql")
