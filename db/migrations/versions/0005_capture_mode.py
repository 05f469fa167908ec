"""Capture mode: row-level capture triggers for sessions under
session_replication_role = replica (bulk loads, a logical-replication
subscriber's apply worker), off by default, and the functions that switch
between mode 'origin' and mode 'always' (see db/capture.py).

Revision ID: 0005
Revises: 0004
"""
from db.migrations.sql_files import run_sql_file

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0005_capture_mode.up.sql")


def downgrade() -> None:
    run_sql_file("0005_capture_mode.down.sql")
