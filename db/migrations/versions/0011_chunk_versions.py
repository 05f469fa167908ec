"""Each chunk's version, bumped in the transaction of every event recorded for it.

Revision ID: 0011
Revises: 0010
"""
from db.migrations.sql_files import run_sql_file

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0011_chunk_versions.up.sql")


def downgrade() -> None:
    run_sql_file("0011_chunk_versions.down.sql")
