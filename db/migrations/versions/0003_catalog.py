"""Catalog of collections and model fingerprints; checkpoints of long scans.

Revision ID: 0003
Revises: 0002
"""
from db.migrations.sql_files import run_sql_file

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0003_catalog.up.sql")


def downgrade() -> None:
    run_sql_file("0003_catalog.down.sql")
