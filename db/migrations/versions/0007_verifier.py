"""The continuous verifier's lease and checkpoint: one row per collection alias,
held by one daemon of the fleet at a time.

Revision ID: 0007
Revises: 0006
"""
from db.migrations.sql_files import run_sql_file

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0007_verifier.up.sql")


def downgrade() -> None:
    run_sql_file("0007_verifier.down.sql")
